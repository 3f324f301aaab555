"""TTFT by cache tier on a Llama-3-8B-shaped model (random bf16 weights, nothing downloaded).

One device call: 64 new tokens after a shared prefix of 2k/8k/32k tokens, cold and with the prefix
in the GPU pool (the median of five hits), the CPU tier and the disk tier, next to Hugging Face
transformers (full prefill, and its own prefix reuse with DynamicCache) on the same weights; then
decode tokens/s at batch 1 and 32 after 8k of context against the weight-read floor. Cold prefills
on both sides are the best of three runs after a warm-up (each of ours a fresh prompt), with every
run printed. Prints a markdown table and writes JSON to $OUT/bench_ttft.json when OUT is set.

    python scripts/bench_ttft.py [--lengths 2048 8192 32768] [--skip-hf]
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import gc
import json
import os
import subprocess
import tempfile
import time
from pathlib import Path

import torch

from cacheproxy.config import Settings
from cacheproxy.engine.engine import LLMEngine
from cacheproxy.engine.model_config import ModelConfig
from cacheproxy.engine.request import GenerationRequest, SamplingParams
from cacheproxy.engine.tiny_model import make_tiny_model
from cacheproxy.engine.tokenizer import Tokenizer
from cacheproxy.engine.weights import build_model, init_random_weights

LLAMA3_8B = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 128256,
    "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
    "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128, "rms_norm_eps": 1e-5,
    "rope_theta": 500000.0, "max_position_embeddings": 40960, "tie_word_embeddings": False,
    "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                     "original_max_position_embeddings": 8192},
    "torch_dtype": "bfloat16", "bos_token_id": 0, "eos_token_id": 1,
}  # fmt: skip
NEW_TOKENS = 64
COLD_RUNS = 3
GPU_HIT_RUNS = 5


def sync() -> None:
    torch.cuda.synchronize()


def copy_bandwidth() -> float:
    """Measured HBM copy rate, bytes moved (read + write) per second."""
    a = torch.empty(2 << 30, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    b.copy_(a)
    sync()
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        b.copy_(a)
        sync()
        best = min(best, time.perf_counter() - t0)
    del a, b
    return 2 * (2 << 30) / best


def read_bandwidth() -> float:
    """Measured HBM read rate (a reduction reads and writes almost nothing), bytes per second."""
    a = torch.ones(2 << 30, dtype=torch.bfloat16, device="cuda")
    a.sum()
    sync()
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        a.sum()
        sync()
        best = min(best, time.perf_counter() - t0)
    del a
    return 2 * (2 << 30) / best


def h2d_bandwidth() -> float:
    src = torch.empty(1 << 30, dtype=torch.uint8, pin_memory=True)
    dst = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    dst.copy_(src, non_blocking=True)
    sync()
    t0 = time.perf_counter()
    for _ in range(3):
        dst.copy_(src, non_blocking=True)
    sync()
    return 3 * (1 << 30) / (time.perf_counter() - t0)


def make_engine(workdir: Path, cfg_dir: Path, tok_dir: Path, **kw: object) -> LLMEngine:
    opts: dict[str, object] = {
        "model": str(cfg_dir), "data_dir": workdir, "device": "cuda", "dtype": "bfloat16",
        "max_num_batched_tokens": 32768 + NEW_TOKENS, "max_num_seqs": 32, "kv_cache_bytes": 40 << 30,
        "cpu_cache_bytes": 12 << 30, "disk_cache_bytes": 24 << 30, "max_model_len": 40960,
    }  # fmt: skip
    opts.update(kw)
    settings = Settings(**opts)
    cfg = ModelConfig.from_path(cfg_dir)
    model = build_model(cfg, torch.device("cuda"), torch.bfloat16)
    init_random_weights(model, seed=0)
    return LLMEngine(settings, model, Tokenizer(tok_dir), cfg_dir, torch.device("cuda"))


GC_PAUSES: list[tuple[int, float]] = []  # (generation, seconds) of each collection since the last clear
_gc_started = [0.0]


def _on_gc(phase: str, info: dict[str, int]) -> None:
    if phase == "start":
        _gc_started[0] = time.perf_counter()
    else:
        GC_PAUSES.append((info["generation"], time.perf_counter() - _gc_started[0]))


gc.callbacks.append(_on_gc)


def gc_report() -> str:
    """The collector's pauses since the last call: a long one explains an outlier TTFT."""
    text = ", ".join(f"gen{g} {1e3 * s:.1f} ms" for g, s in GC_PAUSES if s > 1e-3) or "none over 1 ms"
    GC_PAUSES.clear()
    return text


def ttft(engine: LLMEngine, rid: str, prompt: list[int]) -> tuple[float, dict[str, int]]:
    sync()
    t0 = time.perf_counter()
    engine.add_request(GenerationRequest(rid, prompt, SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)))
    outs = []
    while not outs:
        outs = engine.step()
    elapsed = time.perf_counter() - t0  # the token is on the host: the GPU work is done
    while engine.has_work():
        engine.step()
    return elapsed, outs[0].cached_tokens_by_tier


def ttft_phases(engine: LLMEngine, rid: str, prompt: list[int]) -> tuple[float, dict[str, int], dict[str, float]]:
    """ttft() for a prompt that fits one step, with the host/device phases timed apart (the step's
    parts called one by one: the last step's bookkeeping first, as `step` does, outside the timing)."""
    engine._settle()
    sync()
    t0 = time.perf_counter()
    engine.add_request(GenerationRequest(rid, prompt, SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)))
    t1 = time.perf_counter()
    step = engine.scheduler.schedule()
    t2 = time.perf_counter()
    sync()
    t3 = time.perf_counter()
    result = engine.runner.run(step)
    t4 = time.perf_counter()
    outs = engine._postprocess(step, result)
    t5 = time.perf_counter()
    assert outs and outs[0].request_id == rid
    while engine.has_work():
        engine.step()
    phases = {"add_ms": 1e3 * (t1 - t0), "schedule_ms": 1e3 * (t2 - t1), "loads_wait_ms": 1e3 * (t3 - t2),
              "run_ms": 1e3 * (t4 - t3), "post_ms": 1e3 * (t5 - t4)}  # fmt: skip
    return t5 - t0, outs[0].cached_tokens_by_tier, phases


def rand_ids(g: torch.Generator, n: int) -> list[int]:
    # ids the tiny tokenizer can decode (the bench measures the model, not the vocabulary)
    return torch.randint(5, 2000, (n,), generator=g).tolist()


def drop_to_disk_only(engine: LLMEngine) -> None:
    store = engine.store
    store.flush()  # pool + CPU tier -> disk, committed
    cpu = store.tiers[0]
    for h in cpu.hashes():  # type: ignore[attr-defined]
        cpu.remove(h)
    engine.pool.evict(None)
    with contextlib.suppress(OSError):  # a cold read, not the page cache, when the machine lets us
        Path("/proc/sys/vm/drop_caches").write_text("3\n")


def quiesce(engine: LLMEngine) -> None:
    """Copies landed and the disk writer idle: each timed request starts from a quiet engine (a
    writer draining gigabytes of demoted blocks competes with the engine thread for the GIL)."""
    engine.store.load_stream.synchronize()  # type: ignore[union-attr]
    for tier in engine.store.tiers:
        flush = getattr(tier, "flush", None)
        if flush is not None:
            flush()


def bench_tiers(engine: LLMEngine, lengths: list[int]) -> list[dict[str, object]]:
    g = torch.Generator().manual_seed(1)
    rows = []
    ttft(engine, "warm-up", rand_ids(g, 4096))
    for n in lengths:
        ttft(engine, f"compile-{n}", rand_ids(g, n + NEW_TOKENS))  # same shapes, other tokens
        prefix = rand_ids(g, n)
        row: dict[str, object] = {"prefix": n}
        # Best of COLD_RUNS fresh prompts, the statistic the transformers rows use (best of 3 after a
        # warm-up); the prefix's own cold run comes last, so that its blocks stay in the pool.
        colds = []
        for i in range(COLD_RUNS - 1):
            colds.append(ttft(engine, f"cold-{n}-{i}", rand_ids(g, n + NEW_TOKENS))[0])
            engine.pool.evict(None)
        colds.append(ttft(engine, f"cold-{n}", prefix + rand_ids(g, NEW_TOKENS))[0])
        row["cold"], row["cold_runs"] = min(colds), colds
        # The median of GPU_HIT_RUNS hits (each the prefix and 64 fresh tokens), every run kept: one hit
        # alone moved by ~1 ms from run to run at 32k on an H100 (BENCHMARKS.md).
        hits = sorted(
            (ttft_phases(engine, f"gpu-{n}-{i}", prefix + rand_ids(g, NEW_TOKENS)) for i in range(GPU_HIT_RUNS)),
            key=lambda hit: hit[0],
        )
        row["gpu"], row["gpu_tiers"], row["gpu_phases"] = hits[len(hits) // 2]
        row["gpu_runs"] = [hit[0] for hit in hits]
        engine.store.evict_gpu()
        quiesce(engine)
        gc_report()
        copies = engine.store.counters.load_copies
        row["cpu"], row["cpu_tiers"] = ttft(engine, f"cpu-{n}", prefix + rand_ids(g, NEW_TOKENS))
        row["cpu_copies"] = engine.store.counters.load_copies - copies
        row["cpu_gc"] = gc_report()
        saved = engine.store.cost_model
        engine.store.cost_model = None  # load every block, whatever the plan would say
        engine.store.evict_gpu()
        quiesce(engine)
        gc_report()
        # not ttft_phases: its sync between schedule and run would wait for the loads it should overlap
        copies = engine.store.counters.load_copies
        row["cpu_forced"], row["cpu_forced_tiers"] = ttft(engine, f"cpuf-{n}", prefix + rand_ids(g, NEW_TOKENS))
        row["cpu_forced_copies"] = engine.store.counters.load_copies - copies  # DMAs queued (runs x layers)
        row["cpu_forced_gc"] = gc_report()
        # Baseline in the same run: whole-block loads, the step waiting for all of them.
        gate, engine.store.layer_gate = engine.store.layer_gate, None
        engine.store.evict_gpu()
        quiesce(engine)
        copies = engine.store.counters.load_copies
        row["cpu_blockwise"], row["cpu_blockwise_tiers"] = ttft(engine, f"cpub-{n}", prefix + rand_ids(g, NEW_TOKENS))
        row["cpu_blockwise_copies"] = engine.store.counters.load_copies - copies
        engine.store.layer_gate = gate
        engine.store.cost_model = saved
        drop_to_disk_only(engine)
        row["disk"], row["disk_tiers"] = ttft(engine, f"disk-{n}", prefix + rand_ids(g, NEW_TOKENS))
        engine.store.cost_model = None
        drop_to_disk_only(engine)
        row["disk_forced"], row["disk_forced_tiers"] = ttft(engine, f"diskf-{n}", prefix + rand_ids(g, NEW_TOKENS))
        engine.store.cost_model = saved
        engine.pool.evict(None)
        row["kv_bytes"] = n // engine.block_size * engine.pool.block_bytes
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def profile_gpu_hit(engine: LLMEngine, n: int, repeats: int = 7) -> None:
    """GPU-tier hits of one prefix, phases of each, then one under cProfile (host time by function)."""
    import cProfile
    import io
    import pstats

    t0 = time.perf_counter()
    gc.collect()
    print(f"full gc.collect(): {1e3 * (time.perf_counter() - t0):.1f} ms over {len(gc.get_objects())} tracked objects; "
          f"frozen {gc.get_freeze_count()}", flush=True)  # fmt: skip
    g = torch.Generator().manual_seed(3)
    prefix = rand_ids(g, n)
    ttft(engine, "profile-prime", prefix + rand_ids(g, NEW_TOKENS))
    for i in range(repeats):
        total, _, phases = ttft_phases(engine, f"profile-{i}", prefix + rand_ids(g, NEW_TOKENS))
        print(json.dumps({"gpu_hit_repeat": i, "ms": round(1e3 * total, 2),
                          **{k: round(v, 2) for k, v in phases.items()}}), flush=True)  # fmt: skip
    prof = cProfile.Profile()
    prof.enable()
    ttft_phases(engine, "profile-cprofile", prefix + rand_ids(g, NEW_TOKENS))
    prof.disable()
    text = io.StringIO()
    stats = pstats.Stats(prof, stream=text)
    stats.sort_stats("tottime").print_stats(30)
    stats.sort_stats("cumulative").print_stats(40)
    stats.print_callees("_forward|run_prefill|_prepare|launch")
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as kineto:
        ttft_phases(engine, "profile-kineto", prefix + rand_ids(g, NEW_TOKENS))
    for key in ("self_device_time_total", "self_cuda_time_total"):
        try:
            text.write(kineto.key_averages().table(sort_by=key, row_limit=30))
            break
        except Exception:  # the sort key's name depends on the torch version
            continue
    print(text.getvalue(), flush=True)
    out = os.environ.get("OUT")
    if out:
        Path(out, "host_profile.txt").write_text(text.getvalue())
        kineto.export_chrome_trace(str(Path(out, f"gpu_hit_{n}.trace.json")))
        # the same request from the CPU tier, every block loaded: how the copies overlap the forward pass
        saved, engine.store.cost_model = engine.store.cost_model, None
        engine.store.evict_gpu()
        quiesce(engine)
        ttft(engine, "profile-cpu-prime", prefix + rand_ids(g, NEW_TOKENS))
        engine.store.evict_gpu()
        quiesce(engine)
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as kineto:
            ttft(engine, "profile-cpu", prefix + rand_ids(g, NEW_TOKENS))
        engine.store.cost_model = saved
        kineto.export_chrome_trace(str(Path(out, f"cpu_hit_{n}.trace.json")))


def bench_decode(engine: LLMEngine, batch: int, context: int, steps: int = 48) -> dict[str, float]:
    g = torch.Generator().manual_seed(2)
    params = SamplingParams(max_tokens=steps + 8, temperature=0.0, ignore_eos=True)
    for i in range(batch):
        engine.add_request(GenerationRequest(f"d{batch}-{i}", rand_ids(g, context), params))
    while any(s.num_tokens - s.num_computed > 1 or not s.output_ids for s in engine.scheduler.running) or (
        engine.scheduler.waiting
    ):
        engine.step()
    engine.step()
    sync()
    t0 = time.perf_counter()
    for _ in range(steps):
        engine.step()
    sync()
    dt_step = (time.perf_counter() - t0) / steps
    while engine.has_work():
        engine.step()
    engine.pool.evict(None)
    return {"batch": batch, "context": context, "step_s": dt_step, "tokens_per_s": batch / dt_step}


def bench_hf(model: torch.nn.Module, cfg: dict, lengths: list[int]) -> list[dict[str, object]]:
    import transformers

    from cacheproxy.engine.weights import checkpoint_state_dict

    hf_cfg = transformers.LlamaConfig(**{k: v for k, v in cfg.items() if k not in ("architectures",)})
    with torch.device("cuda"):
        hf = transformers.AutoModelForCausalLM.from_config(hf_cfg, dtype=torch.bfloat16).eval()
    # Our fused q/k/v and gate/up split back into Hugging Face's names; strict: every weight of
    # either model has its counterpart, so both run the very same weights.
    hf.load_state_dict(checkpoint_state_dict(model), strict=True)
    g = torch.Generator().manual_seed(3)
    rows = []

    runs: list[float] = []

    def timed(fn) -> float:  # type: ignore[no-untyped-def]
        fn()
        sync()
        runs.clear()
        for _ in range(COLD_RUNS):
            t0 = time.perf_counter()
            fn()
            sync()
            runs.append(time.perf_counter() - t0)
        return min(runs)

    with torch.no_grad():
        for n in lengths:
            full = torch.tensor([rand_ids(g, n + NEW_TOKENS)], device="cuda")
            t_full = timed(lambda full=full: hf(full, logits_to_keep=1).logits.argmax(-1).item())
            full_runs = list(runs)
            cache = transformers.DynamicCache()
            hf(full[:, :n], past_key_values=cache, use_cache=True, logits_to_keep=1)

            def reuse(full=full, cache=cache, n=n) -> None:  # type: ignore[no-untyped-def]
                hf(full[:, n:], past_key_values=cache, use_cache=True, logits_to_keep=1).logits.argmax(-1).item()
                cache.crop(n)

            t_reuse = timed(reuse)
            rows.append({"prefix": n, "hf_full": t_full, "hf_full_runs": full_runs, "hf_reuse": t_reuse})
            print(json.dumps(rows[-1]), flush=True)
            del cache
            torch.cuda.empty_cache()
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--lengths", type=int, nargs="+", default=[2048, 8192, 32768])
    ap.add_argument("--skip-hf", action="store_true")
    ap.add_argument("--skip-decode", action="store_true")
    ap.add_argument("--profile-host", action="store_true",
                    help="after the tiers: repeat the GPU hit at the longest prefix and profile its host phases")
    ap.add_argument("--profile-length", type=int, help="the prefix --profile-host profiles (default: the longest)")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-ttft-"))
    cfg_dir = work / "llama3-8b-shape"
    cfg_dir.mkdir()
    (cfg_dir / "config.json").write_text(json.dumps(LLAMA3_8B))
    tok_dir = make_tiny_model(work / "tok", "llama")
    card = torch.cuda.get_device_name()
    commit = os.environ.get("COMMIT") or subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    copy_bw, read_bw, h2d_bw = copy_bandwidth(), read_bandwidth(), h2d_bandwidth()
    print(f"card={card} copy={copy_bw / 1e12:.2f} TB/s read={read_bw / 1e12:.2f} TB/s "
          f"pinned H2D={h2d_bw / 1e9:.1f} GB/s", flush=True)  # fmt: skip
    engine = make_engine(work / "data", cfg_dir, tok_dir)
    gc.collect()
    gc.freeze()  # as `cacheproxy serve` does once its engine is up: start-up objects out of the collector's walk
    print("cost model:", json.dumps(engine.cost_model.as_dict()), flush=True)
    rows = bench_tiers(engine, args.lengths)
    if args.profile_host:
        profile_gpu_hit(engine, args.profile_length or max(args.lengths))
    weight_bytes = sum(p.numel() * p.element_size() for p in engine.model.parameters())
    decode = []
    if not args.skip_decode:
        for b in (1, 32):
            d = bench_decode(engine, b, 8192)
            kv_read = b * 8192 * engine.config.kv_bytes_per_token(2)
            d["floor_s"] = (weight_bytes + kv_read) / read_bw
            d["fraction_of_floor"] = d["floor_s"] / d["step_s"]
            decode.append(d)
            print(json.dumps(d), flush=True)
    model = engine.model
    for layer in model.model.layers:  # release the pool's views so its memory goes back
        layer.self_attn.k_cache = layer.self_attn.v_cache = torch.empty(0)
    engine.store.close()
    del engine
    gc.unfreeze()
    gc.collect()
    torch.cuda.empty_cache()
    hf_rows = [] if args.skip_hf else bench_hf(model, LLAMA3_8B, args.lengths)

    ms = lambda s: f"{1e3 * s:.1f}"  # noqa: E731
    print(f"\n### TTFT, 64 new tokens after a shared prefix — {card}, {dt.date.today()}, commit {commit}\n")
    print("| prefix | cold | GPU hit | CPU hit (cost model) | CPU forced | CPU, whole-block loads | (PCIe time of its bytes) | disk hit (cost model) | disk forced | HF full prefill | HF DynamicCache reuse |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        h = next((x for x in hf_rows if x["prefix"] == r["prefix"]), {})
        pcie = r["kv_bytes"] / h2d_bw  # type: ignore[operator]
        print(f"| {r['prefix']} | {ms(r['cold'])} ms | {ms(r['gpu'])} ms | {ms(r['cpu'])} ms {r['cpu_tiers'] or '(recomputed)'} | "
              f"{ms(r['cpu_forced'])} ms ({r['cpu_forced'] / pcie:.2f}x) | {ms(r['cpu_blockwise'])} ms "
              f"({r['cpu_blockwise'] / pcie:.2f}x) | {ms(pcie)} ms | "
              f"{ms(r['disk'])} ms {r['disk_tiers'] or '(recomputed)'} | {ms(r['disk_forced'])} ms | "
              f"{ms(h['hf_full']) if h else '-'} ms | {ms(h['hf_reuse']) if h else '-'} ms |")  # fmt: skip
    for r in rows:
        print(f"GPU hit {r['prefix']}: {', '.join(ms(t) for t in r['gpu_runs'])} ms (the table: the median)")  # type: ignore[union-attr]
    for r in rows:
        h = next((x for x in hf_rows if x["prefix"] == r["prefix"]), None)
        if h:
            ours, theirs = sorted(r["cold_runs"]), sorted(h["hf_full_runs"])  # type: ignore[arg-type]
            print(f"cold {r['prefix']}: ours {', '.join(ms(t) for t in ours)} ms; transformers "
                  f"{', '.join(ms(t) for t in theirs)} ms; best {theirs[0] / ours[0]:.3f}x, "
                  f"median {theirs[len(theirs) // 2] / ours[len(ours) // 2]:.3f}x")  # fmt: skip
    if decode:
        print("\n| decode after 8k | step | tokens/s | weight+KV read floor | fraction of floor |\n|---|---|---|---|---|")
        for d in decode:
            print(f"| batch {d['batch']} | {ms(d['step_s'])} ms | {d['tokens_per_s']:.0f} | {ms(d['floor_s'])} ms | "
                  f"{100 * d['fraction_of_floor']:.0f}% |")  # fmt: skip
    out = os.environ.get("OUT")
    if out:
        Path(out, "bench_ttft.json").write_text(json.dumps(
            {"card": card, "commit": commit, "copy_bw": copy_bw, "read_bw": read_bw, "h2d_bw": h2d_bw, "tiers": rows,
             "decode": decode, "hf": hf_rows}, indent=1))  # fmt: skip


if __name__ == "__main__":
    main()
