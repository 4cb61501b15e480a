# Herald API node (and the demo producer, with another command).
FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY api ./api
COPY broker ./broker
COPY workers ./workers
COPY ops ./ops
RUN pip install --no-cache-dir .
ENV HERALD_HOST=0.0.0.0 HERALD_PORT=8000
EXPOSE 8000
CMD ["python", "-m", "api"]
