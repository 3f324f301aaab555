"""TTFT of an agent session's turns at a long history, through the server and the openai client.

One chat session whose history is --history-words long (system prompt and turns of random words; the
tiny tokenizer makes ~2.4 tokens of a word, so 13,000 words are ~32k tokens: the rows show the count),
then --turns turns, each the last prompt plus the answer and a short user message: the first turn
is cold, every later one a GPU-tier hit on all but its new tokens. TTFT = the first streamed chunk
(the server sends it with the first token, whatever its text). Run it against servers that differ in one setting to see what that setting costs a turn.

    python scripts/bench_agent_turns.py --url http://127.0.0.1:8000 [--history-words 13000] [--turns 6]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
import uuid
from typing import Any

import openai

WORDS = ["read", "the", "file", "path", "error", "value", "returns", "None", "and", "so", "on", "def", "class",
         "import", "tool", "result", "call", "next", "step", "done"]  # fmt: skip


def _text(rng: random.Random, words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(words))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--url", default="http://127.0.0.1:8000")
    ap.add_argument("--history-words", type=int, default=13000)
    ap.add_argument("--turns", type=int, default=6)
    ap.add_argument("--label", default="")
    args = ap.parse_args()
    rng = random.Random(0)
    client = openai.OpenAI(base_url=args.url + "/v1", api_key="x", max_retries=0, timeout=600)
    model = client.models.list().data[0].id
    words = min(2000, args.history_words // 2)
    msgs: list[dict[str, Any]] = [{"role": "system", "content": _text(rng, words)}]
    while words < args.history_words:
        turn_words = min(400, (args.history_words - words + 1) // 2)
        msgs += [{"role": "user", "content": _text(rng, turn_words)},
                 {"role": "assistant", "content": _text(rng, turn_words)}]  # fmt: skip
        words += 2 * turn_words
    salt = uuid.uuid4().hex  # this run's own namespace: nothing of an earlier run is reused
    rows = []
    for turn in range(args.turns):
        msgs.append({"role": "user", "content": _text(rng, 40)})
        t0 = time.perf_counter()
        ttft, answer, usage = None, "", None
        stream = client.chat.completions.create(
            model=model, messages=msgs, max_tokens=8, temperature=0, stream=True,  # type: ignore[arg-type]
            stream_options={"include_usage": True}, extra_body={"cache_salt": salt, "ignore_eos": True},
        )  # fmt: skip
        for chunk in stream:
            if chunk.choices and ttft is None:  # the server sends the first chunk with the first token
                ttft = time.perf_counter() - t0
            if chunk.choices:
                answer += chunk.choices[0].delta.content or ""
            if chunk.usage is not None:
                usage = chunk.usage
        msgs.append({"role": "assistant", "content": answer})
        assert usage is not None and ttft is not None
        cached = usage.prompt_tokens_details.cached_tokens if usage.prompt_tokens_details else 0
        row = {"label": args.label, "turn": turn, "prompt_tokens": usage.prompt_tokens, "cached_tokens": cached,
               "ttft_ms": round(1e3 * ttft, 2)}  # fmt: skip
        rows.append(row)
        print(json.dumps(row), flush=True)
    later = [r["ttft_ms"] for r in rows[1:]]
    if later:
        print(json.dumps({"label": args.label, "hit_turns_ttft_ms_median": statistics.median(later),
                          "min": min(later), "max": max(later)}), flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
