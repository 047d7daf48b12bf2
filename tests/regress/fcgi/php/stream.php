<?php
header('Content-Type: text/plain');
for ($i = 0; $i < 4; $i++) {
    if ($i)
        usleep(250000);
    printf("part %d %.3f\n", $i, microtime(true));
    flush();
}
