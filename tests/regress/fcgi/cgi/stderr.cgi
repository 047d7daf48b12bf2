#!/bin/sh
echo "cgi says hello on stderr" >&2
printf 'Content-Type: text/plain\r\n\r\nok\n'
