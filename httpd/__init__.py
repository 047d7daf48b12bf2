"""httpd"""
