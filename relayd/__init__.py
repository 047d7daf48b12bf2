"""relayd"""
