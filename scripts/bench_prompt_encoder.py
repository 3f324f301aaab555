"""Host time to tokenize an agent's next chat prompt: whole, against from where it parts from the last one.

An agent session grows by a user turn and an answer each step; at each history length the next prompt
is tokenized whole (what a server without the encoder's memory does every request) and through
`PromptEncoder` after the previous prompt (the server's path). Median of --repeats; the ids are checked
equal each time.

    python scripts/bench_prompt_encoder.py [--model FOLDER] [--tokens 8000 32000 64000]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from cacheproxy.engine.tiny_model import make_tiny_model
from cacheproxy.engine.tokenizer import Tokenizer
from cacheproxy.server.prompt_encoder import PromptEncoder

WORDS = ["the", " file", " path", " error", " value", "\n", " returns", " None", " read", "(", ")", ":", " 42",
         " and", " so", " on", ".", " def", " class", " import"]  # fmt: skip


def _turn(rng: random.Random, words: int) -> str:
    return "".join(rng.choice(WORDS) for _ in range(words))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="a model folder whose tokenizer to use (default: the tiny model's)")
    ap.add_argument("--tokens", type=int, nargs="+", default=[8000, 32000, 64000])
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args()
    folder = Path(args.model) if args.model else make_tiny_model(Path(tempfile.mkdtemp()) / "m", "qwen2", weights=False)
    tok = Tokenizer(folder)
    rng = random.Random(0)
    rows = []
    for target in args.tokens:
        msgs: list[dict[str, Any]] = [{"role": "system", "content": _turn(rng, 1500)}]
        while len(tok.encode(tok.apply_chat_template(msgs), add_special_tokens=False)) < target:
            msgs += [{"role": "user", "content": _turn(rng, 400)}, {"role": "assistant", "content": _turn(rng, 400)}]
        before = tok.apply_chat_template(msgs)
        after = tok.apply_chat_template([*msgs, {"role": "user", "content": _turn(rng, 60)}])
        whole_s, reused_s = [], []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            want = tok.encode(after, add_special_tokens=False)
            whole_s.append(time.perf_counter() - t0)
            encoder = PromptEncoder(tok, 256 << 20)
            encoder.encode(before, "bench")
            t0 = time.perf_counter()
            got = encoder.encode(after, "bench")
            reused_s.append(time.perf_counter() - t0)
            assert got == want
        row = {"tokens": len(want), "whole_ms": 1e3 * statistics.median(whole_s),
               "reused_ms": 1e3 * statistics.median(reused_s), "enabled": encoder.enabled}  # fmt: skip
        rows.append(row)
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
