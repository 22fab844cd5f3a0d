# One image for every Parley service; the compose file picks the service by command.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PARLEY_LOG_FORMAT=json
RUN apt-get update && apt-get install -y --no-install-recommends make && rm -rf /var/lib/apt/lists/*
WORKDIR /app

# Dependencies first, so code changes reuse the layer.
COPY requirements.txt requirements-dev.txt pyproject.toml Makefile ./
COPY services/__init__.py services/__init__.py
RUN make venv
COPY protos protos
RUN make protos
COPY services services

ENV PATH=/app/.venv/bin:$PATH
EXPOSE 50051 50052 50053 50054 8080 8081
CMD ["python", "-m", "services.ingest"]
