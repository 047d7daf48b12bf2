#!/bin/sh
# The CGI environment, one NAME=value per line (values without newlines).
# The body is read first: fcgiwrap answers 502 if the script exits before
# it could hand over the whole body.
cat > /dev/null
printf 'Content-Type: text/plain\r\nX-App: fcgiwrap\r\n\r\n'
env
