"""The HTTP routes (api/routes) against real nodes: publish, subscribe, resume, metrics, the dashboard, the docs."""
