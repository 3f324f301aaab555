"""Chat prompts tokenized from where they part from a remembered one give exactly the ids of a whole
encode: growing agent conversations (tools, unicode, odd whitespace), many at once under several
cache namespaces, with memory small enough to evict, and on tokenizers of another kind."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import pytest
from tokenizers import AddedToken, decoders, models, normalizers, pre_tokenizers, trainers
from tokenizers import Tokenizer as HFTokenizer

from cacheproxy.engine.tiny_model import make_tiny_model
from cacheproxy.engine.tokenizer import Tokenizer
from cacheproxy.server.prompt_encoder import PromptEncoder

WORDS = ["read", "file", " path", "ok", "Error:", "\n", "  ", "\t", "é", "你好", "🙂", "<tool", "_call>", "{", "}",
         '"x"', "</", "im_end", "|>", "the", " a", "fn(", ")", "\n\n", "42", "-", "…"]  # fmt: skip
TOOL = {"type": "function", "function": {"name": "read_file", "description": "Read a file.",
        "parameters": {"type": "object", "properties": {"path": {"type": "string"}}}}}  # fmt: skip


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Tokenizer:
    return Tokenizer(make_tiny_model(tmp_path_factory.mktemp("pe") / "m", "qwen2", weights=False))


def _words(rng: random.Random, n: int) -> str:
    return "".join(rng.choice(WORDS) for _ in range(n))


def _conversation(rng: random.Random, turns: int) -> list[list[dict[str, Any]]]:
    """The message lists of one agent session, turn by turn (each extends the one before)."""
    msgs: list[dict[str, Any]] = [{"role": "system", "content": "You are an agent. " + _words(rng, 30)}]
    out = []
    for t in range(turns):
        msgs = [*msgs, {"role": "user", "content": _words(rng, rng.randrange(1, 60))}]
        out.append(msgs)
        if rng.random() < 0.5:
            call = {"id": f"c{t}", "type": "function",
                    "function": {"name": "read_file", "arguments": json.dumps({"path": _words(rng, 3)})}}  # fmt: skip
            msgs = [*msgs, {"role": "assistant", "content": None, "tool_calls": [call]},
                    {"role": "tool", "tool_call_id": f"c{t}", "content": _words(rng, rng.randrange(1, 80))}]
        else:
            msgs = [*msgs, {"role": "assistant", "content": _words(rng, rng.randrange(1, 40))}]
    return out


def test_every_prompt_of_many_growing_sessions_gets_the_whole_encodes_ids(tokenizer: Tokenizer) -> None:
    encoder = PromptEncoder(tokenizer, max_bytes=1 << 20)  # small enough to evict along the way
    assert encoder.enabled
    rng = random.Random(0)
    sessions = [(f"tenant-{i % 3}", _conversation(random.Random(i), 12)) for i in range(9)]
    for turn in range(12):
        for scope, turns in rng.sample(sessions, len(sessions)):
            text = tokenizer.apply_chat_template(turns[turn], tools=[TOOL])
            want = tokenizer.encode(text, add_special_tokens=False)
            assert encoder.encode(text, scope) == want, (scope, turn)
    # most of every later prompt came from the one before it (some were evicted on the way)
    assert encoder.tokens_reused > encoder.tokens_encoded


def test_a_prompt_is_reused_only_within_its_namespace(tokenizer: Tokenizer) -> None:
    encoder = PromptEncoder(tokenizer, max_bytes=1 << 20)
    turns = _conversation(random.Random(5), 3)
    first, second = (tokenizer.apply_chat_template(t) for t in turns[:2])
    encoder.encode(first, "alice")
    assert encoder.encode(second, "bob") == tokenizer.encode(second, add_special_tokens=False)
    assert encoder.tokens_reused == 0  # bob's first prompt: nothing of alice's is used
    assert encoder.encode(second, "alice") == tokenizer.encode(second, add_special_tokens=False)
    assert encoder.tokens_reused > 0


def test_off_it_tokenizes_whole(tokenizer: Tokenizer) -> None:
    encoder = PromptEncoder(tokenizer, max_bytes=0)
    assert not encoder.enabled
    text = tokenizer.apply_chat_template(_conversation(random.Random(1), 2)[1])
    assert encoder.encode(text, "") == tokenizer.encode(text, add_special_tokens=False)
    assert encoder.tokens_reused == 0


def _metaspace_model(folder: Path, prepend: str) -> Path:
    """A SentencePiece-style tokenizer (Llama 2's, Mistral's kind: ▁ for spaces, a prefix ▁ on the first
    piece), trained here, with a ChatML template."""
    tok = HFTokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    tok.normalizer = normalizers.Replace(" ", "▁")
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme=prepend, split=False)
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    rng = random.Random(3)
    corpus = [_words(rng, 50) for _ in range(2000)]
    trainer = trainers.BpeTrainer(vocab_size=800, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=list("▁") + [f"<0x{i:02X}>" for i in range(256)])  # fmt: skip
    tok.train_from_iterator(corpus, trainer)
    tok.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in ("<|im_start|>", "<|im_end|>")])
    # one that takes the whitespace before it (as some tokenizers' <mask> does): never a place to cut
    tok.add_special_tokens([AddedToken("<mask>", lstrip=True, normalized=False, special=True)])
    folder.mkdir(parents=True)
    tok.save(str(folder / "tokenizer.json"))
    template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")  # fmt: skip
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"chat_template": template, "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}))  # fmt: skip
    (folder / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "vocab_size": 1000}))
    return folder


@pytest.mark.parametrize("prepend", ["first", "always"])
def test_a_sentencepiece_style_tokenizer_is_either_reused_exactly_or_tokenized_whole(
    tmp_path: Path, prepend: str
) -> None:
    tokenizer = Tokenizer(_metaspace_model(tmp_path / prepend, prepend))
    encoder = PromptEncoder(tokenizer, max_bytes=1 << 20)
    for turns in [_conversation(random.Random(s), 6) for s in range(3)]:
        for msgs in turns:
            msgs = [{**m, "content": (m["content"] or "") + "  <mask> x"} for m in msgs if m["role"] != "tool"]
            text = tokenizer.apply_chat_template(msgs)
            assert encoder.encode(text, "t") == tokenizer.encode(text, add_special_tokens=False)
    assert encoder.tokens_reused > 0


def test_a_long_agent_turn_reuses_all_but_its_new_turn(tokenizer: Tokenizer) -> None:
    rng = random.Random(9)
    msgs: list[dict[str, Any]] = [{"role": "system", "content": _words(rng, 2000)}]
    for _ in range(40):
        msgs += [{"role": "user", "content": _words(rng, 300)}, {"role": "assistant", "content": _words(rng, 300)}]
    encoder = PromptEncoder(tokenizer, max_bytes=64 << 20)
    encoder.encode(tokenizer.apply_chat_template(msgs), "")
    after = tokenizer.apply_chat_template([*msgs, {"role": "user", "content": "and now?"}])
    before_reused, before_encoded = encoder.tokens_reused, encoder.tokens_encoded
    whole = tokenizer.encode(after, add_special_tokens=False)
    assert encoder.encode(after, "") == whole and len(whole) > 20_000
    assert encoder.tokens_encoded - before_encoded < 30  # the new user turn and the generation prompt
    assert encoder.tokens_reused - before_reused == len(whole) - (encoder.tokens_encoded - before_encoded)


def test_a_template_that_renders_no_probe_leaves_prompts_tokenized_whole(tmp_path: Path) -> None:
    folder = make_tiny_model(tmp_path / "m", "qwen2", weights=False)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["chat_template"] = "{{ raise_exception('this template takes no conversation') }}"
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    assert not PromptEncoder(Tokenizer(folder), max_bytes=1 << 20).enabled  # nothing checked, nothing trusted


def test_threads_encoding_at_once_each_get_the_whole_encodes_ids(tokenizer: Tokenizer) -> None:
    # the server tokenizes on a pool of threads: lookups, insertions and evictions interleave
    from concurrent.futures import ThreadPoolExecutor

    encoder = PromptEncoder(tokenizer, max_bytes=256 << 10)
    sessions = [(f"tenant-{i % 2}", _conversation(random.Random(100 + i), 8)) for i in range(8)]

    def run(session: tuple[str, list[list[dict[str, Any]]]]) -> bool:
        scope, turns = session
        return all(encoder.encode(text, scope) == tokenizer.encode(text, add_special_tokens=False)
                   for text in (tokenizer.apply_chat_template(t, tools=[TOOL]) for t in turns))  # fmt: skip

    with ThreadPoolExecutor(max_workers=4) as pool:
        assert all(pool.map(run, sessions))
    assert encoder.tokens_reused > 0
