#!/usr/bin/env bash
# The CLI's mixed workload against `cacheproxy serve` on a GPU: a Llama-3-8B-shaped model with random
# weights (load_format=dummy: nothing to download), default tiers (pool, pinned CPU, LMDB disk).
#   scripts/bench_gpu_server.sh [OUT_DIR] [extra `cacheproxy bench` args]
# SERVE_ARGS adds `cacheproxy serve` flags, e.g. SERVE_ARGS="--kv-cache-bytes 2147483648" for a pool small
# enough that prefixes come back from the CPU tier.
# API_FEATURES=1 then runs scripts/bench_api_features.py against the same server (api_features.txt).
# Writes OUT_DIR/bench.json (summary + every request), bench.png, stats.json, server.log.
set -euo pipefail
out=${1:-/tmp/cacheproxy-gpu-bench}
shift || true
mkdir -p "$out"
work=$(mktemp -d)
port=${PORT:-8011}
scripts/llama3_8b_shape.sh "$work/llama3-8b-shape"
python3 -m cacheproxy.cli serve --model "$work/llama3-8b-shape" --load-format dummy --device cuda \
  --data-dir "$work/data" --port "$port" ${SERVE_ARGS:-} >"$out/server.log" 2>&1 &
server=$!
trap 'kill -INT $server 2>/dev/null || true; wait $server 2>/dev/null || true' EXIT
for _ in $(seq 600); do
  if python3 -c "import urllib.request,sys; urllib.request.urlopen('http://127.0.0.1:$port/health', timeout=1)" 2>/dev/null; then
    break
  fi
  kill -0 $server 2>/dev/null || { tail -30 "$out/server.log"; exit 1; }
  sleep 0.5
done
url="http://127.0.0.1:$port"
python3 -m cacheproxy.cli bench --url "$url" --workload mixed --seed 0 --png "$out/bench.png" --json "$@" >"$out/bench.json"
python3 -m cacheproxy.cli stats --url "$url" --json >"$out/stats.json" || true
if [ "${API_FEATURES:-0}" = 1 ]; then
  python3 scripts/bench_api_features.py --url "$url" | tee "$out/api_features.txt"
fi
python3 - "$out/bench.json" <<'PY'
import json, sys
s = json.load(open(sys.argv[1]))
s = s.get("summary", s)
print(f"requests {s['requests']} ok {s['ok']} wall {s['wall_s']:.1f} s; token hit rate {s['token_hit_rate']:.1%} "
      f"({s['cached_tokens']:,} of {s['prompt_tokens']:,}); requests with a hit {s['request_hit_rate']:.1%}")
for c, p in s["ttft_s"].items():
    if p["count"]:
        print(f"TTFT {c:8s} n={p['count']:4d} p50 {1e3 * p['p50']:.1f} ms p95 {1e3 * p['p95']:.1f} ms p99 {1e3 * p['p99']:.1f} ms")
for k, v in s.get("by_kind", {}).items():
    t = v["ttft_s"]
    print(f"{k}: {v['requests']} requests, hit rate {v['token_hit_rate']:.1%}, TTFT p50 {1e3 * (t['p50'] or 0):.1f} ms")
PY
