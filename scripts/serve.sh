#!/usr/bin/env bash
# Sets up (if needed) and serves; with no --model, the built-in tiny model. Extra flags go to `cacheproxy serve`.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
exec .venv/bin/cacheproxy serve "$@"
