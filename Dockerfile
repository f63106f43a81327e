# syntax=docker/dockerfile:1
# Threadline: three stages. `web` builds the web client (web/, Vite) from the committed lock
# file; `build` puts that build into the Python package (server/webdist) and installs the package
# and its dependencies into a virtualenv; the runtime stage copies only that virtualenv onto a
# slim Python and runs as a non-root user.
# Configuration comes from THREADLINE_* environment variables at run time: no secret is ever
# written into an image layer (see .dockerignore and docs/operations.md).
#
#   docker build -t threadline .
#   docker run -p 8000:8000 -v threadline-data:/data \
#     -e THREADLINE_ENV=production -e THREADLINE_JWT_SECRET=... \
#     -e THREADLINE_DATABASE_URL=postgresql://... threadline

ARG PYTHON_VERSION=3.11
ARG NODE_VERSION=20

FROM node:${NODE_VERSION}-bookworm-slim AS web
WORKDIR /src/web
COPY web/package.json web/package-lock.json ./
RUN npm ci --no-audit --no-fund
COPY web/index.html web/vite.config.ts web/tsconfig.json ./
COPY web/public ./public
COPY web/src ./src
# vite.config.ts writes the build to ../server/webdist, i.e. /src/server/webdist.
RUN npm run build && test -f /src/server/webdist/index.html

FROM python:${PYTHON_VERSION}-slim-bookworm AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
WORKDIR /src
RUN python -m venv /opt/threadline
# Only what the package needs to build: no tests, no local data, no .env (and .dockerignore).
COPY pyproject.toml README.md ./
COPY server ./server
COPY actors ./actors
COPY migrations ./migrations
# The built client is package data of `server` (pyproject.toml), so the wheel carries it.
COPY --from=web /src/server/webdist ./server/webdist
RUN /opt/threadline/bin/pip install --upgrade pip wheel \
 && /opt/threadline/bin/pip wheel --no-deps --wheel-dir /wheels . \
 && /opt/threadline/bin/pip install /wheels/*.whl
# server/migrate.py finds the migrations at Path(server.__file__).parent.parent / "migrations":
# ship them next to the installed package, in site-packages.
RUN site="$(/opt/threadline/bin/python -c 'import pathlib, server; print(pathlib.Path(server.__file__).parent.parent)')" \
 && cp -r migrations "$site/migrations" \
 && find "$site/migrations" -name '__pycache__' -prune -exec rm -rf {} + \
 && /opt/threadline/bin/python -c 'from server import migrate; assert migrate.MIGRATIONS_DIR.is_dir(); print("head", migrate.head_revision())' \
 && /opt/threadline/bin/python -c 'from server import webui; assert (webui.DIST_DIR / "index.html").is_file(), "web client missing from the wheel"'

FROM python:${PYTHON_VERSION}-slim-bookworm AS runtime
LABEL org.opencontainers.image.title="threadline" \
      org.opencontainers.image.description="Ops-first, actor-based realtime server for AI chat products" \
      org.opencontainers.image.licenses="Apache-2.0"
RUN groupadd --system --gid 10001 threadline \
 && useradd --system --uid 10001 --gid threadline --home-dir /data --shell /usr/sbin/nologin threadline \
 && mkdir -p /data \
 && chown threadline:threadline /data
COPY --from=build /opt/threadline /opt/threadline
ENV PATH="/opt/threadline/bin:${PATH}" \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    XDG_RUNTIME_DIR=/tmp \
    THREADLINE_HOST=0.0.0.0 \
    THREADLINE_PORT=8000 \
    THREADLINE_DATA_DIR=/data \
    THREADLINE_LOG_FORMAT=json
# The embedded PostgreSQL (used when THREADLINE_DATABASE_URL is unset) and the generated JWT key
# live here: mount a volume, or the data is lost with the container.
VOLUME ["/data"]
WORKDIR /data
USER 10001:10001
EXPOSE 8000
# Liveness only (/healthz never touches the database); orchestrators should probe /readyz too.
# The slim image has no curl: python's urllib fails (non-zero exit) on errors and non-2xx answers.
HEALTHCHECK --interval=15s --timeout=5s --start-period=30s --retries=3 \
  CMD python -c "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('THREADLINE_PORT', '8000'), timeout=3)"
# SIGTERM starts a graceful shutdown: /readyz says draining, WebSocket clients get close 1001.
STOPSIGNAL SIGTERM
ENTRYPOINT ["threadline"]
CMD ["serve"]
