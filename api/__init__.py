"""Herald API node: FastAPI app, hub and SSE streams."""
