#!/bin/sh
printf 'Location: http://example.com/from-cgi\r\n\r\n'
