# syntax=docker/dockerfile:1
# CPU worker: runs `commoncanvas scrape unit|finalize` (the ScrapeJob's Indexed Job pods) and the other
# CPU-only commands (plan, crds). Build from the repository root:
#   docker build -f images/worker.Dockerfile -t commoncanvas-worker .
#
# The scrape stage never imports the ML stack (tests/unit/test_images.py checks that with those
# modules blocked), so this image leaves it out: PyPI's torch wheel alone pulls ~4 GB of CUDA
# libraries. Caption, latents and training run in worker-gpu.Dockerfile, which installs everything.
# pyproject.toml stays the one place that pins versions; images/requirements.py picks the subset.
ARG PYTHON_IMAGE=python:3.11.14-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
# Dependencies first: this layer is rebuilt only when pyproject.toml changes, not on every source edit.
COPY pyproject.toml README.md ./
COPY images/requirements.py images/requirements.py
ARG SKIP_DEPS="torch torchvision transformers diffusers huggingface-hub accelerate tokenizers \
mosaicml-streaming scikit-image kopf kubernetes clean-fid"
RUN python images/requirements.py --skip "$SKIP_DEPS" pyproject.toml > /tmp/requirements.txt \
    && pip install --requirement /tmp/requirements.txt
COPY services services
COPY operator operator
# --no-deps: the subset above is what this image needs; the package metadata still lists the full stack.
RUN pip install --no-deps . \
    && python -m compileall -q /opt/venv/lib

FROM ${PYTHON_IMAGE}
LABEL org.opencontainers.image.title="commoncanvas-worker" \
      org.opencontainers.image.description="CommonCanvas CPU worker (scrape stage)" \
      org.opencontainers.image.licenses="Apache-2.0"
RUN useradd --uid 10001 --user-group --create-home --shell /usr/sbin/nologin commoncanvas
COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
WORKDIR /home/commoncanvas
USER 10001:10001
# The metrics port the operator's pods pass as --metrics-port.
EXPOSE 9090
ENTRYPOINT ["commoncanvas"]
CMD ["--help"]
