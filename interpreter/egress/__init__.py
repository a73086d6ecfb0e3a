"""Sandbox network access for package installs (ENABLE_SANDBOX_NETWORK): the allowlist, the registries it
is derived from, the CONNECT proxy, each sandbox's own network namespace, and per-tenant package caches."""
