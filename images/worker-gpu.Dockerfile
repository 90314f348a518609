# syntax=docker/dockerfile:1
# GPU worker: `commoncanvas caption|latents unit` and the TrainRun's torchrun workers. Build from the
# repository root:
#   docker build -f images/worker-gpu.Dockerfile -t commoncanvas-worker-gpu .
#
# Base: NVIDIA's CUDA "base" flavour, pinned by exact tag. The PyPI torch wheel carries its own CUDA
# runtime, cuBLAS, cuDNN and NCCL (torch 2.15 is built for CUDA 13.x), so the "runtime" flavour would
# only add a second copy of those libraries; what the base image contributes is the CUDA 13 driver
# requirement and the NVIDIA_* variables the container toolkit reads. Needs a host driver >= 580.
ARG CUDA_IMAGE=nvidia/cuda:13.0.1-base-ubuntu24.04

FROM ${CUDA_IMAGE} AS build
ENV DEBIAN_FRONTEND=noninteractive \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
# Ubuntu 24.04's Python 3.12 (pyproject allows 3.11-3.13). Exact apt versions are not pinned: Ubuntu
# replaces them with security updates, so a pin would break the build; the base tag pins the release.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3.12 python3.12-venv \
    && rm -rf /var/lib/apt/lists/*
RUN python3.12 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
COPY pyproject.toml README.md ./
COPY images/requirements.py images/requirements.py
# Everything (diffusers, transformers, torch, mosaicml-streaming) plus the `gpu` extra (NVML); kopf is
# the operator's.
ARG SKIP_DEPS="kopf"
RUN python images/requirements.py --extra gpu --skip "$SKIP_DEPS" pyproject.toml > /tmp/requirements.txt \
    && pip install --requirement /tmp/requirements.txt
COPY services services
COPY operator operator
RUN pip install --no-deps . \
    && python -m compileall -q /opt/venv/lib/python3.12/site-packages/commoncanvas

FROM ${CUDA_IMAGE}
LABEL org.opencontainers.image.title="commoncanvas-worker-gpu" \
      org.opencontainers.image.description="CommonCanvas GPU worker (caption, latents, training)" \
      org.opencontainers.image.licenses="Apache-2.0"
ENV DEBIAN_FRONTEND=noninteractive
# Only the interpreter at run time; the venv's python links to /usr/bin/python3.12. See the build stage
# for why apt versions are not pinned.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3.12 \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --uid 10001 --user-group --create-home --shell /usr/sbin/nologin commoncanvas
COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility \
    HF_HOME=/home/commoncanvas/.cache/huggingface
WORKDIR /home/commoncanvas
USER 10001:10001
EXPOSE 9090
ENTRYPOINT ["commoncanvas"]
CMD ["--help"]
