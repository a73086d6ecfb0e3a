"""The HTTP/WebSocket API: thin Quart-trio blueprints over the components main.py wires together."""
