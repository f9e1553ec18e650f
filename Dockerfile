# syntax=docker/dockerfile:1
# Sandgate image: non-root (uid 1000), runs with a read-only root filesystem; the only writable
# path it needs is /tmp (an emptyDir in Kubernetes, `--tmpfs /tmp` with `docker run --read-only`).
ARG PYTHON_IMAGE=python:3.11-slim

# --- build: the wheel, then a venv with it and its dependencies ------------------------------
FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY gateway ./gateway
RUN python -m pip wheel --no-deps --wheel-dir /wheels . \
 && python -m venv /opt/sandgate \
 && /opt/sandgate/bin/pip install /wheels/*.whl
# pip compiled the .pyc files above: at run time nothing may (or needs to) write them.

# --- runtime --------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE}
ENV PATH=/opt/sandgate/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/tmp \
    TMPDIR=/tmp
RUN groupadd --gid 1000 sandgate \
 && useradd --uid 1000 --gid 1000 --home-dir /tmp --no-create-home --shell /usr/sbin/nologin sandgate
# Same path as in the build stage, so the venv's scripts keep their interpreter line.
COPY --from=build /opt/sandgate /opt/sandgate
# Defaults; a deployment mounts its own (see k8s/README.md).
COPY routes.yaml /etc/sandgate/routes.yaml
COPY policies/ /etc/sandgate/policies/
USER 1000:1000
WORKDIR /tmp
EXPOSE 8080 9901
HEALTHCHECK --interval=30s --timeout=3s --start-period=10s \
  CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:9901/healthz', timeout=2)"]
ENTRYPOINT ["sandgate"]
CMD ["serve", "--routes", "/etc/sandgate/routes.yaml", "--policies", "/etc/sandgate/policies", "--admin", "0.0.0.0:9901"]
