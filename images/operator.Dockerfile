# syntax=docker/dockerfile:1
# The operator (kopf): `python -m commoncanvas_operator`. Build from the repository root:
#   docker build -f images/operator.Dockerfile -t commoncanvas-operator .
#
# The operator reads the spec models and unit markers from the core package but never runs a model,
# so the ML stack is left out (tests/unit/test_images.py imports every operator module with it
# blocked). pyproject.toml stays the one place that pins versions; images/requirements.py picks the subset.
ARG PYTHON_IMAGE=python:3.11.14-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
COPY pyproject.toml README.md ./
COPY images/requirements.py images/requirements.py
ARG SKIP_DEPS="torch torchvision transformers diffusers huggingface-hub accelerate tokenizers \
mosaicml-streaming scikit-image clean-fid"
RUN python images/requirements.py --skip "$SKIP_DEPS" pyproject.toml > /tmp/requirements.txt \
    && pip install --requirement /tmp/requirements.txt
COPY services services
COPY operator operator
RUN pip install --no-deps . \
    && python -m compileall -q /opt/venv/lib

FROM ${PYTHON_IMAGE}
LABEL org.opencontainers.image.title="commoncanvas-operator" \
      org.opencontainers.image.description="CommonCanvas operator (ScrapeJob, CaptionJob, TrainRun)" \
      org.opencontainers.image.licenses="Apache-2.0"
RUN useradd --uid 10001 --user-group --create-home --shell /usr/sbin/nologin commoncanvas
COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
WORKDIR /home/commoncanvas
USER 10001:10001
# Metrics (/metrics) for the chart's ServiceMonitor.
EXPOSE 8080
ENTRYPOINT ["python", "-m", "commoncanvas_operator"]
