"""Moving bytes between a client and an upstream: HTTP and WebSocket."""
