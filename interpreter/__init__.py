"""interpreter: a self-hosted, sandboxed Code Interpreter API."""

__version__ = "0.1.0"
