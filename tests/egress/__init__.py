"""What the sandbox-network tests need and production never has: a resolver that maps a registry's
name to a loopback package index, a server entry point that uses it, and that index."""
