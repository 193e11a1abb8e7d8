# syntax=docker/dockerfile:1
# One image for all five hometeam services; the command picks the service:
#   docker run ... hometeam:dev python -m services.ingest             (HTTP 8081)
#   docker run ... hometeam:dev python -m services.team_routing       (HTTP 8082)
#   docker run ... hometeam:dev python -m services.conversation_state (HTTP 8083)
#   docker run ... hometeam:dev python -m services.timeout_sweeper    (HTTP 8084)
#   docker run ... hometeam:dev python -m services.metrics            (HTTP 8085)
#   docker run ... hometeam:dev python scripts/stack_probe.py create-topics --bootstrap kafka:9092
# Settings are environment variables (see shared/settings.py and services/*/app.py).
# Set HTTP_PORT to the service's port: the HEALTHCHECK below reads it.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# --------------------------------------------------------------------------- builder
FROM ${PYTHON_IMAGE} AS builder

# The same uv as scripts/bootstrap.sh, from PyPI.
ARG UV_VERSION=0.13.9
RUN pip install --no-cache-dir --disable-pip-version-check "uv==${UV_VERSION}"

ENV UV_PROJECT_ENVIRONMENT=/opt/venv \
    UV_COMPILE_BYTECODE=1 \
    UV_LINK_MODE=copy \
    UV_PYTHON_DOWNLOADS=never \
    UV_PYTHON=/usr/local/bin/python3.11

WORKDIR /src
COPY pyproject.toml uv.lock ./
# Only the locked runtime dependencies: no dev group, and not the project itself (its code
# is copied as source into the runtime stage).
RUN uv sync --frozen --no-dev --no-install-project

# --------------------------------------------------------------------------- runtime
FROM ${PYTHON_IMAGE} AS runtime

RUN groupadd --system --gid 10001 hometeam \
    && useradd --system --uid 10001 --gid hometeam --home-dir /nonexistent --no-create-home \
       --shell /usr/sbin/nologin hometeam

COPY --from=builder /opt/venv /opt/venv

WORKDIR /app
# Root-owned and read-only for the service user.
COPY shared/ /app/shared/
COPY services/ /app/services/
COPY scripts/stack_probe.py /app/scripts/stack_probe.py
# The team directory's default copy. Kubernetes mounts its ConfigMap over this directory and
# compose bind-mounts deploy/teams.yaml here, so every service reads the same file.
COPY deploy/teams.yaml /etc/hometeam/teams/teams.yaml
RUN python -m compileall -q /app/shared /app/services /app/scripts

ENV PATH=/opt/venv/bin:$PATH \
    PYTHONPATH=/app \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HTTP_HOST=0.0.0.0 \
    TEAMS_CONFIG=/etc/hometeam/teams/teams.yaml

USER 10001:10001
EXPOSE 8081 8082 8083 8084 8085

# Liveness of whichever service runs: /healthz on $HTTP_PORT (8080 is ServiceSettings' default).
HEALTHCHECK --interval=15s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('HTTP_PORT', '8080'), timeout=4)"]

CMD ["python", "-m", "services.ingest"]
