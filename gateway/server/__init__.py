"""The running process: listeners, the request handler, admin endpoints, logs, reload."""
