"""The fused elementwise kernels ((add +) RMSNorm, rotary, SiLU-and-multiply) compute what float64 says.

The Triton kernels run on the CPU under TRITON_INTERPRET=1, in one child process started with the
variable set (Triton reads it when a kernel is decorated; this file, run as a script, is the child).
The parent draws fresh random inputs, the child runs the kernels into NaN-poisoned outputs, and the
parent checks them, and the torch twins, against float64 math. fp16 and fp32: the interpreter
truncates float32 to bf16 where the GPU rounds to nearest, so bf16 is checked on the GPU.
Shapes are small, with ragged token counts and hidden sizes that are not powers of two.
"""

from __future__ import annotations

import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from triton_interpreter import run_interpreted

import kernels
from kernels import reference

# Worst error allowed, relative to the largest magnitude of the expected values: the reference's
# own roundings in the model's dtype (two or three per element) sit well inside it.
TOLERANCE = {torch.float16: 4e-3, torch.float32: 4e-6}
EPS = 1e-5


@dataclass(frozen=True)
class NormCase:
    name: str
    dtype: torch.dtype
    tokens: int
    hidden: int
    residual: bool
    heads: int = 0  # > 0: x is a [T, heads, hidden] head slice of a wider fused row (Qwen3's q/k norm)


@dataclass(frozen=True)
class RotaryCase:
    name: str
    dtype: torch.dtype
    tokens: int
    num_q_heads: int
    num_kv_heads: int
    head_dim: int
    rotary_dim: int
    max_positions: int = 97
    positions_dtype: torch.dtype = torch.int64


@dataclass(frozen=True)
class SiluCase:
    name: str
    dtype: torch.dtype
    tokens: int
    intermediate: int


NORM_CASES = [
    NormCase("norm-fp16-T1-h96", torch.float16, 1, 96, False),
    NormCase("norm-fp32-T7-h100", torch.float32, 7, 100, False),
    NormCase("addnorm-fp16-T13-h200", torch.float16, 13, 200, True),
    NormCase("addnorm-fp32-T5-h4100", torch.float32, 5, 4100, True),
    NormCase("addnorm-fp16-T3-h1000", torch.float16, 3, 1000, True),
    NormCase("headnorm-fp16-T9-d64", torch.float16, 9, 64, False, heads=6),
    NormCase("headnorm-fp32-T4-d80", torch.float32, 4, 80, False, heads=3),
    NormCase("headaddnorm-fp16-T5-d48", torch.float16, 5, 48, True, heads=4),
]
ROTARY_CASES = [
    RotaryCase("rot-fp16-T1-gqa4-d64", torch.float16, 1, 8, 2, 64, 64),
    RotaryCase("rot-fp32-T11-gqa1-d128", torch.float32, 11, 3, 3, 128, 128, positions_dtype=torch.int32),
    RotaryCase("rot-fp16-T17-gqa8-d128", torch.float16, 17, 16, 2, 128, 128),
    RotaryCase("rot-fp16-T6-d80", torch.float16, 6, 5, 1, 80, 80),
    RotaryCase("rot-fp32-T5-partial-d64-r32", torch.float32, 5, 4, 2, 64, 32),
    RotaryCase("rot-fp16-T3-partial-d96-r48", torch.float16, 3, 6, 3, 96, 48, positions_dtype=torch.int32),
]
# Rotary into the cache (`rotary_and_write_kv`): full-rotary shapes only (the one-launch form).
ROTARY_KV_CASES = [
    RotaryCase("rotkv-fp16-T9-gqa4-d64", torch.float16, 9, 8, 2, 64, 64),
    RotaryCase("rotkv-fp32-T5-gqa1-d128", torch.float32, 5, 3, 3, 128, 128, positions_dtype=torch.int32),
    RotaryCase("rotkv-fp16-T13-gqa8-d80", torch.float16, 13, 16, 2, 80, 80),
]
SILU_CASES = [
    SiluCase("silu-fp16-T1-i300", torch.float16, 1, 300),
    SiluCase("silu-fp32-T9-i1000", torch.float32, 9, 1000),
    SiluCase("silu-fp16-T4-i1500", torch.float16, 4, 1500),
    SiluCase("silu-fp32-T3-i2049", torch.float32, 3, 2049),
]
EMPTY_CASES = ["norm-empty", "rot-empty", "silu-empty", "rotkv-empty"]


def norm_inputs(case: NormCase, gen: torch.Generator) -> dict[str, Any]:
    if case.heads:
        # The heads sit in a wider row with other columns on both sides: strided, as in a qkv output.
        wide = torch.randn(case.tokens, (case.heads + 3) * case.hidden, generator=gen).to(case.dtype)
        x = wide[:, case.hidden : (case.heads + 1) * case.hidden].view(case.tokens, case.heads, case.hidden)
        shape: tuple[int, ...] = (case.tokens, case.heads, case.hidden)
    else:
        x = torch.randn(case.tokens, case.hidden, generator=gen).to(case.dtype) * 3
        shape = (case.tokens, case.hidden)
    return {
        "x": x,
        "weight": (torch.rand(case.hidden, generator=gen) * 2 + 0.1).to(case.dtype),
        "residual": torch.randn(*shape, generator=gen).to(case.dtype) if case.residual else None,
        "eps": EPS,
    }


def rotary_inputs(case: RotaryCase, gen: torch.Generator) -> dict[str, Any]:
    T, hq, hkv, d = case.tokens, case.num_q_heads, case.num_kv_heads, case.head_dim
    # q, k and v as views of one fused projection's output, plus a spare column block that nothing may touch.
    qkv = torch.randn(T, (hq + 2 * hkv + 1) * d, generator=gen).to(case.dtype)
    inv = 1.0 / (10000.0 ** (torch.arange(0, case.rotary_dim, 2).float() / case.rotary_dim))
    freqs = torch.outer(torch.arange(case.max_positions, dtype=torch.float32), inv)
    positions = torch.randint(0, case.max_positions, (T,), generator=gen, dtype=case.positions_dtype)
    positions[:1] = case.max_positions - 1  # the table's last row
    return {"qkv": qkv, "heads": (hq, hkv, d), "cos": freqs.cos(), "sin": freqs.sin(), "positions": positions}


def rotary_kv_inputs(case: RotaryCase, gen: torch.Generator, wait: bool) -> dict[str, Any]:
    """Rotary inputs plus a random pool [blocks, 2, block_size, Hkv, D] (page-first, K then V), distinct
    slots with some -1 (padding tokens) and, with `wait`, landed layer flags."""
    inputs = rotary_inputs(case, gen)
    block_size, blocks = 4, case.tokens // 2 + 3
    inputs["pool"] = torch.randn(blocks, 2, block_size, case.num_kv_heads, case.head_dim, generator=gen).to(case.dtype)
    slots = torch.randperm(blocks * block_size, generator=gen)[: case.tokens]
    slots[torch.rand(case.tokens, generator=gen) < 0.25] = -1
    inputs["slot_mapping"] = slots.to(torch.int32 if case.tokens % 2 else torch.int64)
    layer = int(torch.randint(0, 3, (1,), generator=gen))
    target = torch.tensor([int(torch.randint(1, 1000, (1,), generator=gen))], dtype=torch.int32)
    flags = torch.zeros(3, dtype=torch.int32)
    flags[layer] = target
    inputs["wait"] = (flags, target, layer) if wait else None
    return inputs


def silu_inputs(case: SiluCase, gen: torch.Generator) -> dict[str, Any]:
    return {"gate_up": (torch.randn(case.tokens, 2 * case.intermediate, generator=gen) * 4).to(case.dtype)}


def split_qkv(qkv: torch.Tensor, heads: tuple[int, int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    hq, hkv, d = heads
    T = qkv.shape[0]
    return qkv[:, : hq * d].view(T, hq, d), qkv[:, hq * d : (hq + hkv) * d].view(T, hkv, d)


def split_v(qkv: torch.Tensor, heads: tuple[int, int, int]) -> torch.Tensor:
    hq, hkv, d = heads
    return qkv[:, (hq + hkv) * d : (hq + 2 * hkv) * d].view(qkv.shape[0], hkv, d)


def run_op(ops: Any, op: str, inputs: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Calls one op of `ops` (triton_fused or reference) into NaN-poisoned outputs; returns what it wrote."""
    if op == "rms_norm":
        x = inputs["x"]
        out = torch.full(x.shape, float("nan"), dtype=x.dtype)
        if inputs["residual"] is None:
            result = ops.rms_norm(x, inputs["weight"], inputs["eps"], out=out)
            assert result is out
            return {"out": out}
        residual = inputs["residual"].clone()
        result, res = ops.rms_norm(x, inputs["weight"], inputs["eps"], residual, out=out)
        assert result is out and res is residual
        return {"out": out, "residual": residual}
    if op == "rotary":
        qkv = inputs["qkv"].clone()
        q, k = split_qkv(qkv, inputs["heads"])
        ops.rotary(q, k, inputs["cos"], inputs["sin"], inputs["positions"])
        return {"qkv": qkv}
    if op == "rotary_kv":
        qkv, pool = inputs["qkv"].clone(), inputs["pool"].clone()
        q, k = split_qkv(qkv, inputs["heads"])
        v = split_v(qkv, inputs["heads"])
        args = (q, k, v, inputs["cos"], inputs["sin"], inputs["positions"], pool[:, 0], pool[:, 1], inputs["slot_mapping"])
        if ops is reference:  # the twins' way: the three ops in turn
            ops.rotary(*args[:2], *args[3:6])
            ops.write_kv(k, v, *args[6:])
        else:
            ops.rotary_and_write_kv(*args, inputs["wait"])
        return {"qkv": qkv, "pool": pool}
    if op == "silu_and_mul":
        gate_up = inputs["gate_up"]
        out = torch.full((gate_up.shape[0], gate_up.shape[1] // 2), float("nan"), dtype=gate_up.dtype)
        assert ops.silu_and_mul(gate_up, out=out) is out
        return {"out": out}
    raise ValueError(op)


def _child_main(cases_path: str, results_path: str) -> None:
    from kernels import triton_fused

    cases = torch.load(cases_path)
    results = {name: run_op(triton_fused, op, inputs) for name, (op, inputs) in cases.items()}
    torch.save(results, results_path)


# ---- float64 oracles ----


def norm_oracle(inputs: dict[str, Any]) -> dict[str, torch.Tensor]:
    x, dtype = inputs["x"], inputs["x"].dtype
    expected: dict[str, torch.Tensor] = {}
    if inputs["residual"] is not None:
        # One add, correctly rounded to the model's dtype: exact in float64 before the rounding.
        total = (inputs["residual"].double() + x.double()).to(dtype)
        expected["residual"] = total
        x = total
    xd = x.double()
    normed = xd * torch.rsqrt(xd.pow(2).mean(-1, keepdim=True) + inputs["eps"])
    expected["out"] = normed * inputs["weight"].double()
    return expected


def rotary_oracle(inputs: dict[str, Any]) -> torch.Tensor:
    qkv = inputs["qkv"].double()
    q, k = split_qkv(qkv, inputs["heads"])
    half = inputs["cos"].shape[1]
    pos = inputs["positions"].long()
    c, s = inputs["cos"].double()[pos].unsqueeze(1), inputs["sin"].double()[pos].unsqueeze(1)
    for x in (q, k):
        x1, x2 = x[..., :half].clone(), x[..., half : 2 * half].clone()
        x[..., :half] = x1 * c - x2 * s
        x[..., half : 2 * half] = x2 * c + x1 * s
    return qkv


def silu_oracle(inputs: dict[str, Any]) -> torch.Tensor:
    gate, up = inputs["gate_up"].double().chunk(2, dim=-1)
    return gate * torch.sigmoid(gate) * up


def assert_close(
    actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, seed: int, what: str
) -> None:
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert not actual.isnan().any(), f"{what}: NaN left in the output (seed {seed})"
    scale = expected.abs().max().item() or 1.0
    err = (actual.double() - expected.double()).abs().max().item() / scale
    assert err <= TOLERANCE[dtype], (
        f"{what}: max error {err:.3g} of the scale > {TOLERANCE[dtype]} (seed {seed})"
    )


@pytest.fixture(scope="module")
def seed() -> int:
    return int.from_bytes(os.urandom(4), "little")  # fresh inputs every run; printed on failure


@pytest.fixture(scope="module")
def cases(seed: int) -> dict[str, tuple[str, dict[str, Any]]]:
    gen = torch.Generator().manual_seed(seed)
    built: dict[str, tuple[str, dict[str, Any]]] = {}
    for c in NORM_CASES:
        built[c.name] = ("rms_norm", norm_inputs(c, gen))
    for c in ROTARY_CASES:
        built[c.name] = ("rotary", rotary_inputs(c, gen))
    for i, c in enumerate(ROTARY_KV_CASES):
        built[c.name] = ("rotary_kv", rotary_kv_inputs(c, gen, wait=i % 2 == 0))
    for c in SILU_CASES:
        built[c.name] = ("silu_and_mul", silu_inputs(c, gen))
    built["norm-empty"] = ("rms_norm", norm_inputs(NormCase("", torch.float16, 0, 96, True), gen))
    built["rot-empty"] = ("rotary", rotary_inputs(RotaryCase("", torch.float16, 0, 4, 2, 64, 64), gen))
    built["silu-empty"] = ("silu_and_mul", silu_inputs(SiluCase("", torch.float16, 0, 300), gen))
    built["rotkv-empty"] = ("rotary_kv", rotary_kv_inputs(RotaryCase("", torch.float16, 0, 4, 2, 64, 64), gen, True))
    return built


@pytest.fixture(scope="module")
def interpreted(cases: dict[str, tuple[str, dict[str, Any]]], tmp_path_factory: pytest.TempPathFactory):
    """Outputs of the Triton kernels under TRITON_INTERPRET=1, one child process for all cases."""
    return run_interpreted(__file__, cases, tmp_path_factory.mktemp("triton_fused_interpreter"))


def _results(
    cases, interpreted, name: str, implementation: str
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:  # type: ignore[no-untyped-def]
    op, inputs = cases[name]
    return inputs, (interpreted[name] if implementation == "triton" else run_op(reference, op, inputs))


IMPLEMENTATIONS = ["triton", "reference"]


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("case", NORM_CASES, ids=lambda c: c.name)
def test_rms_norm_matches_float64(case: NormCase, implementation: str, cases, interpreted, seed: int) -> None:
    inputs, got = _results(cases, interpreted, case.name, implementation)
    expected = norm_oracle(inputs)
    assert_close(got["out"], expected["out"], case.dtype, seed, f"{implementation} {case.name}")
    assert got["out"].is_contiguous() and got["out"].shape == inputs["x"].shape
    if case.residual:
        # The residual stream holds the sum rounded once to the model's dtype: bit for bit.
        assert torch.equal(got["residual"], expected["residual"]), f"{case.name}: residual sum (seed {seed})"


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("case", ROTARY_CASES, ids=lambda c: c.name)
def test_rotary_matches_float64_and_touches_nothing_else(
    case: RotaryCase, implementation: str, cases, interpreted, seed: int
) -> None:
    inputs, got = _results(cases, interpreted, case.name, implementation)
    expected = rotary_oracle(inputs)
    hq, hkv, d = inputs["heads"]
    turned = (hq + hkv) * d
    assert_close(
        got["qkv"][:, :turned], expected[:, :turned], case.dtype, seed, f"{implementation} {case.name}"
    )
    # v and the spare columns stay as they were, and so do the dims past the rotary ones.
    assert torch.equal(got["qkv"][:, turned:], inputs["qkv"][:, turned:])
    heads = got["qkv"][:, :turned].view(-1, hq + hkv, d)
    assert torch.equal(
        heads[..., case.rotary_dim :], inputs["qkv"][:, :turned].view(-1, hq + hkv, d)[..., case.rotary_dim :]
    )


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("case", ROTARY_KV_CASES, ids=lambda c: c.name)
def test_rotary_and_write_kv_turns_q_k_and_fills_exactly_the_mapped_slots(
    case: RotaryCase, implementation: str, cases, interpreted, seed: int
) -> None:
    inputs, got = _results(cases, interpreted, case.name, implementation)
    expected = rotary_oracle(inputs)
    hq, hkv, d = inputs["heads"]
    turned = (hq + hkv) * d
    what = f"{implementation} {case.name}"
    assert_close(got["qkv"][:, :turned], expected[:, :turned], case.dtype, seed, what)
    assert torch.equal(got["qkv"][:, turned:], inputs["qkv"][:, turned:]), f"{what}: v or the spare columns moved"
    # The cache: the turned k and the v of each mapped token in its slot; every other slot as it was.
    pool, before = got["pool"], inputs["pool"]
    block_size = pool.shape[2]
    written = torch.zeros(pool.shape[0] * block_size, dtype=torch.bool)
    k_turned = split_qkv(expected, inputs["heads"])[1]
    v = split_v(inputs["qkv"], inputs["heads"])
    for t, slot in enumerate(inputs["slot_mapping"].tolist()):
        if slot < 0:
            continue
        written[slot] = True
        blk, off = divmod(slot, block_size)
        assert_close(pool[blk, 0, off], k_turned[t], case.dtype, seed, f"{what}: k of token {t}")
        assert torch.equal(pool[blk, 1, off], v[t]), f"{what}: v of token {t} (seed {seed})"
    untouched = ~written.view(pool.shape[0], block_size)
    assert torch.equal(pool.transpose(1, 2)[untouched], before.transpose(1, 2)[untouched]), f"{what}: other slots"


@pytest.mark.parametrize("name", [c.name for c in ROTARY_KV_CASES if c.dtype == torch.float16])
def test_rotary_and_write_kv_rounds_like_the_ops_in_turn(name: str, cases, interpreted) -> None:
    op, inputs = cases[name]
    twin = run_op(reference, op, inputs)
    for key, value in twin.items():
        got = interpreted[name][key]
        ulp = 2 * torch.finfo(torch.float16).eps * value.double().abs().clamp_min(2**-14)
        assert ((got.double() - value.double()).abs() <= ulp).all(), f"{name}: {key} differs from the ops in turn"


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("case", SILU_CASES, ids=lambda c: c.name)
def test_silu_and_mul_matches_float64(
    case: SiluCase, implementation: str, cases, interpreted, seed: int
) -> None:
    inputs, got = _results(cases, interpreted, case.name, implementation)
    assert_close(got["out"], silu_oracle(inputs), case.dtype, seed, f"{implementation} {case.name}")


@pytest.mark.parametrize(
    "name", [c.name for c in NORM_CASES + ROTARY_CASES + SILU_CASES if c.dtype == torch.float16]
)
def test_triton_rounds_like_its_twin_in_half_precision(name: str, cases, interpreted) -> None:
    """Same roundings in the same order: an intermediate one ulp off (exp, rsqrt differ) leaves the
    result at most two ulps off."""
    op, inputs = cases[name]
    twin = run_op(reference, op, inputs)
    for key, value in twin.items():
        got = interpreted[name][key]
        ulp = 2 * torch.finfo(torch.float16).eps * value.double().abs().clamp_min(2**-14)
        assert ((got.double() - value.double()).abs() <= ulp).all(), f"{name}: {key} differs from the twin"


@pytest.mark.parametrize("name", EMPTY_CASES)
def test_no_tokens_is_a_no_op(name: str, cases, interpreted) -> None:
    for key, value in interpreted[name].items():
        if key == "pool":  # the cache is there with no tokens: nothing written to it
            assert torch.equal(value, cases[name][1]["pool"])
        else:
            assert value.shape[0] == 0, key


def test_dispatch_uses_the_twins_off_cuda() -> None:
    gen = torch.Generator().manual_seed(5)
    x, w = torch.randn(3, 40, generator=gen), torch.rand(40, generator=gen)
    assert torch.equal(kernels.rms_norm(x, w, EPS), reference.rms_norm(x, w, EPS))
    gate_up = torch.randn(3, 80, generator=gen)
    assert torch.equal(kernels.silu_and_mul(gate_up), reference.silu_and_mul(gate_up))
    q, k = torch.randn(3, 4, 16, generator=gen), torch.randn(3, 2, 16, generator=gen)
    table = torch.rand(10, 8, generator=gen)
    pos = torch.tensor([0, 9, 4])
    q2, k2 = q.clone(), k.clone()
    kernels.rotary(q, k, table, table, pos)
    reference.rotary(q2, k2, table, table, pos)
    assert torch.equal(q, q2) and torch.equal(k, k2)
    v, pool, slots = torch.randn(3, 2, 16, generator=gen), torch.randn(4, 2, 4, 2, 16, generator=gen), torch.tensor([5, -1, 0])
    pool2, flags = pool.clone(), torch.ones(2, dtype=torch.int32)
    kernels.rotary_and_write_kv(q, k, v, table, table, pos, pool[:, 0], pool[:, 1], slots, wait=(flags, flags[:1], 1))
    reference.rotary(q2, k2, table, table, pos)
    reference.write_kv(k2, v, pool2[:, 0], pool2[:, 1], slots)
    assert torch.equal(q, q2) and torch.equal(k, k2) and torch.equal(pool, pool2)


def test_ops_refuse_cpu_tensors_outside_the_interpreter() -> None:
    from kernels import triton_fused

    if triton_fused._INTERPRETED:
        pytest.skip("this process imported the kernels under TRITON_INTERPRET")
    with pytest.raises(ValueError, match="rms_norm: Triton kernels need CUDA tensors"):
        triton_fused.rms_norm(torch.randn(2, 8), torch.ones(8), EPS)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda f: f.rms_norm(torch.randn(2, 8), torch.ones(7), EPS), "rms_norm: weight must be [8]"),
        (lambda f: f.rms_norm(torch.randn(2, 8), torch.ones(8), EPS, torch.randn(3, 8)), "rms_norm: residual shape"),
        (lambda f: f.rms_norm(torch.randn(2, 8).half(), torch.ones(8), EPS), "rms_norm: weight dtype"),
        (lambda f: f.silu_and_mul(torch.randn(2, 7)), "silu_and_mul: gate_up must be [T, 2 * intermediate]"),
        (
            lambda f: f.rotary(torch.randn(2, 4, 8), torch.randn(3, 2, 8), torch.ones(9, 4), torch.ones(9, 4), torch.zeros(2, dtype=torch.long)),
            "rotary: q must be [T, Hq, D]",
        ),
        (
            lambda f: f.rotary(torch.randn(2, 4, 8), torch.randn(2, 2, 8), torch.ones(9, 5), torch.ones(9, 5), torch.zeros(2, dtype=torch.long)),
            "rotary: the tables rotate 10 dims",
        ),
        (
            lambda f: f.rotary(torch.randn(2, 4, 8), torch.randn(2, 2, 8), torch.ones(9, 4).double(), torch.ones(9, 4), torch.zeros(2, dtype=torch.long)),
            "rotary: cos must be a float32",
        ),
        (
            lambda f: f.rotary(torch.randn(2, 4, 8), torch.randn(2, 2, 8), torch.ones(9, 4), torch.ones(9, 4), torch.zeros(2)),
            "rotary: positions must be int32/int64",
        ),
    ],
)  # fmt: skip
def test_ops_reject_bad_arguments_naming_the_culprit(call, message: str) -> None:  # type: ignore[no-untyped-def]
    from kernels import triton_fused

    with pytest.raises(ValueError, match=re.escape(message)):
        call(triton_fused)


@pytest.mark.parametrize("arch", ["qwen2", "qwen3", "llama", "phi3"])
def test_fused_projections_load_from_checkpoint_names_and_split_back(arch: str, tmp_path: Path) -> None:
    """q/k/v (with Qwen2's biases) and gate/up of a sharded checkpoint land in their rows of the fused
    projections, split back to the very tensors of the files, and a missing one is named."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from cacheproxy.engine.model_config import ModelConfig, UnsupportedModel
    from cacheproxy.engine.model_files import weight_files
    from cacheproxy.engine.tiny_model import make_tiny_model
    from cacheproxy.engine.weights import build_model, checkpoint_state_dict, load_weights

    path = make_tiny_model(tmp_path / arch, arch, seed=3, shards=3)
    cfg = ModelConfig.from_path(path)
    model = build_model(cfg, torch.device("cpu"), torch.float32)
    load_weights(model, path)
    files: dict[str, torch.Tensor] = {}
    for file in weight_files(path):
        with safe_open(str(file), framework="pt") as f:
            files.update({name: f.get_tensor(name) for name in f.keys()})  # noqa: SIM118
    split = checkpoint_state_dict(model)
    assert set(split) == set(files) | ({"lm_head.weight"} if cfg.tie_word_embeddings else set())
    for name, tensor in files.items():
        assert torch.equal(split[name], tensor.float()), name
    qkv = model.model.layers[1].self_attn.qkv_proj.weight
    q_rows, kv_rows = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
    # Phi-3's files hold q/k/v as one matrix already: k is its rows after q's
    dropped = "model.layers.1.self_attn." + ("qkv_proj.weight" if arch == "phi3" else "k_proj.weight")
    k_in_file = files[dropped][q_rows : q_rows + kv_rows] if arch == "phi3" else files[dropped]
    assert torch.equal(qkv[q_rows : q_rows + kv_rows], k_in_file.float())

    # Drop one layer's k_proj (Phi-3: qkv_proj) from its shard: the error names it.
    for file in weight_files(path):
        with safe_open(str(file), framework="pt") as f:
            if dropped in f.keys():  # noqa: SIM118
                kept = {n: f.get_tensor(n) for n in f.keys() if n != dropped}  # noqa: SIM118
                metadata = f.metadata()
                break
    save_file(kept, str(file), metadata=metadata)
    with pytest.raises(UnsupportedModel, match=re.escape(dropped)):
        load_weights(build_model(cfg, torch.device("cpu"), torch.float32), path)


if __name__ == "__main__":
    _child_main(sys.argv[1], sys.argv[2])
