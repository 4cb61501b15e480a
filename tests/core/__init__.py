"""The core (api/core): the hub, the flusher, the SSE format."""
