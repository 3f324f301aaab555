#!/usr/bin/env bash
# One GPU session's check-and-bench in one go (~8 minutes on an H200; on an H100 tests/gpu alone took 5.6
# minutes, 143 tests, 2026-11-27):
# the C extension with optimisation, tests/gpu, the TTFT table (with transformers), the kernel tables,
# the mixed workload against a server, and a long agent session's turns. Everything lands in OUT_DIR (default $OUT or /tmp/gpu-check).
#   scripts/gpu_check.sh [OUT_DIR]
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-${OUT:-/tmp/gpu-check}}
mkdir -p "$out"
commit=${COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$out/card.txt"
# The host's Python may build extensions without optimisation: the admission paths are 7-10x slower then.
CFLAGS="-O3 ${CFLAGS:-}" python3 setup.py -q build_ext --inplace >"$out/build.log" 2>&1 || echo "C extension not built (Python fallbacks)"
timeout 450 python3 -m pytest -q -p no:cacheprovider -o addopts="" tests/gpu 2>&1 | tail -5 | tee "$out/gpu_tests.txt"
COMMIT=$commit OUT=$out timeout 300 python3 scripts/bench_ttft.py --profile-host >"$out/ttft.txt" 2>&1
grep -E "^\||gpu_hit_repeat" "$out/ttft.txt"
GIT_COMMIT=$commit timeout 120 python3 scripts/bench_kernels.py --out "$out/kernels.md" >"$out/kernels.log" 2>&1
grep -E "^\| (1|8|64|2048|8192|32768) " "$out/kernels.md"
timeout 150 bash scripts/bench_gpu_server.sh "$out/server" --requests 200 --concurrency 8 2>&1 | tail -7
# a long agent session's turns, with the server's prompt encoder and without (prompts tokenized whole)
timeout 150 bash scripts/bench_gpu_agent_turns.sh "$out/agent_turns" "--tokenized-prompts-bytes 0" 2>&1 | grep median
