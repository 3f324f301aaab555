"""Requests/s and proxy overhead of `cacheproxy serve`, against the engine's own time.

Starts `cacheproxy serve` (the built-in tiny model by default) on 127.0.0.1, then for each concurrency
level sends non-streaming chat requests (fixed output length: greedy, ignore_eos) and records, per
request, the client-observed latency and the engine time the server reports in its `Server-Timing`
header (`engine;dur=`: engine submission to last output, as the handler sees it). Overhead = client
latency - engine time: HTTP, JSON, validation, chat template + tokenization, and event-loop hops.
Streaming is measured too: client TTFT vs the TTFT the server recorded for the same request (its
records log; the server's TTFT starts when the handler starts, after the body is read).

It also runs the same requests on an in-process AsyncEngine without HTTP (engine-only requests/s), so
that the server's requests/s can be read against what the engine alone does on this machine.

    .venv/bin/python scripts/bench_server.py [--model PATH] [--requests 200] [--concurrency 1,8,32,64]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from cacheproxy.cache.records import percentile, read_records  # noqa: E402
from cacheproxy.log import configure as configure_logging  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def messages(i: int) -> list[dict[str, str]]:
    # A shared system prompt (cached after the first request) and a distinct question per request.
    return [{"role": "system", "content": "You answer questions about the cacheproxy code base briefly. " * 4},
            {"role": "user", "content": f"Question {i}: which module handles request number {i * 13}?"}]


def chat_body(i: int, max_tokens: int, stream: bool = False) -> dict[str, Any]:
    return {"model": "bench", "messages": messages(i), "max_tokens": max_tokens, "temperature": 0,
            "ignore_eos": True, "stream": stream}


def server_timing(header: str, name: str) -> float:
    for part in header.split(","):
        key, _, dur = part.strip().partition(";dur=")
        if key == name:
            return float(dur) / 1000
    raise ValueError(f"no {name} in Server-Timing: {header}")


def ms(x: float | None) -> str:
    return "-" if x is None else f"{x * 1000:.2f}"


async def run_level(url: str, concurrency: int, total: int, max_tokens: int) -> dict[str, Any]:
    latencies: list[float] = []
    engine: list[float] = []
    overhead: list[float] = []
    next_i = 0

    async def worker(session: aiohttp.ClientSession) -> None:
        nonlocal next_i
        while next_i < total:
            i, next_i = next_i, next_i + 1
            start = time.perf_counter()
            async with session.post(url + "/v1/chat/completions", json=chat_body(i, max_tokens)) as resp:
                body = await resp.read()
                elapsed = time.perf_counter() - start
                if resp.status != 200:
                    raise RuntimeError(f"{resp.status}: {body[:300]!r}")
                eng = server_timing(resp.headers["Server-Timing"], "engine")
            latencies.append(elapsed)
            engine.append(eng)
            overhead.append(elapsed - eng)

    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:
        start = time.perf_counter()
        await asyncio.gather(*(worker(session) for _ in range(concurrency)))
        wall = time.perf_counter() - start
    return {
        "concurrency": concurrency, "requests": total, "rps": total / wall,
        "latency_p50": percentile(latencies, 50), "latency_p99": percentile(latencies, 99),
        "engine_p50": percentile(engine, 50),
        "overhead_p50": percentile(overhead, 50), "overhead_p99": percentile(overhead, 99),
        "overhead_mean": statistics.fmean(overhead),
    }


async def run_stream_ttft(url: str, total: int, max_tokens: int) -> dict[str, float]:
    """Client TTFT (request sent -> first content chunk), one request at a time, by response id."""
    client_ttft: dict[str, float] = {}
    async with aiohttp.ClientSession() as session:
        for i in range(total):
            start = time.perf_counter()
            async with session.post(url + "/v1/chat/completions", json=chat_body(10_000 + i, max_tokens, True)) as r:
                first = None
                async for line in r.content:
                    if first is None and line.startswith(b"data: {") and b'"content":"' in line \
                            and b'"role"' not in line:
                        first = time.perf_counter() - start
                assert first is not None
                client_ttft["chatcmpl-" + r.headers["X-Request-Id"]] = first
    return client_ttft


def stream_summary(client_ttft: dict[str, float], records_path: Path) -> dict[str, Any]:
    """Pairs each streamed request's client TTFT with the TTFT the server recorded for it."""
    server_ttft = {r.id: r.ttft_s for r in read_records(records_path) if r.id in client_ttft and r.ttft_s}
    gaps = [client_ttft[k] - v for k, v in server_ttft.items()]
    return {"requests": len(server_ttft),
            "client_ttft_p50": percentile(list(client_ttft.values()), 50),
            "client_ttft_p99": percentile(list(client_ttft.values()), 99),
            "server_ttft_p50": percentile(list(server_ttft.values()), 50),
            "ttft_overhead_p50": percentile(gaps, 50), "ttft_overhead_p99": percentile(gaps, 99)}


async def engine_only(settings_kwargs: dict[str, Any], concurrency: int, total: int, max_tokens: int
                      ) -> dict[str, Any]:
    """The same chat requests straight on an AsyncEngine in this process: no HTTP, no JSON."""
    from cacheproxy.config import Settings
    from cacheproxy.engine.async_engine import AsyncEngine
    from cacheproxy.engine.request import GenerationRequest, SamplingParams

    engine = AsyncEngine(Settings(**settings_kwargs))
    await engine.start()
    tok = engine.tokenizer
    prompts = [tok.encode(tok.apply_chat_template(messages(i)), add_special_tokens=False) for i in range(total)]
    next_i = 0
    times: list[float] = []

    async def worker() -> None:
        nonlocal next_i
        while next_i < total:
            i, next_i = next_i, next_i + 1
            start = time.perf_counter()
            params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
            async for _ in engine.generate(GenerationRequest(f"e{concurrency}-{i}", prompts[i], params, "bench")):
                pass
            times.append(time.perf_counter() - start)

    try:
        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - start
    finally:
        await engine.shutdown()
    return {"concurrency": concurrency, "rps": total / wall, "latency_p50": percentile(times, 50)}


def start_server(args: argparse.Namespace, data_dir: Path, port: int) -> subprocess.Popen[bytes]:
    cmd = [sys.executable, "-m", "cacheproxy.cli", "serve", "--host", "127.0.0.1", "--port", str(port),
           "--data-dir", str(data_dir), "--device", args.device, "--served-model-name", "bench",
           "--max-num-seqs", str(max(args.concurrency)), "--kv-cache-bytes", str(args.kv_cache_bytes),
           "--log-level", "WARNING", "--log-json"]
    if args.model:
        cmd += ["--model", args.model]
    env = {**os.environ, "PYTHONPATH": str(REPO), "CACHEPROXY_CONFIG": str(data_dir / "none.toml")}
    with (data_dir / "server.log").open("wb") as log:  # the child keeps its own copy of the descriptor
        return subprocess.Popen(cmd, cwd=data_dir, env=env, stdout=subprocess.DEVNULL, stderr=log)


async def wait_healthy(url: str, proc: subprocess.Popen[bytes], timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    async with aiohttp.ClientSession() as session:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited with {proc.returncode}")
            try:
                async with session.get(url + "/health") as r:
                    if r.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.2)
    raise RuntimeError("server did not become healthy")


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    data_dir = Path(args.data_dir or tempfile.mkdtemp(prefix="bench-server-"))
    data_dir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = start_server(args, data_dir, port)
    results: dict[str, Any] = {"server": [], "engine_only": []}
    try:
        await wait_healthy(url, proc)
        await run_level(url, 4, 16, args.max_tokens)  # warm-up: tokenizer, template, allocator
        for c in args.concurrency:
            results["server"].append(await run_level(url, c, args.requests, args.max_tokens))
        client_ttft = await run_stream_ttft(url, args.stream_requests, args.max_tokens)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
    results["stream"] = stream_summary(client_ttft, data_dir / "records.jsonl")  # flushed at shutdown
    if args.engine_baseline:
        kwargs: dict[str, Any] = {"data_dir": data_dir, "device": args.device, "served_model_name": "bench",
                                  "max_num_seqs": max(args.concurrency), "kv_cache_bytes": args.kv_cache_bytes}
        if args.model:
            kwargs["model"] = args.model
        for c in args.concurrency:
            results["engine_only"].append(await engine_only(kwargs, c, args.requests, args.max_tokens))
    return results


def print_table(results: dict[str, Any], args: argparse.Namespace) -> None:
    engine_rps = {r["concurrency"]: r["rps"] for r in results["engine_only"]}
    print(f"\nnon-streaming chat, {args.requests} requests a level, {args.max_tokens} tokens out (greedy, ignore_eos)")
    print("| concurrency | server req/s | engine-only req/s | latency p50 / p99 ms | engine p50 ms "
          "| overhead p50 / p99 ms |")
    print("|---|---|---|---|---|---|")
    for r in results["server"]:
        eo = engine_rps.get(r["concurrency"])
        print(f"| {r['concurrency']} | {r['rps']:.1f} | {'-' if eo is None else f'{eo:.1f}'} | "
              f"{ms(r['latency_p50'])} / {ms(r['latency_p99'])} | {ms(r['engine_p50'])} | "
              f"{ms(r['overhead_p50'])} / {ms(r['overhead_p99'])} |")
    s = results["stream"]
    print(f"\nstreaming, one at a time ({s['requests']} requests): client TTFT p50 {ms(s['client_ttft_p50'])} ms, "
          f"p99 {ms(s['client_ttft_p99'])} ms; server-recorded TTFT p50 {ms(s['server_ttft_p50'])} ms; "
          f"client - server p50 {ms(s['ttft_overhead_p50'])} ms, p99 {ms(s['ttft_overhead_p99'])} ms")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="model folder or hub id (default: the built-in tiny model)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--data-dir", default=None)
    p.add_argument("--requests", type=int, default=200)
    p.add_argument("--stream-requests", type=int, default=50)
    p.add_argument("--concurrency", default="1,8,32,64", type=lambda s: [int(x) for x in s.split(",")])
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--kv-cache-bytes", type=int, default=64 << 20)
    p.add_argument("--no-engine-baseline", dest="engine_baseline", action="store_false")
    p.add_argument("--json", action="store_true", help="print the raw results as JSON too")
    args = p.parse_args()
    configure_logging("WARNING")  # the in-process engine of the baseline logs only problems
    results = asyncio.run(main_async(args))
    print_table(results, args)
    if args.json:
        print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
