# Herald API node (and the demo producer, with another command).
FROM python:3.11-slim
WORKDIR /app
# uv at the version `make` uses, checked against its hashes; then exactly uv.lock's runtime versions (no dev tools,
# no extras: the load tool's report library stays out of the node's image).
COPY ops/uv-requirements.txt ops/
RUN pip install --no-cache-dir --require-hashes --no-deps -r ops/uv-requirements.txt
ENV UV_PROJECT_ENVIRONMENT=/app/.venv UV_PYTHON_DOWNLOADS=never UV_NO_CACHE=1
COPY pyproject.toml uv.lock README.md ./
RUN uv sync --locked --no-dev
COPY api ./api
COPY broker ./broker
# The node, and the demo's producer (compose runs it with another command); not the load tool or the bench.
COPY workers/__init__.py workers/demo.py workers/produce.py ./workers/
COPY ops ./ops
ENV PATH=/app/.venv/bin:$PATH HERALD_HOST=0.0.0.0 HERALD_PORT=8000
EXPOSE 8000
CMD ["python", "-m", "api"]
