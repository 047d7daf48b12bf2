<?php
// Echo $_SERVER and the md5 of the request body as JSON.
$in = fopen('php://input', 'rb');
$md5 = hash_init('md5');
$n = 0;
while (!feof($in)) {
    $block = fread($in, 65536);
    if ($block === false || $block === '')
        break;
    $n += strlen($block);
    hash_update($md5, $block);
}
header('Content-Type: application/json');
header('X-App: php');
echo json_encode(['env' => $_SERVER, 'len' => $n, 'md5' => hash_final($md5)]);
