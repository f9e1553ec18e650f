"""Route table compilation and pure request matching (no I/O, no aiohttp.web)."""
