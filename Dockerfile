# syntax=docker/dockerfile:1
#
# duckswap: the loader and `server.workers` HTTP workers on port 8080 (README, ARCHITECTURE.md).
#
#   docker build -t duckswap .
#   docker run --rm -p 8080:8080 duckswap             # the bundled demo (written at first start)
#   docker run --rm -p 8080:8080 --stop-timeout 30 \
#       -v ./my.toml:/etc/duckswap/duckswap.toml:ro -v duckswap-data:/var/lib/duckswap \
#       duckswap duckswap serve --config /etc/duckswap/duckswap.toml
#   docker run --rm -v ./my.toml:/etc/duckswap/duckswap.toml:ro \
#       duckswap duckswap check-config /etc/duckswap/duckswap.toml
#
# `docker stop` waits 10 s by default before SIGKILL; the server's own stop takes up to
# server.drain_seconds + server.shutdown_seconds (default 0 + 10) plus a few seconds for its
# children, so give it 30 (`--stop-timeout 30`, `docker stop -t 30`, compose `stop_grace_period`).
# Kubernetes: deploy/kubernetes/.
#
# Pin the base by digest (python:3.11-slim@sha256:...) for reproducible builds.

# --- builder: the duckswap wheel and every runtime dependency as a wheel ----------------------
FROM python:3.11-slim AS builder
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore
WORKDIR /src
# What the build context holds is set by .dockerignore (no .venv, .git, tests, docs, ...).
COPY . .
# The project is pure Python (setuptools); its dependencies are taken as wheels from the index.
# No test or bench extras: `pip wheel .` resolves [project.dependencies] only.
RUN python -m pip wheel --no-cache-dir --wheel-dir /wheels .

# --- runtime: the wheels installed, nothing else (no compiler, no source tree, no pip cache) ---
FROM python:3.11-slim AS runtime

# tini as PID 1. The server handles SIGTERM itself (drains, stops its workers and build
# processes, reaps them, exits 0), and does so as PID 1 too; but as PID 1 the kernel gives it no
# default signal actions, and it inherits every orphan. Both were seen with the server as PID 1
# of its own PID namespace: a SIGTERM sent while Python was still starting, before the server
# installs its handlers, was ignored (the server went on to serve, until the grace period's
# SIGKILL); and the orphans of a killed process (a forkserver the server then kept between
# itself and its build processes, as the OOM killer might kill one) were handed to PID 1, which
# reaps only the children it started: one stayed a zombie. tini forwards SIGTERM and SIGINT to
# the server, reaps orphans, and exits with the server's exit code (with tini, the early SIGTERM
# ended the server at once, and no zombie was left). So no `docker run --init` is needed, and
# Kubernetes gets the same.
RUN apt-get update \
    && apt-get install -y --no-install-recommends tini \
    && rm -rf /var/lib/apt/lists/*

# A fixed, numeric, non-root uid/gid, so Kubernetes' runAsNonRoot can check it and volumes can
# be given to it (fsGroup 10001).
RUN groupadd --system --gid 10001 duckswap \
    && useradd --system --uid 10001 --gid 10001 --home-dir /home/duckswap --create-home \
        --shell /usr/sbin/nologin duckswap

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore
# The wheels are bind-mounted from the builder, never copied into a layer; --no-index: only
# what the builder resolved is installed. Byte code is compiled here, at install time, so the
# running server writes nothing outside its data dir (a read-only root file system works).
RUN --mount=type=bind,from=builder,source=/wheels,target=/wheels \
    python -m pip install --no-cache-dir --no-index --find-links=/wheels duckswap \
    && duckswap --version \
    && python -c "from serving.cli import DEMO_CONFIG; assert DEMO_CONFIG.is_file(), DEMO_CONFIG"

# The config is mounted at /etc/duckswap/duckswap.toml (a file or a ConfigMap); the data dir
# (verified versions, state.json, answers files, downloads in progress) is a volume owned by
# the server's user.
RUN mkdir -p /etc/duckswap /var/lib/duckswap \
    && chown 10001:10001 /var/lib/duckswap \
    && chmod 0750 /var/lib/duckswap

# Every config key can be set as DUCKSWAP_<SECTION>__<KEY>, the value read as TOML (README,
# Config); the environment wins over the config file. A container listens on every address,
# and keeps its data in the volume: set these here, not in each config. (Another data dir:
# set DUCKSWAP_SERVER__DATA_DIR, since it overrides the config's server.data_dir.)
# The default, one HTTP worker per CPU the process may use, follows a CPU quota (`--cpus`,
# rounded down); without one it counts every CPU of the host: set DUCKSWAP_SERVER__WORKERS.
ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    DUCKSWAP_SERVER__HOST='"0.0.0.0"' \
    DUCKSWAP_SERVER__DATA_DIR='"/var/lib/duckswap"'

# `duckswap serve` without --config writes the demo export into ./duckswap-demo: the working
# dir is the user's home, writable by it. (With a mounted config nothing is written here.)
WORKDIR /home/duckswap
USER 10001:10001
VOLUME /var/lib/duckswap
EXPOSE 8080

# Liveness, not readiness: /healthz answers 200 as soon as the workers listen, whatever the
# data (/readyz waits for the first export to be loaded and warmed: minutes on big data). No
# curl in the image: Python's urllib, which exits non-zero on a refused connection, a timeout
# or any non-2xx answer. The port follows DUCKSWAP_SERVER__PORT (a --port flag or a port set
# in the config file is not seen here: set the variable instead). The start period covers the
# demo's first write (~5 s on 2 cores) and a worker's start.
HEALTHCHECK --interval=10s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('DUCKSWAP_SERVER__PORT', '8080'), timeout=4)"]

STOPSIGNAL SIGTERM
# Exec form throughout: no shell between tini and the server, so SIGTERM reaches the server.
# The command is the whole `duckswap ...` line, so `docker run IMAGE duckswap serve --config
# FILE` (or `duckswap check-config FILE`, `duckswap demo`) replaces it.
ENTRYPOINT ["/usr/bin/tini", "--"]
CMD ["duckswap", "serve"]
