"""Storage: the KV and Blobs protocols and their embedded (SQLite, directory) and distributed (Redis, S3) adapters."""
