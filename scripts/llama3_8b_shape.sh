#!/usr/bin/env bash
# Writes a Llama-3-8B-shaped model folder (config and tokenizer, no weights) for `--load-format dummy`:
# what the GPU server benchmarks serve.   scripts/llama3_8b_shape.sh DIR
set -euo pipefail
python3 "$(dirname "$0")/make_tiny_model.py" "$1" --layers 32 --hidden 4096 --heads 32 --kv-heads 8 \
  --head-dim 128 --intermediate 14336 --vocab 128256 --max-positions 40960 --rope-theta 500000 \
  --dtype bfloat16 --no-weights >/dev/null
