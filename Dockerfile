# syntax=docker/dockerfile:1
# cellgate images. Targets:
#   runtime (the default, last stage): CPU serving image — the serve extra only, no PyTorch, demo model inside.
#   gpu:     the same service on ONNX Runtime's CUDA provider (CELLGATE_PROVIDERS=cuda,cpu).
#   demo-model: trains and exports the demo bundle (PyTorch lives here and goes no further).
# Build: docker build -t cellgate:0.1.0 .   |   docker build --target gpu -t cellgate:0.1.0-gpu .
# tests/deploy/test_dockerfile.py runs the runtime stage's install and entrypoint commands outside Docker.

ARG PYTHON_IMAGE=python:3.11.11-slim-bookworm
ARG CUDA_IMAGE=nvidia/cuda:12.6.3-cudnn-runtime-ubuntu24.04

# --- serve-venv: the serve extra in a virtualenv that the runtime stage copies whole -----------------
FROM ${PYTHON_IMAGE} AS serve-venv
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONDONTWRITEBYTECODE=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
COPY pyproject.toml README.md ./
COPY cellgate/ cellgate/
COPY vocab/ vocab/
COPY export/ export/
COPY service/ service/
# This repository by path (DL3013 is about registry packages); the dependency ranges are in pyproject.toml.
# hadolint ignore=DL3013
RUN pip install --no-cache-dir ".[serve]"

# --- demo-model: train + export the demo bundle, so `docker compose up` serves a model with no manual step
FROM ${PYTHON_IMAGE} AS demo-model
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONDONTWRITEBYTECODE=1
WORKDIR /src
# The CPU wheel of the pinned torch: PyPI's default Linux wheel drags in gigabytes of CUDA libraries.
RUN pip install --no-cache-dir --index-url https://download.pytorch.org/whl/cpu "torch==2.13.0"
COPY pyproject.toml README.md ./
COPY cellgate/ cellgate/
COPY vocab/ vocab/
COPY model/ model/
COPY export/ export/
COPY service/ service/
# This repository by path (DL3013 is about registry packages); the dependency ranges are in pyproject.toml.
# hadolint ignore=DL3013
RUN pip install --no-cache-dir ".[train]"
RUN cellgate train --corpus builtin:longrange --out runs/demo --quiet \
    && cellgate export runs/demo --out bundles/demo

# --- gpu-venv / gpu: ONNX Runtime on CUDA 12 + cuDNN 9 (what onnxruntime-gpu 1.20+ is built against) ------
FROM ${CUDA_IMAGE} AS gpu-venv
# Ubuntu 24.04's Python 3.12 from the pinned base image; apt versions follow that image.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/*
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONDONTWRITEBYTECODE=1
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
COPY pyproject.toml README.md ./
COPY cellgate/ cellgate/
COPY vocab/ vocab/
COPY export/ export/
COPY service/ service/
# onnxruntime and onnxruntime-gpu install the same `onnxruntime` module: swap the CPU build for the GPU one.
# This repository by path (DL3013 is about registry packages); the dependency ranges are in pyproject.toml.
# hadolint ignore=DL3013
RUN pip install --no-cache-dir ".[serve]" \
    && pip uninstall -y onnxruntime \
    && pip install --no-cache-dir "onnxruntime-gpu>=1.20,<2"

FROM ${CUDA_IMAGE} AS gpu
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 cellgate \
    && useradd --system --uid 10001 --gid cellgate --no-create-home --shell /usr/sbin/nologin cellgate
COPY --from=gpu-venv /opt/venv /opt/venv
COPY --from=demo-model /src/bundles/demo /app/bundles/demo
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    CELLGATE_HOST=0.0.0.0 \
    CELLGATE_PORT=8000 \
    CELLGATE_BUNDLE=/app/bundles/demo \
    CELLGATE_PROVIDERS=cuda,cpu \
    CELLGATE_DRAIN_TIMEOUT_SECONDS=10
WORKDIR /app
USER 10001:10001
EXPOSE 8000
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=15s --timeout=3s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('CELLGATE_PORT', '8000'), timeout=2)"]
ENTRYPOINT ["cellgate"]
CMD ["serve"]

# --- runtime: the CPU serving image (default target) ---------------------------------------------------
FROM ${PYTHON_IMAGE} AS runtime
RUN groupadd --system --gid 10001 cellgate \
    && useradd --system --uid 10001 --gid cellgate --no-create-home --shell /usr/sbin/nologin cellgate
COPY --from=serve-venv /opt/venv /opt/venv
COPY --from=demo-model /src/bundles/demo /app/bundles/demo
# The drain timeout (uvicorn's graceful shutdown) stays below compose's stop_grace_period (20 s) and the
# Kubernetes terminationGracePeriodSeconds minus the preStop pause, so in-flight requests finish before SIGKILL.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    CELLGATE_HOST=0.0.0.0 \
    CELLGATE_PORT=8000 \
    CELLGATE_BUNDLE=/app/bundles/demo \
    CELLGATE_DRAIN_TIMEOUT_SECONDS=10
WORKDIR /app
USER 10001:10001
EXPOSE 8000
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=15s --timeout=3s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('CELLGATE_PORT', '8000'), timeout=2)"]
# One process, one uvicorn worker (`cellgate serve` never forks): scale with replicas, not workers.
ENTRYPOINT ["cellgate"]
CMD ["serve"]
