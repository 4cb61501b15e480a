"""The node process (api/node): worker supervision, logs, the node registry."""
