<?php
echo "hello from php " . (2 + 2) . "\n";
