# syntax=docker/dockerfile:1
# Salvo on the CPU, for machines without a GPU:
#   docker build -t salvo:cpu .
#   docker run -p 8001:8001 -p 8002:8002 -v "$PWD/models:/models:ro" salvo:cpu
# Dockerfile.gpu is the same file but for the lines between "variant" markers (the runtime
# base and the torch build); tests/e2e/test_deploy_static.py keeps the rest identical.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm
# variant: begin
# (Dockerfile.gpu declares its CUDA base image here.)
# variant: end

# Requirement lists exported from pyproject.toml. This stage sees only pyproject.toml and the
# exporter, so the dependency layers below are rebuilt when dependencies change, not on a code
# change.
FROM ${PYTHON_IMAGE} AS requirements
WORKDIR /src
COPY pyproject.toml deploy/docker/requirements.py ./
RUN python requirements.py pyproject.toml /requirements

# Builds the wheel. The stubs are regenerated from proto/ so the image never ships stale ones;
# grpcio-tools and the build backend stay in this stage.
FROM ${PYTHON_IMAGE} AS builder
WORKDIR /src
COPY --from=requirements /requirements/build.txt /tmp/build.txt
RUN pip install --no-cache-dir -r /tmp/build.txt
COPY pyproject.toml README.md ./
COPY proto/ proto/
COPY tools/gen_protos.py tools/
COPY client/ client/
COPY server/ server/
RUN python tools/gen_protos.py \
    && pip wheel --no-cache-dir --no-deps --no-build-isolation -w /dist .

# variant: begin
FROM ${PYTHON_IMAGE} AS runtime
# The CPU build of torch, pinned like the Makefile's TORCH_SPEC: a bare `torch` would pull a
# multi-GB CUDA build that this image cannot use.
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
# variant: end

# Dependencies first, each in its own layer, heaviest first: a code change reaches only the
# wheel layer below them.
ENV VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
RUN python3 -m venv /opt/venv \
    && pip install --no-cache-dir --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}"
COPY --from=requirements /requirements/runtime.txt /tmp/runtime.txt
RUN pip install --no-cache-dir -r /tmp/runtime.txt
# The wheel is bind-mounted from the builder, so no copy of it stays in a layer. --no-deps:
# everything it needs is installed above, and `pip check` fails the build if that drifts.
RUN --mount=type=bind,from=builder,source=/dist,target=/tmp/dist \
    pip install --no-cache-dir --no-deps /tmp/dist/salvo-*.whl \
    && pip check

COPY deploy/docker/healthcheck.py /usr/local/bin/salvo-healthcheck
# A numeric uid, so that Kubernetes' runAsNonRoot can verify it without reading /etc/passwd.
RUN groupadd --system --gid 10001 salvo \
    && useradd --system --uid 10001 --gid 10001 --create-home --home-dir /home/salvo salvo \
    && mkdir /models \
    && chown 10001:10001 /models

# Defaults for a container; every one can be overridden with -e or a flag (`salvo serve --help`).
# SALVO_HOST: listen on all interfaces (the server's own default, 127.0.0.1, suits a laptop).
# SALVO_MODEL_REPOSITORY: the mounted volume below.
# SALVO_SHUTDOWN_GRACE_S, SALVO_DRAIN_TIMEOUT_S: on SIGTERM the server keeps serving for the
#   grace (load balancers move away), then drains for up to the timeout; `docker stop -t`
#   and Kubernetes' terminationGracePeriodSeconds must be longer than both together.
# SALVO_TORCH_THREADS: 0 keeps torch's default, one thread per core the container sees.
ENV SALVO_HOST=0.0.0.0 \
    SALVO_GRPC_PORT=8001 \
    SALVO_HTTP_PORT=8002 \
    SALVO_MODEL_REPOSITORY=/models \
    SALVO_SHUTDOWN_GRACE_S=5 \
    SALVO_DRAIN_TIMEOUT_S=30 \
    SALVO_TORCH_THREADS=0 \
    SALVO_LOG_LEVEL=INFO
# The model repository is mounted, never baked in: one image serves any repository.
VOLUME ["/models"]
# 8001: gRPC (v2 inference, grpc.health.v1, reflection). 8002: HTTP /metrics, /v2/health/*.
EXPOSE 8001 8002

USER 10001:10001
WORKDIR /home/salvo
# Healthy means gRPC health SERVING: every model loaded and not draining. The start period
# covers loading the models.
HEALTHCHECK --interval=10s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python3", "/usr/local/bin/salvo-healthcheck"]
STOPSIGNAL SIGTERM
ENTRYPOINT ["salvo"]
CMD ["serve"]
