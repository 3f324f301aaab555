#!/usr/bin/env bash
# Creates .venv with everything cacheproxy needs (CPU torch unless a CUDA torch is already there).
# Idempotent: a second run only checks. Usage: scripts/setup.sh [dev]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
want_dev=${1:-}
stamp=.venv/.cacheproxy-setup${want_dev:+-dev}
# The tests start a real redis-server (and redis-cli for a Redis Cluster) on 127.0.0.1. Checked before
# the stamp, so a machine set up before this line (or one that lost the package) still gets it.
if [ -n "$want_dev" ] && ! { command -v redis-server && command -v redis-cli; } >/dev/null 2>&1; then
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  (export DEBIAN_FRONTEND=noninteractive; $SUDO apt-get update -qq && $SUDO apt-get install -y -qq redis-server >/dev/null) \
    || echo "warning: could not install redis-server; the Redis tests will fail" >&2
fi
# xxhash.h lets pip build the C prefix-hash chain (cacheproxy/cache/_hashchain.c, ~6x faster for long
# prompts); setup.py declares it optional, so without the header everything still installs and works.
if [ ! -f /usr/include/xxhash.h ]; then
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  (export DEBIAN_FRONTEND=noninteractive; $SUDO apt-get update -qq && $SUDO apt-get install -y -qq libxxhash-dev >/dev/null) \
    || echo "warning: could not install libxxhash-dev; block hashing falls back to its slower Python loop" >&2
fi
# Reinstall when the build inputs changed, or when the C chain is missing although it can be built now
# (an editable install compiles it only at install time).
c_chain_ok() { [ ! -f /usr/include/xxhash.h ] || .venv/bin/python -c 'import cacheproxy.cache._hashchain' 2>/dev/null; }
if [ -f "$stamp" ] && [ "$stamp" -nt pyproject.toml ] && [ "$stamp" -nt setup.py ] && [ "$stamp" -nt "$0" ] \
  && [ "$stamp" -nt cacheproxy/cache/_hashchain.c ] && c_chain_ok; then exit 0; fi
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip >/dev/null
# Pin the CPU build: an unpinned torch pulls a multi-GB CUDA build.
if ! .venv/bin/python -c 'import torch' >/dev/null 2>&1; then
  .venv/bin/python -m pip install -q "torch==${CACHEPROXY_TORCH_VERSION:-2.13.0}"
fi
# bench: `cacheproxy bench` drives the server through the openai client.
extras=redis,report,bench
[ -n "$want_dev" ] && extras=dev,redis,report,bench
.venv/bin/python -m pip install -q -e ".[${extras}]"
touch "$stamp"
