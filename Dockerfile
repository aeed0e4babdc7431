# axguard: the confidence-check service, CPU build.
#   docker build -t axguard .
#   docker run -p 50051:50051 -p 9090:9090 axguard            # the bundled demo model
# Your model: mount it and point the settings at it (see README "Deploying"):
#   docker run -v $PWD/models:/models:ro -v $PWD/config:/config:ro \
#     -e AXGUARD_CONFIG_FILE=/config/axguard.yaml axguard
#
# One stage, torch in its own layer before any source: a source change rebuilds only the
# small last layers, and the multi-GB venv is written once (a second stage copied all of it
# again: a cold build here took 7 min 20 s that way). The base image has no compilers and
# nothing here compiles: every dependency installs from a wheel.

FROM python:3.11-slim-bookworm
LABEL org.opencontainers.image.title="axguard" \
      org.opencontainers.image.description="gRPC confidence check for PyTorch image classifiers"
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
# The working directory exists in the image: a read-only root filesystem (Kubernetes'
# readOnlyRootFilesystem, podman kube play) cannot create it at start.
RUN useradd --uid 10001 --no-create-home --shell /usr/sbin/nologin axguard \
    && mkdir -p /models /config /calibration /home/axguard \
    && chown 10001 /models /config /calibration /home/axguard \
    && python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
# torch first, from TORCH_INDEX_URL: the CPU-only wheels by default (the default PyPI torch
# is a multi-GB CUDA build); the GPU variant passes a CUDA index (see README "Deploying").
# PIP_EXTRA_ARGS lets a build reach other wheel stores (e.g. a local mirror).
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG PIP_EXTRA_ARGS=""
# hadolint ignore=SC2086,DL3013
RUN pip install --index-url "${TORCH_INDEX_URL}" ${PIP_EXTRA_ARGS} \
        torch==2.14.1 torchvision==0.29.1
COPY pyproject.toml README.md /src/
COPY service /src/service
COPY clients /src/clients
# The client distribution first: the server depends on it (axguard-client). Installed as
# wheels (not editable), so the sources can go.
# hadolint ignore=SC2086,DL3013
RUN pip install ${PIP_EXTRA_ARGS} /src/clients/python && pip install ${PIP_EXTRA_ARGS} /src \
    && rm -rf /src
ENV PYTHONUNBUFFERED=1 \
    AXGUARD_SERVER__HOST=0.0.0.0 \
    AXGUARD_METRICS__HOST=0.0.0.0
USER 10001
WORKDIR /home/axguard
EXPOSE 50051 9090
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 \
    CMD ["axguard", "health", "--target", "localhost:50051", "--timeout", "3"]
STOPSIGNAL SIGTERM
ENTRYPOINT ["axguard", "serve"]
