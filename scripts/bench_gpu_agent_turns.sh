#!/usr/bin/env bash
# An agent session's turns at a ~32k-token history against `cacheproxy serve` on a GPU (Llama-3-8B shape,
# random weights), once with the server's defaults and once with each SERVE_ARGS variant given, one
# server after the other on the same machine: scripts/bench_agent_turns.py against each.
#   scripts/bench_gpu_agent_turns.sh OUT_DIR ["--tokenized-prompts-bytes 0" ...]
set -euo pipefail
out=${1:-/tmp/cacheproxy-agent-turns}
shift || true
mkdir -p "$out"
work=$(mktemp -d)
port=${PORT:-8012}
scripts/llama3_8b_shape.sh "$work/llama3-8b-shape"
run() {  # $1: label, $2: extra serve flags
  python3 -m cacheproxy.cli serve --model "$work/llama3-8b-shape" --load-format dummy --device cuda \
    --data-dir "$work/data-$1" --port "$port" $2 >"$out/server-$1.log" 2>&1 &
  local server=$!
  for _ in $(seq 600); do
    python3 -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:$port/health', timeout=1)" 2>/dev/null && break
    kill -0 $server 2>/dev/null || { tail -30 "$out/server-$1.log"; exit 1; }
    sleep 0.5
  done
  python3 scripts/bench_agent_turns.py --url "http://127.0.0.1:$port" --label "$1" ${TURNS_ARGS:-} | tee -a "$out/turns.jsonl"
  kill -INT $server; wait $server || true
}
run default ""
i=0
for variant in "$@"; do
  i=$((i + 1))
  run "variant$i" "$variant"
done
