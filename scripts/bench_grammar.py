"""Host cost of structured outputs: compiling a JSON schema and computing a batch's token masks per step.

The masks are computed on the host while the device runs the step (engine/grammar.py), so what matters
is how a batch's mask time compares with a decode step. Runs the engine's own GrammarCompiler over a
model folder's tokenizer (`--model`; default: the tiny model's tokenizer trained at `--vocab`), walks
each sequence through the schema by random allowed tokens, and reports per-step mask time by batch size.

    python scripts/bench_grammar.py [--model DIR] [--vocab 32000] [--batches 1 8 32] [--steps 60]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cacheproxy.engine.grammar import GrammarCompiler
from cacheproxy.engine.request import StructuredOutput
from cacheproxy.engine.tiny_model import make_tiny_model
from cacheproxy.engine.tokenizer import Tokenizer

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer"},
        "email": {"type": "string", "format": "email"},
        "tags": {"type": "array", "items": {"type": "string"}},
        "address": {"type": "object", "properties": {"city": {"type": "string"}, "zip": {"type": "string"}},
                    "required": ["city"]},
    },
    "required": ["name", "age", "tags", "address"],
}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="a model folder with tokenizer.json (default: the tiny model's tokenizer)")
    ap.add_argument("--vocab", type=int, default=32000, help="vocabulary the tiny tokenizer is trained to")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--steps", type=int, default=60)
    args = ap.parse_args()
    folder = Path(args.model) if args.model else make_tiny_model(
        Path(tempfile.mkdtemp()) / "tok", "llama", weights=False, vocab_size=args.vocab)  # fmt: skip
    tok = Tokenizer(folder)
    config = json.loads((folder / "config.json").read_text())
    vocab = max(int(config.get("vocab_size", 0)), tok.vocab_size)
    compiler = GrammarCompiler(tok.to_json, vocab, tok.eos_token_ids)
    spec = StructuredOutput("json_schema", json.dumps(SCHEMA))
    t0 = time.perf_counter()
    compiler.check(spec)
    first = time.perf_counter() - t0
    print(f"tokenizer {folder}: {tok.vocab_size} tokens (masks over {vocab}); "
          f"tokenizer set-up + first compile {first * 1e3:.1f} ms")  # fmt: skip
    t0 = time.perf_counter()
    for i in range(20):  # distinct schemas: the compile cost without the cache
        compiler.check(StructuredOutput("json_schema", json.dumps({**SCHEMA, "title": f"s{i}"})))
    print(f"compile of a new schema: {(time.perf_counter() - t0) / 20 * 1e3:.2f} ms")
    rng = np.random.default_rng(0)
    for batch in args.batches:
        matchers = [compiler.matcher(spec) for _ in range(batch)]
        masks = np.zeros((batch, compiler.mask_words), dtype=np.int32)
        times = []
        for _ in range(args.steps):
            t0 = time.perf_counter()
            for i, m in enumerate(matchers):
                m.fill_mask(masks[i])
            times.append(time.perf_counter() - t0)
            for i, m in enumerate(matchers):
                if m.done:  # start over: every step keeps the whole batch structured
                    matchers[i] = m = compiler.matcher(spec)
                    continue
                allowed = np.nonzero(np.unpackbits(masks[i].view(np.uint8), bitorder="little"))[0]
                m.accept(int(rng.choice(allowed)))
        times.sort()
        print(f"batch {batch:3d}: masks per step median {statistics.median(times) * 1e3:.3f} ms, "
              f"p90 {times[int(0.9 * len(times))] * 1e3:.3f} ms, max {times[-1] * 1e3:.3f} ms")  # fmt: skip


if __name__ == "__main__":
    main()
