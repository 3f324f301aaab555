# syntax=docker/dockerfile:1
# cacheproxy on a CUDA GPU: the proxy with its engine (`cacheproxy serve`, the default) or the router
# (`cacheproxy route --backend ...`). Used by docker-compose.yml; alone:
#   docker build -t cacheproxy . && docker run --gpus 1 -p 8000:8000 -v cacheproxy-data:/data cacheproxy
# The base image brings a CUDA build of PyTorch (and Triton, which our kernels need); pip keeps it.
ARG BASE_IMAGE=pytorch/pytorch:2.5.1-cuda12.4-cudnn9-runtime
FROM ${BASE_IMAGE}

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HOME=/data/huggingface \
    CACHEPROXY_HOST=0.0.0.0 \
    CACHEPROXY_PORT=8000 \
    CACHEPROXY_DATA_DIR=/data \
    CACHEPROXY_LOG_JSON=true

# A compiler and xxhash.h build the C hash chain (cacheproxy/cache/_hashchain.c); without them the
# package still installs and hashes in Python, slower.
RUN apt-get update && apt-get install -y --no-install-recommends build-essential libxxhash-dev \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /opt/cacheproxy
COPY . .
# Non-editable install of the package with the Redis client, and what `cacheproxy report` (charts) and
# `cacheproxy bench` (the openai client) need inside the container; torch is already satisfied by the base.
RUN python -m pip install ".[redis,triton,report,bench]" \
    && python -c "import cacheproxy.cli, cacheproxy.cache._hashchain, redis, triton, torch, matplotlib, openai; print('torch', torch.__version__, 'cuda', torch.version.cuda)"

# An unprivileged user owns the data dir (the named volume is initialised from it).
RUN useradd --create-home --uid 1000 cacheproxy \
    && mkdir -p /data \
    && chown cacheproxy:cacheproxy /data
USER cacheproxy
VOLUME ["/data"]
EXPOSE 8000

# 200 once the model is loaded (503 while it loads); the router's /health is 200 while a replica is up.
HEALTHCHECK --interval=15s --timeout=5s --start-period=300s --retries=3 \
    CMD python -c "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health' % os.environ.get('CACHEPROXY_PORT', '8000'), timeout=4)"

# SIGTERM: a graceful shutdown that finishes requests in flight and flushes blocks to disk/Redis.
STOPSIGNAL SIGTERM
ENTRYPOINT ["cacheproxy"]
CMD ["serve"]
