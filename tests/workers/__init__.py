"""The tools (workers/): the load tool, the bench, the demo."""
