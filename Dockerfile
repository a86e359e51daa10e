# syntax=docker/dockerfile:1
# Multi-stage: dependencies are installed before the source is copied, so a code change
# does not reinstall them.
FROM python:3.11-slim AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
COPY pyproject.toml README.md ./
# Install the dependencies alone first (an empty package stands in for the source).
RUN mkdir app && touch app/__init__.py && pip install . && pip uninstall -y budgetgate
COPY app ./app
COPY migrations ./migrations
COPY alembic.ini ./
RUN pip install --no-deps .

FROM python:3.11-slim
ENV PATH=/opt/venv/bin:$PATH PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
RUN useradd --system --uid 10001 --home-dir /srv budgetgate \
    && mkdir -p /srv/data && chown budgetgate /srv/data
COPY --from=build /opt/venv /opt/venv
# Alembic reads migrations/ and alembic.ini next to the package.
COPY --from=build /src/migrations /srv/migrations
COPY --from=build /src/alembic.ini /srv/alembic.ini
WORKDIR /srv
USER budgetgate
ENV BUDGETGATE_DATABASE_URL=sqlite+aiosqlite:////srv/data/budgetgate.db
EXPOSE 8080
HEALTHCHECK --interval=15s --timeout=3s --start-period=10s --retries=3 \
    CMD python -c "import urllib.request,sys; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:8080/healthz', timeout=2).status == 200 else 1)"
CMD ["budgetgate", "serve", "--host", "0.0.0.0", "--port", "8080"]
