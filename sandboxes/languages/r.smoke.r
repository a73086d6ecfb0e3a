m <- matrix(c(2, 0, 0, 2), 2)
cat("hello from r", sum(diag(solve(m) %*% m)) + 2, "\n")
