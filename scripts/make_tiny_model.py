#!/usr/bin/env python
"""Write the built-in tiny test model (random weights, locally trained tokenizer) in Hugging Face format.

python scripts/make_tiny_model.py OUT_DIR --arch llama|llama3|mistral|qwen2|qwen3 --seed N
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cacheproxy.engine.tiny_model import ARCHITECTURES, DEFAULTS, make_tiny_model

__all__ = ["main", "make_tiny_model"]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out_dir", type=Path)
    ap.add_argument("--arch", choices=sorted(ARCHITECTURES), default="llama")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--layers", type=int, default=DEFAULTS["num_hidden_layers"])
    ap.add_argument("--hidden", type=int, default=DEFAULTS["hidden_size"])
    ap.add_argument("--heads", type=int, default=DEFAULTS["num_attention_heads"])
    ap.add_argument("--kv-heads", type=int, default=DEFAULTS["num_key_value_heads"])
    ap.add_argument("--head-dim", type=int, default=DEFAULTS["head_dim"])
    ap.add_argument("--intermediate", type=int, default=DEFAULTS["intermediate_size"])
    ap.add_argument("--max-positions", type=int, default=DEFAULTS["max_position_embeddings"])
    ap.add_argument("--rope-theta", type=float, default=DEFAULTS["rope_theta"])
    ap.add_argument("--vocab", type=int, default=DEFAULTS["vocab_size"])
    ap.add_argument("--tie-word-embeddings", action="store_true")
    ap.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=DEFAULTS["dtype"])
    ap.add_argument("--shards", type=int, default=1, help="split the weights over N safetensors files")
    ap.add_argument(
        "--no-weights", action="store_true", help="config and tokenizer only: serve with CACHEPROXY_LOAD_FORMAT=dummy"
    )
    args = ap.parse_args(argv)
    out = make_tiny_model(
        args.out_dir,
        arch=args.arch,
        seed=args.seed,
        num_hidden_layers=args.layers,
        hidden_size=args.hidden,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        head_dim=args.head_dim,
        intermediate_size=args.intermediate,
        max_position_embeddings=args.max_positions,
        rope_theta=args.rope_theta,
        vocab_size=args.vocab,
        tie_word_embeddings=args.tie_word_embeddings,
        dtype=args.dtype,
        shards=args.shards,
        weights=not args.no_weights,
    )
    print(out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
