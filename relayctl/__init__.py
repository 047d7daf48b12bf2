"""relayctl"""
