<?php
header('Content-Type: application/json');
echo json_encode(['index' => true, 'SCRIPT_NAME' => $_SERVER['SCRIPT_NAME'],
                  'DOCUMENT_URI' => $_SERVER['DOCUMENT_URI'],
                  'REQUEST_URI' => $_SERVER['REQUEST_URI'],
                  'SCRIPT_FILENAME' => $_SERVER['SCRIPT_FILENAME']]);
