#!/bin/sh
printf 'Content-Type: text/plain\r\n\r\n'
for i in 0 1 2 3; do
    [ "$i" = 0 ] || sleep 0.25
    echo "part $i"
done
