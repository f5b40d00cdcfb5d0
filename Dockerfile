# batchfeed: the loader server (`batchfeed serve`) and the example trainer, in one image.
#
#   docker compose up                                     # python:3.11-slim, from PyPI
#   docker build --build-arg BASE_IMAGE=batchfeed-base:bookworm -t batchfeed .   # offline
#
# Dependencies come from docker/wheels/ when it holds wheels (fetched on the host with
# `pip download`, see DEVELOPERS.md), with --no-index so the build needs no network at all.
# Otherwise they come from PyPI.  The entrypoint is `batchfeed`; the trainers override it.
#
# At run time it needs no root and writes nothing outside /dev/shm (and /tmp): it runs as the
# numeric user 10001:10001, so Kubernetes can check runAsNonRoot, and works with a read-only
# root filesystem (deploy/k8s/).
ARG BASE_IMAGE=python:3.11-slim

# ---- dependencies, in a venv, in their own stage: the wheels never reach the final image
FROM ${BASE_IMAGE} AS deps
ARG TORCH_VERSION=2.13.0
# Set this to a CPU-only wheel index to keep a PyPI build from pulling a CUDA torch.
ARG TORCH_INDEX_URL=
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1 PIP_ROOT_USER_ACTION=ignore
# "docker/wheel[s]" matches nothing when the folder is missing; pyproject.toml keeps the COPY
# from having no source at all.  The project's dependencies are read from pyproject.toml, so
# this layer is rebuilt only when they or the wheels change, not on every source edit.
COPY pyproject.toml docker/wheel[s] /tmp/deps/
RUN set -eu; \
    python3 -m venv /opt/venv; \
    requirements="$(python3 -c 'import tomllib; \
        print(" ".join(tomllib.load(open("/tmp/deps/pyproject.toml", "rb"))["project"]["dependencies"]))')"; \
    if ls /tmp/deps/*.whl >/dev/null 2>&1; then \
        source="--no-index --find-links /tmp/deps"; \
    elif [ -n "$TORCH_INDEX_URL" ]; then \
        source="--extra-index-url $TORCH_INDEX_URL"; \
    else \
        source=""; \
    fi; \
    echo "installing torch==$TORCH_VERSION tqdm $requirements from: ${source:-PyPI}"; \
    /opt/venv/bin/pip install $source "torch==$TORCH_VERSION" tqdm $requirements \
        "setuptools>=68" wheel

# ---- the application
FROM ${BASE_IMAGE}
# PYTHONDONTWRITEBYTECODE: the installed packages are compiled at build time; nothing else
# should try to write .pyc files next to the code at run time (a read-only root in Kubernetes).
ENV VIRTUAL_ENV=/opt/venv PATH=/opt/venv/bin:$PATH PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1 PIP_ROOT_USER_ACTION=ignore
COPY --from=deps /opt/venv /opt/venv
# What the package is made of (see [tool.setuptools] in pyproject.toml), and the examples.
# Not "COPY . ": that would copy docker/wheels into the image too.
COPY pyproject.toml README.md /tmp/src/
COPY batchfeed /tmp/src/batchfeed
COPY server /tmp/src/server
COPY client /tmp/src/client
COPY shared /tmp/src/shared
COPY examples /tmp/src/examples
# Installed, not run from the source tree: the repo's top-level server/, client/ and shared/
# folders become batchfeed.server, .client and .shared only when installed.
RUN set -eu; \
    pip install --no-deps --no-build-isolation /tmp/src; \
    mkdir -p /app; \
    cp -r /tmp/src/examples /app/examples; \
    rm -rf /tmp/src; \
    groupadd --gid 10001 batchfeed; \
    useradd --no-log-init --create-home --uid 10001 --gid 10001 batchfeed
# Numeric, so that a runtime can tell it is not root without reading /etc/passwd
# (Kubernetes' runAsNonRoot; deploy/k8s sets runAsUser 10001 as well).
USER 10001:10001
WORKDIR /app
ENTRYPOINT ["batchfeed"]
CMD ["--help"]
