"""Benchmark of the KV store's pieces on this machine: prefix hashing, the entry codec, CPU and disk tiers.

    .venv/bin/python scripts/bench_store.py [--blocks 128] [--dir /tmp/x]

Blocks have the Llama-3-8B shape (32 layers, K and V, 16 tokens, 8 KV heads, head_dim 128, bf16):
2 MiB a block, 128 KiB a token. Disk reads run right after the writes, so they come from the OS page
cache, not the device: they measure LMDB + decode + checksum, the floor of a disk-tier hit.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from cacheproxy.cache.block_entry import BlockEntry, decode, encode
from cacheproxy.cache.cpu_tier import CpuTier
from cacheproxy.cache.disk_tier import DiskTier
from cacheproxy.cache.hashing import BlockHasher, Namespace

BLOCK = 16
SHAPE = (32, 2, BLOCK, 8, 128)
DTYPE = torch.bfloat16
PROMPT_TOKENS = 128 * 1024


def _best_of(fn: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def _median_of(fn: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _entries(hasher: BlockHasher, n: int) -> list[BlockEntry]:
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(SHAPE, generator=gen).to(DTYPE)
    out, parent = [], hasher.root()
    for i in range(n):
        ids = tuple(range(i * BLOCK, (i + 1) * BLOCK))
        h = hasher.next_hash(parent, ids)
        tensor = base.clone()
        tensor.view(-1)[:BLOCK] = torch.tensor(ids, dtype=DTYPE)  # distinct content per block
        out.append(BlockEntry(h, parent, ids, tensor))
        parent = h
    return out


def _ttft_rows(n_tokens: int, where: Path | None) -> list[tuple[str, str]]:
    """Time to first token of the built-in tiny model on this machine: cold, then with the
    prompt's prefix only in the pool, only in the CPU tier, and only on disk after a restart."""
    from cacheproxy.config import Settings
    from cacheproxy.engine.engine import LLMEngine
    from cacheproxy.engine.request import GenerationRequest, SamplingParams
    from cacheproxy.engine.tiny_model import make_tiny_model

    rows: list[tuple[str, str]] = []
    with tempfile.TemporaryDirectory(dir=where) as tmp:
        model = make_tiny_model(Path(tmp) / "tiny", "llama")
        settings = Settings(
            model=str(model), data_dir=Path(tmp), device="cpu", cost_model=False,
            max_num_batched_tokens=4096, cpu_cache_bytes=256 << 20, disk_cache_bytes=1 << 30,
        )  # fmt: skip
        rng = np.random.default_rng(1)
        prompt = rng.integers(5, 2000, size=n_tokens).tolist()

        def ttft(engine: LLMEngine, rid: str, ids: list[int]) -> tuple[float, dict[str, int]]:
            start = time.perf_counter()
            engine.add_request(GenerationRequest(rid, ids, SamplingParams(max_tokens=1, temperature=0.0)))
            outs = []
            while not outs:
                outs = engine.step()
            return time.perf_counter() - start, outs[0].cached_tokens_by_tier

        engine = LLMEngine.from_settings(settings)
        ttft(engine, "warm-up", rng.integers(5, 2000, size=n_tokens).tolist())
        results = [("cold", *ttft(engine, "cold", prompt))]
        results.append(("GPU-tier (pool) hit", *ttft(engine, "pool", prompt)))
        engine.store.evict_gpu()
        results.append(("CPU-tier hit", *ttft(engine, "cpu", prompt)))
        engine.shutdown()
        engine = LLMEngine.from_settings(settings)  # a restart: only the disk holds the prefix
        results.append(("disk-tier hit after restart", *ttft(engine, "disk", prompt)))
        engine.shutdown()
    for name, seconds, tiers in results:
        rows.append((f"TTFT tiny model, {n_tokens} tokens, {name}", f"{seconds * 1e3:.1f} ms  cached {tiers or '-'}"))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--blocks", type=int, default=128, help="blocks written and read (2 MiB each)")
    parser.add_argument("--dir", type=Path, default=None, help="where the LMDB goes (default: a temp dir)")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument(
        "--torch-threads",
        type=int,
        default=1,
        help="torch intra-op threads; on a small shared CPU more threads make block copies slower",
    )
    parser.add_argument(
        "--ttft-tokens", type=int, default=2048, help="prompt length of the tiny-model TTFT rows (0: skip)"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.torch_threads)

    rows: list[tuple[str, str]] = []
    namespace = Namespace(b"llama-3-8b-shape", "bfloat16", BLOCK)
    hasher = BlockHasher(namespace, seed=1)

    # --- hashing -------------------------------------------------------------------------
    ids_np = np.random.default_rng(0).integers(0, 128_256, size=PROMPT_TOKENS).astype("<i4")
    ids_list = ids_np.tolist()
    hasher.hash_blocks(ids_np)
    t_np = _median_of(lambda: hasher.hash_blocks(ids_np), args.repeats)
    t_list = _median_of(lambda: hasher.hash_blocks(ids_list), args.repeats)
    rows += [
        (
            "hash 128k tokens, int32 array (median)",
            f"{t_np * 1e6:,.0f} µs = {PROMPT_TOKENS / t_np / 1e6:.1f} M tok/s",
        ),
        (
            "hash 128k tokens, list[int] (median)",
            f"{t_list * 1e6:,.0f} µs = {PROMPT_TOKENS / t_list / 1e6:.1f} M tok/s",
        ),
        ("  per block (8,192 blocks, array)", f"{t_np / (PROMPT_TOKENS // BLOCK) * 1e9:.0f} ns"),
    ]

    # --- codec ---------------------------------------------------------------------------
    entries = _entries(hasher, args.blocks)
    block_bytes = entries[0].nbytes
    total = block_bytes * len(entries)
    value = encode(entries[0], namespace.digest)
    t_enc = _best_of(lambda: encode(entries[0], namespace.digest), args.repeats)
    t_dec = _best_of(lambda: decode(value, namespace.digest, entries[0].hash), args.repeats)
    rows += [
        ("block", f"{list(SHAPE)} bf16 = {block_bytes / 2**20:.2f} MiB, value {len(value):,} B"),
        ("encode one block (best)", f"{t_enc * 1e3:.2f} ms = {block_bytes / t_enc / 1e9:.2f} GB/s"),
        ("decode + verify one block (best)", f"{t_dec * 1e3:.2f} ms = {block_bytes / t_dec / 1e9:.2f} GB/s"),
    ]

    # --- CPU tier ------------------------------------------------------------------------
    cpu = CpuTier(SHAPE, DTYPE, capacity_bytes=total)
    for e in entries:  # allocate and first-touch the slab outside the timing
        cpu.put(e)
    for e in entries:
        cpu.remove(e.hash)
    start = time.perf_counter()
    for e in entries:
        cpu.put(e)
    t_put = time.perf_counter() - start
    out = torch.empty(SHAPE, dtype=DTYPE)
    start = time.perf_counter()
    for e in entries:
        cpu.get_into(e.hash, out)
    t_get = time.perf_counter() - start
    rows += [
        (f"cpu tier put, {len(entries)} blocks", f"{total / t_put / 1e9:.2f} GB/s"),
        (f"cpu tier get_into, {len(entries)} blocks", f"{total / t_get / 1e9:.2f} GB/s"),
    ]
    del cpu

    # --- disk tier -----------------------------------------------------------------------
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        map_size = int(total * 1.5) + (64 << 20)
        half = len(entries) // 2
        disk = DiskTier(Path(tmp) / "kv.lmdb", namespace.digest, map_size=map_size)
        start = time.perf_counter()
        for e in entries[:half]:
            assert disk.put(e)
        t_sync = time.perf_counter() - start
        start = time.perf_counter()
        for e in entries[half:]:
            while not disk.put_async(e):
                time.sleep(0.001)
        disk.flush()
        t_async = time.perf_counter() - start
        start = time.perf_counter()
        for e in entries:
            assert disk.get(e.hash) is not None
        t_read = time.perf_counter() - start
        stats = disk.stats
        disk.close()
        # The device's own rate for the same bytes: one file, written and fsynced.
        raw = b"".join(encode(e, namespace.digest) for e in entries[:half])
        start = time.perf_counter()
        with open(Path(tmp) / "raw.bin", "wb") as f:
            f.write(raw)
            f.flush()
            os.fsync(f.fileno())
        t_raw = time.perf_counter() - start
    rows += [
        (f"disk put, 1 commit/block, {half} blocks", f"{half * block_bytes / t_sync / 1e9:.2f} GB/s"),
        (
            f"disk put_async+flush, batched, {len(entries) - half}",
            f"{(len(entries) - half) * block_bytes / t_async / 1e9:.2f} GB/s",
        ),
        (
            f"disk get (page cache), {len(entries)} blocks",
            f"{total / t_read / 1e9:.2f} GB/s, {t_read / len(entries) * 1e3:.2f} ms/block",
        ),
        (f"raw file write+fsync, {half} blocks (reference)", f"{len(raw) / t_raw / 1e9:.2f} GB/s"),
        ("disk stats", f"puts={stats.puts} hits={stats.hits} skipped={stats.writes_skipped}"),
    ]

    # --- TTFT on the tiny model: cold, and the prefix held in each tier -------------------
    if args.ttft_tokens:
        rows += _ttft_rows(args.ttft_tokens, args.dir)

    print(
        f"machine: {platform.processor() or platform.machine()}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} torch threads"
    )
    width = max(len(name) for name, _ in rows)
    for name, result in rows:
        print(f"{name:<{width}}  {result}")


if __name__ == "__main__":
    main()
