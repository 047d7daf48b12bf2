#!/bin/sh
printf 'Status: 404 Not Found\r\nContent-Type: text/plain\r\n\r\ncgi not found\n'
