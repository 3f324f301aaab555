#!/usr/bin/env bash
# Sets up (if needed) and runs the test suite. pytest exits 5 when no test ran: that fails too.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh dev
exec .venv/bin/python -m pytest -q "$@"
