"""The test harness's own tests (tests/sse_client.py)."""
