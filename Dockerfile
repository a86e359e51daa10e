# syntax=docker/dockerfile:1
# budgetgate image. It is not built on the development machines (no container engine there):
# tests/deploy/test_deploy_files.py checks this file by parsing it.
#
#   docker build -t budgetgate .
#   docker run -p 8080:8080 -v budgetgate-data:/srv/data \
#     -e BUDGETGATE_UPSTREAM_URL=http://litellm:4000 -e BUDGETGATE_UPSTREAM_API_KEY=... budgetgate
#
# Dependencies are pinned by requirements.lock and installed before the source is copied, so a
# code change does not reinstall them. Regenerate the lock after changing pyproject.toml's
# dependencies or upgrading .venv: `make lock` (scripts/lock.py; the runtime dependencies only,
# at the versions the tests ran against).
ARG PYTHON_IMAGE=python:3.11-slim

FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
COPY requirements.lock ./
# Exactly the locked set: --no-deps lets nothing unlisted in; `pip check` below fails the build
# if the lock misses a dependency of the project or of a locked package.
RUN pip install --no-deps -r requirements.lock
COPY pyproject.toml README.md alembic.ini ./
COPY app ./app
COPY migrations ./migrations
RUN pip install --no-deps . && pip check

FROM ${PYTHON_IMAGE}
ENV PATH=/opt/venv/bin:$PATH PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
# A numeric USER (below) lets Kubernetes verify runAsNonRoot without a runAsUser.
RUN groupadd --system --gid 10001 budgetgate \
    && useradd --system --uid 10001 --gid 10001 --home-dir /srv --no-create-home \
       --shell /usr/sbin/nologin budgetgate \
    && mkdir -p /srv/data && chown 10001:10001 /srv/data
COPY --from=build /opt/venv /opt/venv
# Alembic reads migrations/ and alembic.ini from the working directory (app/migrate.py).
COPY --from=build /src/migrations /srv/migrations
COPY --from=build /src/alembic.ini /srv/alembic.ini
WORKDIR /srv
# BUDGETGATE_PORT is the image's, not a gateway setting: the command and the health check both
# read it, so `-e BUDGETGATE_PORT=9000` moves the server and its check together.
# The SQLite ledger (the default; one gateway process) lives in the volume. For PostgreSQL set
# BUDGETGATE_DATABASE_URL=postgresql+asyncpg://... and run `budgetgate migrate` as a deploy step.
ENV BUDGETGATE_PORT=8080 \
    BUDGETGATE_DATABASE_URL=sqlite+aiosqlite:////srv/data/budgetgate.db
VOLUME ["/srv/data"]
USER 10001:10001
EXPOSE 8080
# /healthz: the process answers (it does not touch the database; /readyz does). No curl in the
# slim image: the standard library does it; any error or non-2xx status exits non-zero.
HEALTHCHECK --interval=15s --timeout=3s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % (os.environ.get('BUDGETGATE_PORT') or '8080'), timeout=2)"]
# exec: budgetgate becomes PID 1 and receives SIGTERM itself (graceful drain), not the shell.
CMD ["sh", "-c", "exec budgetgate serve --host 0.0.0.0 --port \"${BUDGETGATE_PORT:-8080}\""]
