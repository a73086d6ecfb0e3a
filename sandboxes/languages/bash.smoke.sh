echo "hello from bash $((2 + 2))"
