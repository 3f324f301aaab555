"""A request's admission: the prompt is checked, copied and packed once, and a prefix held in the pool
is taken and given back whole, with the same refusals and the same matches as block-by-block code."""

from __future__ import annotations

import numpy as np
import pytest

from cacheproxy.cache import fastpath
from cacheproxy.config import Settings
from cacheproxy.engine.engine import LLMEngine, generate_blocking
from cacheproxy.engine.request import EngineError, GenerationRequest, SamplingParams
from cacheproxy.engine.tiny_model import make_tiny_model


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> LLMEngine:
    root = tmp_path_factory.mktemp("admission")
    path = make_tiny_model(root / "llama", "llama", seed=7)
    settings = Settings(
        model=str(path), data_dir=root, num_kv_blocks=200, cpu_cache_bytes=0, disk_cache_enabled=False
    )
    return LLMEngine.from_settings(settings)


def _greedy(max_tokens: int = 1) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)


@pytest.mark.parametrize(
    "prompt",
    [
        [5, 1.5],
        [5, "6"],
        [5, None],
        [-1, 5],
        [5, 2**31 - 1],
        [5, 2**31],
        [5, -(2**31) - 1],
        [5, 2**40],
        [2**70, 5],
        [5, 1.5, 2**70],
    ],
)
def test_ids_outside_the_vocabulary_or_not_integers_are_invalid_prompts(
    engine: LLMEngine, prompt: list[object]
) -> None:
    req = GenerationRequest("bad", prompt, _greedy())  # type: ignore[arg-type]
    for call in (engine.check_request, engine.add_request):
        with pytest.raises(EngineError) as e:
            call(req)
        assert e.value.code == "invalid_prompt" and str(engine.config.vocab_size) in str(e.value)
    assert not engine.has_work()


def test_the_vocabulary_edge_and_integer_like_ids_are_accepted(engine: LLMEngine) -> None:
    vocab = engine.config.vocab_size
    for prompt in ([0, vocab - 1], (3, 4, 5), [np.int64(7), np.int32(8), True]):
        engine.check_request(GenerationRequest("ok", prompt, _greedy()))  # type: ignore[arg-type]
    with pytest.raises(EngineError, match="token ids must be"):
        engine.check_request(GenerationRequest("edge", [0, vocab], _greedy()))


def test_a_sequence_keeps_its_own_copy_and_its_packed_ids(engine: LLMEngine) -> None:
    prompt = list(range(5, 5 + 3 * engine.block_size + 4))
    engine.add_request(GenerationRequest("copy", prompt, _greedy()))
    seq = engine.seqs["copy"]
    prompt.append(9)  # the caller's list is not the engine's
    assert seq.prompt_ids == prompt[:-1] and seq.prompt_ids is not prompt
    assert seq.prompt_packed == fastpath.int32_bytes(seq.prompt_ids)
    assert seq.block_hashes == engine.hasher.hash_blocks(seq.prompt_ids)
    engine.abort("copy")
    assert not engine.has_work()


def test_a_prefix_in_the_pool_is_taken_whole_and_given_back_whole(engine: LLMEngine) -> None:
    bs = engine.block_size
    pool = engine.pool
    prefix = [(i * 37) % 1000 + 5 for i in range(40 * bs)]
    cold = generate_blocking(engine, [GenerationRequest("cold", [*prefix, 6, 7, 8], _greedy(3))])
    free = pool.num_free
    for i in range(3):
        engine.add_request(GenerationRequest(f"warm{i}", [*prefix, 6, 7, 8], _greedy(3)))
        step = engine.scheduler.schedule()
        assert step.chunks[0].start == len(prefix)  # every block of the prefix, from the pool
        assert engine.seqs[f"warm{i}"].block_table[:40] == [
            pool.by_hash[h] for h in engine.seqs[f"warm{i}"].block_hashes[:40]
        ]
        outs = engine._postprocess(step, engine.runner.run(step))
        while engine.has_work():
            outs += engine.step()
        assert [t for o in outs for t in o.token_ids] == cold["cold"]
        assert pool.num_free == free
        assert all(c == 0 for c in pool.ref_counts)


def test_a_preempted_sequence_is_readmitted_with_its_output_packed_too(engine: LLMEngine) -> None:
    bs = engine.block_size
    prompt = [(i * 11) % 900 + 5 for i in range(3 * bs)]
    engine.add_request(GenerationRequest("pre", prompt, _greedy(bs + 3)))
    for _ in range(bs + 1):
        engine.step()
    seq = engine.seqs["pre"]
    assert len(seq.output_ids) == bs + 1
    engine._settle()  # as a step does before its schedule can preempt: the last step's blocks published
    engine.scheduler._preempt(seq)
    assert seq.num_computed == 0
    engine.scheduler.schedule()
    # the prompt's blocks and the block of generated ids are all found again
    assert seq.num_computed == (len(prompt) + bs) // bs * bs
    while engine.has_work():
        engine.step()
    assert all(c == 0 for c in engine.pool.ref_counts)


def test_a_steps_blocks_join_the_cache_after_its_outputs_leave(engine: LLMEngine) -> None:
    """The first token goes out before the step's bookkeeping: its filled blocks are registered, and a
    finished sequence's blocks given back, when the engine steps next (before it admits anyone)."""
    bs = engine.block_size
    engine.evict_prefix(None)
    prompt = [(i * 13) % 900 + 7 for i in range(3 * bs + 2)]
    engine.add_request(GenerationRequest("first", prompt, _greedy(1)))
    outs = engine.step()
    assert [o.finish_reason for o in outs] == ["length"]
    assert engine.pool.num_cached == 0 and engine.has_work()  # registration still to do
    assert engine.step() == []
    assert engine.pool.num_cached == 3 and not engine.has_work()
    assert all(c == 0 for c in engine.pool.ref_counts)
    # a request that arrives before that next step still finds the blocks: it registers, then admits
    engine.evict_prefix(None)
    engine.add_request(GenerationRequest("first-again", prompt, _greedy(1)))
    engine.step()
    engine.add_request(GenerationRequest("second", prompt, _greedy(1)))
    outs = engine.step()
    assert [(o.request_id, o.cached_tokens) for o in outs] == [("second", 3 * bs)]
    while engine.has_work():
        engine.step()
    assert all(c == 0 for c in engine.pool.ref_counts)
