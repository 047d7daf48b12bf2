#!/bin/sh
# The CGI environment, one NAME=value per line (values without newlines).
printf 'Content-Type: text/plain\r\nX-App: fcgiwrap\r\n\r\n'
env
