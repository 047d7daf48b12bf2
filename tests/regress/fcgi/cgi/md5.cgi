#!/bin/sh
# The md5 of the request body, read from stdin to its end.
printf 'Content-Type: text/plain\r\n\r\n'
md5sum | cut -d' ' -f1
