<?php
header('Location: http://example.com/from-php');
