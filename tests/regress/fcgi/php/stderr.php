<?php
error_log('php says hello on stderr');
header('Content-Type: text/plain');
echo "ok\n";
