"""What structured outputs and the Responses API cost against a running server, through the openai client.

1. Decode: N concurrent chat requests of `--tokens` tokens each (ignore_eos), sampled at temperature 1:
   without a seed, with a seed, with a JSON schema (`response_format`; the schema may end a text
   early), with a strict tool offered (tool_choice "auto": free text until the model opens a call),
   and with a call forced (tool_choice "required"; the call may end early): tokens/s and time per request.
2. A Responses conversation of `--turns` turns chained by previous_response_id: TTFT (the first stream
   event, sent with the first token) and cached tokens per turn (all but each turn's new input is a hit).

    python scripts/bench_api_features.py --url http://127.0.0.1:8000 [--concurrency 8] [--tokens 128]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
import uuid
from typing import Any

import openai

SCHEMA = {
    "type": "object",
    "properties": {
        "title": {"type": "string"},
        "steps": {"type": "array", "items": {"type": "string"}},
        "done": {"type": "boolean"},
    },
    "required": ["title", "steps", "done"],
}
TOOL = {"type": "function", "function": {"name": "save_plan", "strict": True, "parameters": SCHEMA}}
SYSTEM = "You are a careful planning assistant for a team of engineers. " * 40


async def _decode(client: openai.AsyncOpenAI, model: str, n: int, tokens: int, kind: str) -> dict[str, float]:
    salt = uuid.uuid4().hex
    extra: dict[str, Any] = {"cache_salt": salt, "ignore_eos": True}

    async def one(i: int) -> tuple[float, int, str]:
        t0 = time.perf_counter()
        kw: dict[str, Any] = {}
        if kind == "seeded":
            kw["seed"] = i
        if kind == "json_schema":
            kw["response_format"] = {"type": "json_schema", "json_schema": {"name": "plan", "schema": SCHEMA}}
        if kind in ("tools", "forced_call"):
            kw["tools"] = [TOOL]
            kw["tool_choice"] = "auto" if kind == "tools" else "required"
        r = await client.chat.completions.create(
            model=model, messages=[{"role": "system", "content": SYSTEM}, {"role": "user", "content": f"Plan {i}."}],
            max_tokens=tokens, temperature=1.0, extra_body=extra, **kw,
        )  # fmt: skip
        assert r.usage is not None
        return time.perf_counter() - t0, r.usage.completion_tokens, r.choices[0].finish_reason or ""

    await one(-1)  # the shared prefix (and the schema) once, before timing
    t0 = time.perf_counter()
    results = await asyncio.gather(*(one(i) for i in range(n)))
    wall = time.perf_counter() - t0
    out = sum(r[1] for r in results)
    return {"wall_s": wall, "tokens": out, "tokens_per_s": out / wall,
            "request_s_median": sorted(r[0] for r in results)[n // 2],
            "finish": ",".join(sorted({r[2] for r in results}))}  # type: ignore[dict-item]  # fmt: skip


async def _conversation(client: openai.AsyncOpenAI, model: str, turns: int) -> list[dict[str, float]]:
    rows = []
    previous = None
    salt = uuid.uuid4().hex
    for turn in range(turns):
        t0 = time.perf_counter()
        stream = await client.responses.create(
            model=model, instructions=SYSTEM, input=f"Turn {turn}: what next?", previous_response_id=previous,
            max_output_tokens=32, stream=True, extra_body={"cache_salt": salt},
        )  # fmt: skip
        ttft = None
        final = None
        async for event in stream:
            if ttft is None:  # response.created goes out with the first token (its text may come later)
                ttft = time.perf_counter() - t0
            if event.type in ("response.completed", "response.incomplete"):
                final = event.response
        assert final is not None and final.usage is not None
        previous = final.id
        rows.append({"turn": turn, "ttft_ms": 1e3 * (ttft if ttft is not None else time.perf_counter() - t0),
                     "input_tokens": final.usage.input_tokens,
                     "cached_tokens": final.usage.input_tokens_details.cached_tokens})  # fmt: skip
    return rows


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--url", default="http://127.0.0.1:8000")
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--turns", type=int, default=6)
    args = ap.parse_args()
    async with openai.AsyncOpenAI(base_url=args.url + "/v1", api_key="x", max_retries=0, timeout=600) as client:
        model = (await client.models.list()).data[0].id
        report: dict[str, Any] = {}
        for name in ("unseeded", "seeded", "json_schema", "tools", "forced_call", "unseeded again"):
            report[name] = await _decode(client, model, args.concurrency, args.tokens, name.split()[0])
            print(f"{name:12s} {json.dumps(report[name])}", flush=True)
        report["responses_turns"] = await _conversation(client, model, args.turns)
        for row in report["responses_turns"]:
            print(f"responses turn {json.dumps(row)}", flush=True)


if __name__ == "__main__":
    asyncio.run(main())
