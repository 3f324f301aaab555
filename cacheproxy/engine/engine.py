"""The synchronous engine: add requests, then `step()` = schedule -> run -> postprocess.

Only one thread drives an `LLMEngine` (the AsyncEngine's engine thread, or a test).
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from cacheproxy.cache.cost_model import CostModel, fit_prefill, measure_load_times
from cacheproxy.cache.fastpath import pack_token_ids
from cacheproxy.cache.hashing import BlockHasher, Namespace
from cacheproxy.cache.tier import KVTier
from cacheproxy.cache.tiered_store import TieredStore, build_lower_tiers
from cacheproxy.config import Settings
from cacheproxy.engine.block_pool import BlockIdentity, BlockPool
from cacheproxy.engine.detokenizer import IncrementalDetokenizer
from cacheproxy.engine.grammar import GrammarCompiler
from cacheproxy.engine.layer_gate import LayerGate
from cacheproxy.engine.model import CausalLM
from cacheproxy.engine.model_config import ModelConfig, UnsupportedModel
from cacheproxy.engine.model_files import model_fingerprint, resolve_model
from cacheproxy.engine.request import (
    EngineError,
    GenerationOutput,
    GenerationRequest,
    SamplingParams,
    StructuredOutput,
    TokenLogprob,
)
from cacheproxy.engine.runner import ModelRunner, StepResult
from cacheproxy.engine.scheduler import ScheduledChunk, ScheduledStep, Scheduler
from cacheproxy.engine.sequence import Sequence
from cacheproxy.engine.step_context import StepContext, set_context
from cacheproxy.engine.tokenizer import Tokenizer
from cacheproxy.engine.weights import build_model, init_random_weights, load_weights
from cacheproxy.log import get_logger

log = get_logger(__name__)

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def pick_device(setting: str) -> torch.device:
    if setting == "cuda" or (setting == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise EngineError("device 'cuda' asked for, but CUDA is not available", "no_device", 500)
        return torch.device("cuda")
    return torch.device("cpu")


def pick_dtype(setting: str, device: torch.device, cfg: ModelConfig) -> torch.dtype:
    if setting != "auto":
        return _DTYPES[setting]
    if device.type == "cpu":
        return torch.float32
    return torch.float16 if cfg.torch_dtype == "float16" else torch.bfloat16


@dataclass(slots=True)
class _Stream:
    """Per-sequence output state kept beside the Sequence."""

    detok: IncrementalDetokenizer
    emitted: int = 0  # characters of detok.text already handed out


class LLMEngine:
    def __init__(
        self,
        settings: Settings,
        model: CausalLM,
        tokenizer: Tokenizer,
        model_path: Path,
        device: torch.device,
        lower_tiers: list[KVTier] | None = None,
    ) -> None:
        self.settings = settings
        self.model = model
        self.tokenizer = tokenizer
        self.config = model.config
        self.device = device
        self.dtype = next(model.parameters()).dtype
        cfg = self.config
        limit = cfg.max_context
        self.max_model_len = min(settings.max_model_len or limit, limit)
        self.block_size = settings.block_size
        self.activation_bytes = 0  # measured on CUDA by _profile_activations
        num_blocks = self._num_kv_blocks()
        shape = (num_blocks, cfg.num_hidden_layers, 2, self.block_size, cfg.num_key_value_heads, cfg.head_dim)
        kv = torch.zeros(shape, dtype=self.dtype, device=device)
        self.pool = BlockPool(kv)
        fingerprint = model_fingerprint(model_path)
        if settings.load_format == "dummy":  # random weights: their KV must never meet a real model's
            fingerprint = hashlib.sha256(b"dummy\0%d\0" % settings.seed + fingerprint).digest()
        namespace = Namespace(
            model_fingerprint=fingerprint,
            kv_dtype=str(self.dtype).removeprefix("torch."),
            block_size=self.block_size,
        )
        self.namespace = namespace
        self.hasher = BlockHasher(namespace, settings.hash_seed)
        if lower_tiers is None:
            lower_tiers = build_lower_tiers(settings, namespace.digest, tuple(kv.shape[1:]), self.dtype)
        self.store = TieredStore(self.pool, lower_tiers, settings.cache_policy)
        gate = LayerGate.for_device(cfg.num_hidden_layers, device) if settings.layerwise_loads else None
        self.store.layer_gate = gate
        self.scheduler = Scheduler(self.pool, self.store, settings.max_num_seqs, settings.max_num_batched_tokens)
        self.runner = ModelRunner(model, kv, gate)
        self.runner.compile_kernels()
        if device.type == "cuda" and settings.cuda_graphs:
            self.runner.capture_graphs(settings.max_num_seqs, self.max_model_len, settings.max_num_batched_tokens)
        self.seqs: dict[str, Sequence] = {}
        # A step's bookkeeping waits until its outputs have left (`_settle`, at the next step): blocks it
        # filled are registered then, finished sequences' blocks released then. Registering a 32k-token
        # prompt's 2,048 blocks took ~12 ms of the first token's time on the GPU host.
        self._to_register: list[Sequence] = []
        self._to_release: list[Sequence] = []
        self.streams: dict[str, _Stream] = {}
        self.eos_ids = set(tokenizer.eos_token_ids) | set(cfg.eos_token_id)
        self.grammars = GrammarCompiler(
            tokenizer.to_json, max(cfg.vocab_size, tokenizer.vocab_size), sorted(self.eos_ids)
        )
        self.cost_model = self._measure_costs()
        if settings.cost_model:
            self.store.cost_model = self.cost_model
        log.info(
            "engine ready",
            architecture=cfg.architecture,
            device=str(device),
            dtype=str(self.dtype),
            kv_blocks=num_blocks,
            kv_pool_bytes=num_blocks * self.pool.block_bytes,
            activation_bytes=self.activation_bytes,
            block_size=self.block_size,
            max_model_len=self.max_model_len,
        )

    @classmethod
    def from_settings(cls, settings: Settings, lower_tiers: list[KVTier] | None = None) -> LLMEngine:
        path = resolve_model(settings.model, settings.data_dir)
        cfg = ModelConfig.from_path(path)
        device = pick_device(settings.device)
        d = cfg.head_dim
        if device.type == "cuda" and (d < 16 or d > 256 or d & (d - 1)):
            # before the weights load: the Triton attention kernels tile head_dim in powers of two
            raise UnsupportedModel(
                f"head_dim {d}: the CUDA attention kernels take a power of two in [16, 256]; "
                "this model runs on the CPU engine (device = cpu)"
            )
        dtype = pick_dtype(settings.dtype, device, cfg)
        torch.manual_seed(settings.seed)
        model = build_model(cfg, device, dtype)
        if settings.load_format == "dummy":
            init_random_weights(model, seed=settings.seed)
        else:
            load_weights(model, path)
        tokenizer = Tokenizer(path)
        return cls(settings, model, tokenizer, path, device, lower_tiers)

    def _num_kv_blocks(self) -> int:
        s = self.settings
        if s.num_kv_blocks:
            return s.num_kv_blocks
        per_block = self.config.kv_bytes_per_token(torch.finfo(self.dtype).bits // 8) * self.block_size
        if self.device.type == "cuda":
            # What is left of the card's share after the weights (and anything else already on it),
            # the activations of the largest step and the memory the CUDA graphs keep.
            free, total = torch.cuda.mem_get_info(self.device)
            self.activation_bytes = self._profile_activations()
            budget = int(free - (1.0 - s.gpu_memory_utilization) * total) - self.activation_bytes
        else:
            budget = 512 << 20
        if s.kv_cache_bytes is not None:
            budget = min(budget, s.kv_cache_bytes)
        n = max(budget, 0) // per_block
        need = -(-self.settings.max_num_batched_tokens // self.block_size) + 1
        if n < need:
            raise EngineError(
                f"KV pool of {max(budget, 0)} bytes holds {n} blocks; at least {need} are needed "
                "(lower max_num_batched_tokens or give the pool more memory)",
                "insufficient_memory",
                500,
            )
        return int(n)

    @torch.inference_mode()
    def _profile_activations(self) -> int:
        """Peak memory of the largest step, measured: a full-budget prefill and the logits and
        sampling buffers of a full batch, on a throw-away pool just big enough. Doubled when CUDA
        graphs are on: their private memory pool holds a (smaller) step's buffers for good."""
        s, cfg, dev = self.settings, self.config, self.device
        tokens = min(s.max_num_batched_tokens, self.max_model_len)
        blocks = -(-tokens // self.block_size)
        shape = (blocks, cfg.num_hidden_layers, 2, self.block_size, cfg.num_key_value_heads, cfg.head_dim)
        kv = torch.empty(shape, dtype=self.dtype, device=dev)
        torch.cuda.synchronize(dev)
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        self.model.bind_kv_pool(kv)
        table = torch.arange(blocks, dtype=torch.int32, device=dev).unsqueeze(0)
        positions = torch.arange(tokens, device=dev)
        set_context(
            StepContext(
                is_prefill=True,
                slot_mapping=positions.clone(),
                block_tables=table,
                cu_seqlens_q=torch.tensor([0, tokens], dtype=torch.int32, device=dev),
                cached_lens=torch.zeros(1, dtype=torch.int32, device=dev),
                max_query_len=tokens,
                max_cached_len=0,  # as a cold prompt's eager step: its kernels compile now, not in a request
            )
        )
        try:
            ids = torch.randint(0, cfg.vocab_size, (tokens,), device=dev)
            hidden = self.model(ids, positions)
            rows = min(s.max_num_seqs, tokens)
            logits = self.model.compute_logits(hidden[-rows:])
            torch.softmax(logits, -1).log_().max(-1)
            del hidden, logits
        finally:
            set_context(None)
        torch.cuda.synchronize(dev)
        peak = torch.cuda.max_memory_allocated(dev) - base
        del kv
        torch.cuda.empty_cache()
        graphs = 2 if s.cuda_graphs else 1
        # 64 MiB of slack for the allocator's rounding and the tiers' staging copies
        return graphs * peak + (64 << 20)

    def _measure_costs(self) -> CostModel:
        """Prefill speed of this model on this device, and each tier's time to load one block."""
        # Recompute time: a line through a long prefill (the device busy, as when a long prefix is
        # recomputed) and one of half its length, with a one-block pass as every pass's floor (each
        # pass reads all the weights, however few its tokens).
        n = min(self.settings.max_num_batched_tokens, 2048, self.max_model_len, (self.pool.num_free - 1) * self.block_size)
        short = max(1, n // 2)
        ids = torch.randint(0, self.config.vocab_size, (n,), generator=torch.Generator().manual_seed(0)).tolist()
        sync = torch.cuda.synchronize if self.device.type == "cuda" else (lambda: None)

        def timed(tokens: list[int], repeats: int) -> float:
            best = float("inf")
            for _ in range(repeats):
                t0 = time.perf_counter()
                self.score(tokens)
                sync()
                best = min(best, time.perf_counter() - t0)
            return best

        timed(ids, 1)  # warm-up (kernel compilation, allocator)
        timed(ids[:short], 1)
        fixed, tokens_per_s = fit_prefill((short, timed(ids[:short], 3)), (n, timed(ids, 2)))
        one_block = ids[: min(n, self.block_size)]
        timed(one_block, 1)
        min_pass = timed(one_block, 3)
        scratch = self.pool.allocate()
        try:
            loads = measure_load_times(self.store.tiers, self.pool.kv[scratch], sync)
        finally:
            self.pool.release(scratch)
        cost = CostModel(
            self.block_size, self.pool.block_bytes, tokens_per_s, loads, prefill_fixed_s=fixed, prefill_min_s=min_pass
        )
        log.info("cost model", **cost.as_dict())
        return cost

    # --- requests -----------------------------------------------------------------------
    def check_request(self, req: GenerationRequest) -> None:
        """Raises EngineError for a request the engine can never run. Reads only fixed state, so
        any thread may call it. A structured output is checked apart (`check_structured`)."""
        self._checked_prompt(req)

    def check_structured(self, spec: StructuredOutput) -> None:
        """Raises EngineError when `spec` does not compile. May take milliseconds (a second the first
        time), any thread may call it, and `add_request` then finds it compiled."""
        self.grammars.check(spec)

    def structured_compiled(self, spec: StructuredOutput) -> bool:
        return self.grammars.compiled(spec)

    def _checked_prompt(self, req: GenerationRequest) -> tuple[list[int], bytes]:
        """check_request's checks; returns a copy of the prompt's ids and their int32-LE bytes, made
        in the same pass as the vocabulary check (the hash chain and the admission walk use them)."""
        params = req.params
        params.validate()
        n = len(req.prompt_token_ids)
        if n == 0:
            raise EngineError("the prompt is empty", "invalid_prompt")
        if n + params.max_tokens > self.max_model_len:
            raise EngineError(
                f"This model's maximum context length is {self.max_model_len} tokens. However, you "
                f"requested {n + params.max_tokens} tokens ({n} in the messages, {params.max_tokens} "
                "in the completion). Please reduce the length of the messages or completion.",
                "context_length_exceeded",
            )
        vocab = self.config.vocab_size
        try:
            prompt, packed, lowest, highest = pack_token_ids(req.prompt_token_ids)
        except (OverflowError, TypeError):  # beyond int32 (so beyond any vocabulary), or not integers
            prompt, packed, lowest, highest = [], b"", -1, -1
        if lowest < 0 or highest >= vocab:
            raise EngineError(f"token ids must be in [0, {vocab})", "invalid_prompt")
        need = -(-(n + params.max_tokens) // self.block_size)
        if need > self.pool.num_blocks:
            raise EngineError(
                f"the request needs {need} KV blocks, the pool has {self.pool.num_blocks}",
                "context_length_exceeded",
            )
        return prompt, packed

    def add_request(self, req: GenerationRequest) -> None:
        prompt, packed = self._checked_prompt(req)
        if req.request_id in self.seqs:
            raise EngineError(f"request id {req.request_id} is already running", "duplicate_request")
        params = req.params
        root = self.hasher.root(req.cache_salt)
        seq = Sequence(req.request_id, prompt, params, root, prompt_packed=packed)
        structured = params.structured
        if structured is not None and structured.tentative:
            seq.tentative_matcher = self.grammars.matcher(structured)
        elif structured is not None and not structured.lazy:
            seq.matcher = self.grammars.matcher(structured)
        # Until min_tokens the tokens that would end the text are not drawn (as vLLM does); a structured
        # output ends where its constraint says.
        if params.min_tokens > 0 and seq.matcher is None:
            eos = set() if params.ignore_eos else self.eos_ids
            seq.held_back = sorted(eos | set(params.stop_token_ids))
        # A view of the packed ids, hashed in place: no second conversion of the ids.
        seq.block_hashes = self.hasher.hash_blocks(np.frombuffer(packed, dtype="<i4"), parent=root)
        if params.seed is not None and not params.greedy:
            # Any 64-bit seed (negative ones too) maps onto the generator's unsigned range. On the logits'
            # device: a CPU generator made each seeded row copy its probabilities to the host every step
            # (batch 8 on an H100: 171 tokens/s against 826 unseeded).
            seq.generator = torch.Generator(device=self.device).manual_seed(params.seed % (2**64 - 1))
        self.seqs[req.request_id] = seq
        self.streams[req.request_id] = _Stream(IncrementalDetokenizer(self.tokenizer))
        self.scheduler.add(seq)

    def abort(self, request_id: str) -> None:
        self._settle()  # what the aborted sequence filled stays cached
        seq = self.seqs.pop(request_id, None)
        self.streams.pop(request_id, None)
        if seq is not None and not seq.is_finished:
            self.scheduler.finish(seq)

    def has_work(self) -> bool:
        return self.scheduler.has_work() or bool(self._to_register or self._to_release)

    @property
    def num_running(self) -> int:
        return len(self.scheduler.running)

    @property
    def num_waiting(self) -> int:
        return len(self.scheduler.waiting)

    # --- the step -----------------------------------------------------------------------
    def step(self) -> list[GenerationOutput]:
        self._settle()
        if self.store.pins:
            self.store.expire_pins(time.time())
        step = self.scheduler.schedule()
        if not step.chunks:
            if self.store.has_pending_loads:  # nothing to compute meanwhile: finish them
                self.store.advance_loads(float("inf"))
            return []
        launched = self.runner.launch(step)
        if self.store.has_pending_loads:
            # Prefix blocks load while the device runs the step (at least one block per step).
            self.store.advance_loads(self.cost_model.prefill_s(sum(c.length for c in step.chunks)))
        result = self.runner.collect(launched)
        return self._postprocess(step, result)

    def _postprocess(self, step: ScheduledStep, result: StepResult) -> list[GenerationOutput]:
        outputs: list[GenerationOutput] = []
        lp_iter = iter(result.logprobs)
        for chunk, token in zip(step.chunks, result.tokens, strict=True):
            seq = chunk.seq
            seq.num_computed = chunk.start + chunk.length
            self._to_register.append(seq)
            if token is None:
                continue
            lp = next(lp_iter)
            if seq.is_finished:  # aborted while the step ran
                continue
            seq.output_ids.append(token)
            if seq.matcher is not None:
                if not seq.matcher.accept(token):
                    log.warning("structured output rejected a sampled token", request_id=seq.request_id,
                                token=token, error=seq.matcher.error)  # fmt: skip
            elif seq.tentative_matcher is not None:
                self._feed_tentative(seq, token)
            elif (spec := seq.params.structured) is not None and token == spec.after_token:
                seq.matcher = self.grammars.matcher(spec)  # compiled when the request was checked
            if lp is not None:
                seq.pending_logprobs.append(self._logprob(token, lp))
            outputs.append(self._emit(seq, token))
        return outputs

    def _feed_tentative(self, seq: Sequence, token: int) -> None:
        matcher = seq.tentative_matcher
        assert matcher is not None
        if not matcher.accept(token):
            seq.tentative_matcher = None  # the model wrote something else: its text stays free
        elif self.tokenizer.decode([token], skip_special_tokens=False).strip():
            seq.matcher, seq.tentative_matcher = matcher, None  # it began what the constraint describes

    def _settle(self) -> None:
        """The last step's bookkeeping, once its outputs are out: the blocks it filled join the prefix
        cache (before the next admission looks for them), then finished sequences give theirs back."""
        if self._to_register:
            for seq in self._to_register:
                if seq.block_table:  # not released meanwhile
                    self._register_filled(seq)
            self._to_register.clear()
        if self._to_release:
            for seq in self._to_release:
                self.scheduler.release(seq)
            self._to_release.clear()

    def _register_filled(self, seq: Sequence) -> None:
        bs = self.block_size
        full = seq.num_computed // bs
        for i in range(seq.num_registered, full):
            parent = seq.block_hashes[i - 1] if i > 0 else seq.root_hash
            toks = tuple(seq.token_ids(i * bs, (i + 1) * bs))
            if i >= len(seq.block_hashes):
                seq.block_hashes.append(self.hasher.next_hash(parent, toks))
            ident = BlockIdentity(seq.block_hashes[i], parent, toks, i)
            seq.set_block(i, self.store.register(seq.block_table[i], ident))
        seq.num_registered = max(seq.num_registered, full)

    def _logprob(self, token: int, lp: tuple[float, list[tuple[int, float]]]) -> TokenLogprob:
        dec = self.tokenizer.decode
        return TokenLogprob(
            token_id=token,
            token=dec([token], skip_special_tokens=False),
            logprob=lp[0],
            top=[(t, dec([t], skip_special_tokens=False), v) for t, v in lp[1]],
        )

    def _emit(self, seq: Sequence, token: int) -> GenerationOutput:
        """One output per sampled token; its text may be empty while characters are held back."""
        p = seq.params
        stream = self.streams[seq.request_id]
        detok = stream.detok
        finish: str | None = None
        stop_reason: str | int | None = None
        n_out = len(seq.output_ids)
        is_eos = token in self.eos_ids and not p.ignore_eos
        if n_out >= p.min_tokens and (is_eos or token in p.stop_token_ids):
            finish, stop_reason = "stop", (None if is_eos else token)
        else:
            before = len(detok.text)
            detok.add(token)
            hit = detok.find_stop(p.stop, len(detok.text) - before) if n_out >= p.min_tokens else None
            if hit is not None:
                finish, stop_reason = "stop", hit[1]
                detok.text = detok.text[: hit[0]]
            elif seq.matcher is not None and (seq.matcher.done or seq.matcher.error):
                finish = "stop"  # the structured output is complete (or cannot go on)
            elif n_out >= p.max_tokens or seq.num_tokens >= self.max_model_len:
                finish = "length"
        if finish is None:
            end = detok.safe_length(p.stop)  # hold back what may begin a stop string
        else:
            if not isinstance(stop_reason, str):
                detok.finish()  # hand over characters held back for an unfinished UTF-8 sequence
            end = len(detok.text)
        delta = detok.text[stream.emitted : end] if end > stream.emitted else ""
        stream.emitted = max(stream.emitted, end)
        first = not seq.reported_first
        out = GenerationOutput(
            request_id=seq.request_id,
            text=delta,
            token_ids=[token],
            finish_reason=finish,
            prompt_tokens=len(seq.prompt_ids),
            completion_tokens=n_out,
            stop_reason=stop_reason,
        )
        if first or finish is not None:
            out.cached_tokens = seq.cached_tokens
            out.cached_tokens_by_tier = dict(seq.cached_by_tier)
            out.queue_time_s = (seq.first_scheduled_time or seq.arrival_time) - seq.arrival_time
        seq.reported_first = True
        if seq.pending_logprobs:
            out.logprobs, seq.pending_logprobs = seq.pending_logprobs, []
        if finish is not None:
            seq.finish_reason, seq.stop_reason = finish, stop_reason
            self.scheduler.retire(seq)  # out of the batch now; its blocks after their registration
            self._to_release.append(seq)
            self.seqs.pop(seq.request_id, None)
            self.streams.pop(seq.request_id, None)
        return out

    def score(self, prompt_ids: list[int]) -> torch.Tensor:
        """Logits after every prompt token, [T, vocab], from one uncached prefill.

        Runs outside the batch: call it only when no request is running on this engine.
        """
        self._settle()  # blocks of a finished request still held until then
        seq = Sequence("score", list(prompt_ids), SamplingParams(max_tokens=1), self.hasher.root())
        need = -(-len(prompt_ids) // self.block_size)
        if need > self.pool.num_free:
            raise EngineError("not enough free KV blocks to score this prompt", "insufficient_memory", 503)
        seq.block_table = [self.pool.allocate() for _ in range(need)]
        try:
            return self.runner.logits(ScheduledStep([ScheduledChunk(seq, 0, len(prompt_ids))]))
        finally:
            for b in seq.block_table:
                self.pool.release(b)

    # --- operator controls: run on the engine thread (AsyncEngine.run_on_engine) ------------
    def cache_entries(self, limit: int = 100) -> list[dict[str, object]]:
        self._settle()
        return self.store.entries(limit)

    def pin_prefix(self, hash_hex: str, ttl_s: float) -> int:
        self._settle()
        if ttl_s <= 0:
            raise EngineError("ttl must be positive", "invalid_value")
        n = self.store.pin(_parse_hash(hash_hex), ttl_s)
        if n == 0:
            raise EngineError(f"no cached prefix {hash_hex} in the GPU tier", "not_found", 404)
        return n

    def unpin_prefix(self, hash_hex: str) -> int:
        return self.store.unpin(_parse_hash(hash_hex))

    def evict_prefix(self, hash_hex: str | None) -> dict[str, int]:
        self._settle()
        return self.store.evict(None if hash_hex is None else _parse_hash(hash_hex))

    # --- reporting and lifecycle ------------------------------------------------------------
    def stats(self) -> dict[str, object]:
        s = self.store.stats()
        s["requests"] = {"running": self.num_running, "waiting": self.num_waiting}
        s["cost_model"] = self.cost_model.as_dict()
        return s

    def shutdown(self) -> None:
        self._settle()
        flushed = self.store.flush()
        self.store.close()
        log.info("engine stopped", flushed_blocks=flushed)


def _parse_hash(hash_hex: str) -> bytes:
    try:
        h = bytes.fromhex(hash_hex)
    except ValueError:
        h = b""
    if len(h) != 16:
        raise EngineError(f"a prefix hash is 32 hex digits, got {hash_hex!r}", "invalid_value")
    return h


def generate_blocking(engine: LLMEngine, requests: list[GenerationRequest]) -> dict[str, list[int]]:
    """Runs requests to completion on the calling thread; returns each one's output token ids."""
    out: dict[str, list[int]] = {r.request_id: [] for r in requests}
    for r in requests:
        engine.add_request(r)
    start = time.monotonic()
    while engine.has_work():
        for o in engine.step():
            out[o.request_id].extend(o.token_ids)
        if time.monotonic() - start > 600:
            raise TimeoutError("generation did not finish")
    return out
