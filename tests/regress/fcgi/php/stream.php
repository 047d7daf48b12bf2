<?php
// Four parts, flushed one by one, 0.25 s apart; with ?gate=PATH the
// second waits (10 s at most) for PATH to exist, else "no gate".
header('Content-Type: text/plain');
$gate = $_GET['gate'] ?? '';
for ($i = 0; $i < 4; $i++) {
    if ($i && !$gate)
        usleep(250000);
    if ($i == 1 && $gate) {
        for ($w = 0; !file_exists($gate); $w++) {
            if ($w >= 1000) {
                print("no gate\n");
                exit;
            }
            usleep(10000);
            clearstatcache();
        }
    }
    printf("part %d %.3f\n", $i, microtime(true));
    flush();
}
