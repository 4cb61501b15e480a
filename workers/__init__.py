"""Herald producers and tools: the demo producer (python -m workers.demo) and the fan-out benchmark."""
