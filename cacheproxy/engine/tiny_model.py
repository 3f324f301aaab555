"""A small random-weight model in Hugging Face format, made locally so that nothing needs a hub.

`make_tiny_model` writes config.json, model.safetensors (or shards + index), tokenizer.json (a
byte-level BPE trained here by `tokenizers` on a corpus generated in code), tokenizer_config.json
(with a chat template that knows tools) and generation_config.json. It uses only torch,
safetensors, tokenizers and json, runs in a few seconds, and the same arguments always give
byte-identical files.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from tokenizers import (
    AddedToken,
    Regex,
    Tokenizer,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    processors,
    trainers,
)

ARCHITECTURES: dict[str, tuple[str, str]] = {
    "llama": ("LlamaForCausalLM", "llama"),
    "llama3": ("LlamaForCausalLM", "llama"),
    "mistral": ("MistralForCausalLM", "mistral"),
    "qwen2": ("Qwen2ForCausalLM", "qwen2"),
    "qwen3": ("Qwen3ForCausalLM", "qwen3"),
    "phi3": ("Phi3ForCausalLM", "phi3"),
    "granite": ("GraniteForCausalLM", "granite"),
}

BOS_TOKEN = "<s>"
EOS_TOKEN = "</s>"
PAD_TOKEN = "<pad>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
SPECIAL_TOKENS = [BOS_TOKEN, EOS_TOKEN, PAD_TOKEN, IM_START, IM_END]
# Markers the chat template writes around tool calls; ordinary (not special) added tokens, as in
# real models, so that decoding with skip_special_tokens keeps them for the tool-call parser.
TOOL_MARKERS = ["<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>"]

# Words, single digits, punctuation runs, newlines and spaces: the split GPT-4-era BPEs use.
PRETOKENIZE_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)

DEFAULTS: dict[str, Any] = {
    "num_hidden_layers": 2,
    "hidden_size": 64,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "intermediate_size": 128,
    "max_position_embeddings": 4096,
    "rope_theta": 10000.0,
    "rms_norm_eps": 1e-6,
    "vocab_size": 2048,
    "tie_word_embeddings": False,
    "dtype": "float32",
    "shards": 1,
    "init_std": 0.02,
    # Biases Llama's config can switch on: q/k/v/o (Qwen3's too) and gate/up/down. Off in real Llamas;
    # here so the loader and the model are tested with them.
    "attention_bias": False,
    "mlp_bias": False,
}

# ChatML-style turns; tools go into the system turn as one JSON object a line, assistant tool calls
# as <tool_call>{"name": ..., "arguments": ...}</tool_call>, tool results as <tool_response> blocks.
CHAT_TEMPLATE = (
    "{%- if bos_token %}{{- bos_token }}{%- endif %}\n"
    "{%- if messages and messages[0]['role'] == 'system' %}\n"
    "    {%- set system_text = messages[0]['content'] %}\n"
    "    {%- set turns = messages[1:] %}\n"
    "{%- else %}\n"
    "    {%- set system_text = '' %}\n"
    "    {%- set turns = messages %}\n"
    "{%- endif %}\n"
    "{%- if tools %}\n"
    "    {{- '<|im_start|>system\\n' }}\n"
    "    {%- if system_text %}{{- system_text + '\\n\\n' }}{%- endif %}\n"
    "    {{- '# Tools\\n\\nYou may call one or more functions. Write each call as a JSON object "
    "inside <tool_call></tool_call> tags. The functions:\\n<tools>\\n' }}\n"
    "    {%- for tool in tools %}{{- tool | tojson }}{{- '\\n' }}{%- endfor %}\n"
    "    {{- '</tools><|im_end|>\\n' }}\n"
    "{%- elif system_text %}\n"
    "    {{- '<|im_start|>system\\n' + system_text + '<|im_end|>\\n' }}\n"
    "{%- endif %}\n"
    "{%- for message in turns %}\n"
    "    {%- if message['role'] == 'user' or message['role'] == 'system' %}\n"
    "        {{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}\n"
    "    {%- elif message['role'] == 'assistant' %}\n"
    "        {{- '<|im_start|>assistant\\n' }}\n"
    "        {%- if message['content'] %}{{- message['content'] }}{%- endif %}\n"
    "        {%- if message['tool_calls'] %}\n"
    "            {%- for call in message['tool_calls'] %}\n"
    "                {%- set fn = call['function'] if call['function'] is defined else call %}\n"
    "                {%- if message['content'] or not loop.first %}{{- '\\n' }}{%- endif %}\n"
    "                {{- '<tool_call>\\n{\"name\": \"' + fn['name'] + '\", \"arguments\": ' }}\n"
    "                {%- if fn['arguments'] is string %}{{- fn['arguments'] }}"
    "{%- else %}{{- fn['arguments'] | tojson }}{%- endif %}\n"
    "                {{- '}\\n</tool_call>' }}\n"
    "            {%- endfor %}\n"
    "        {%- endif %}\n"
    "        {{- '<|im_end|>\\n' }}\n"
    "    {%- elif message['role'] == 'tool' %}\n"
    "        {{- '<|im_start|>tool\\n<tool_response>\\n' + message['content'] "
    "+ '\\n</tool_response><|im_end|>\\n' }}\n"
    "    {%- else %}\n"
    "        {{- raise_exception('unknown message role: ' + message['role']) }}\n"
    "    {%- endif %}\n"
    "{%- endfor %}\n"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}\n"
)

_WORDS = (  # noqa: SIM905 - a sentence is easier to read than a list
    "the a an of to in and or but if then when while for with without from into over under about "
    "is are was were be been being have has had do does did can could will would should may might "
    "cache prefix token tokens block blocks model models request requests server proxy engine "
    "memory disk tier tiers hit miss latency time first answer question agent tool tools call "
    "function arguments result results user assistant system message messages context window "
    "attention kernel kernels batch decode prefill sample sampling temperature stream chunk "
    "weather city today tomorrow morning evening price order customer file folder data value key "
    "list table number numbers text word words line lines page book story river mountain small "
    "large fast slow new old good bad true false yes no please thanks hello world compute store "
    "load save read write send receive open close start stop run wait find people time year way "
    "day thing man woman child life hand part place case week company I you he she it we they "
    "this that these those my your his her its our their what which who"
).split()
_FOREIGN = (  # noqa: SIM905 - a sentence is easier to read than a list
    "café élève naïve déjà vu crème brûlée über straße señor año niño 日本 日本語 東京 こんにちは ありがとう 中文 你好 "
    "世界 привет мир γειά σου κόσμε مرحبا שלום नमस्ते"
).split()
_EMOJI = ["😀", "🚀", "👍", "🎉", "❤️", "🔥", "🤖", "🌍", "✨", "☕"]
_NAMES = ["Alice", "Bob", "Carol", "Dave", "Eve", "Mallory", "Paris", "London", "Tokyo", "Berlin"]
_CODE = [
    "def f(x):\n    return x + 1\n",
    "for i in range(10):\n    print(i)\n",
    "if (a != b && c >= 0) { return a[i]; }\n",
    'x = {"key": [1, 2, 3], "ok": true, "name": null}\n',
    "SELECT id, name FROM users WHERE age > 30;\n",
    "import json\nprint(json.dumps({'a': 1}))\n",
]


_ONSETS = "b c d f g h j k l m n p r s t v w st tr ch sh pl gr th".split()  # noqa: SIM905
_VOWELS = ["a", "e", "i", "o", "u", "ea", "ou", "ai", "io"]
_CODAS = ["", "", "n", "r", "s", "t", "l", "nd", "ng", "st", "rk", "m"]


def _pseudo_words(rng: random.Random, count: int) -> list[str]:
    """Made-up English-looking words: they give the BPE trainer enough distinct pairs to merge."""
    words = []
    for _ in range(count):
        syllables = rng.randint(1, 4)
        words.append(
            "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_CODAS) for _ in range(syllables))
        )
    return words


def training_corpus(sentences: int = 6000) -> list[str]:
    """English-ish text, numbers, code, JSON tool calls and some non-ASCII, the same every time."""
    rng = random.Random(20240601)
    vocabulary = _WORDS * 8 + _pseudo_words(rng, 3000)
    lines: list[str] = []
    for _ in range(sentences):
        kind = rng.random()
        n = rng.randint(4, 16)
        words = [rng.choice(vocabulary) for _ in range(n)]
        if kind < 0.55:
            words[0] = words[0].capitalize()
            if rng.random() < 0.3:
                words.insert(rng.randrange(len(words)), rng.choice(_NAMES))
            end = rng.choice([".", ".", ".", "?", "!", "...", ":"])
            lines.append(" ".join(words) + end)
        elif kind < 0.68:
            num = rng.choice(
                [
                    str(rng.randint(0, 99999)),
                    f"{rng.uniform(0, 1000):.2f}",
                    f"{rng.randint(1, 12)}/{rng.randint(1, 28)}/20{rng.randint(10, 30)}",
                ]
            )
            lines.append(
                f"{rng.choice(_NAMES)} paid ${num} (#{rng.randint(1, 999)}) - {rng.choice(_WORDS)}; ok, {rng.randint(0, 100)}%"
            )
        elif kind < 0.78:
            foreign = [rng.choice(_FOREIGN) for _ in range(rng.randint(1, 5))]
            lines.append(" ".join(foreign) + " " + rng.choice(_EMOJI) + " " + " ".join(words[:4]))
        elif kind < 0.88:
            args = {"city": rng.choice(_NAMES), "days": rng.randint(1, 7), "unit": rng.choice(["c", "f"])}
            call = {"name": "get_" + rng.choice(_WORDS), "arguments": args}
            lines.append("<tool_call>\n" + json.dumps(call) + "\n</tool_call>")
        else:
            lines.append(rng.choice(_CODE) + " # " + " ".join(words[:5]))
    return lines


def train_tokenizer(vocab_size: int = 2048, add_bos: bool = True) -> Tokenizer:
    """Byte-level BPE with every byte in the alphabet, so any UTF-8 text encodes.

    The normalizer and pre-tokenizer are the ones transformers hard-codes for Qwen2 tokenizers
    (NFC; split by PRETOKENIZE_PATTERN; bytes), so that every loader splits text the same way.
    """
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - len(TOOL_MARKERS),
        min_frequency=2,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(training_corpus(), trainer=trainer)
    tok.add_tokens([AddedToken(t, normalized=False, special=False) for t in TOOL_MARKERS])
    if not add_bos:
        return tok
    bos_id = tok.token_to_id(BOS_TOKEN)
    # Plain encodes (the completions route) start with BOS, as Llama's do (Qwen's don't); chat
    # templates write it themselves.
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS_TOKEN} $A",
        pair=f"{BOS_TOKEN} $A {BOS_TOKEN} $B",
        special_tokens=[(BOS_TOKEN, bos_id)],
    )
    return tok


def _model_config(arch: str, tok: Tokenizer, p: dict[str, Any]) -> dict[str, Any]:
    cls_name, model_type = ARCHITECTURES[arch]
    if arch == "qwen2" and p["hidden_size"] != p["num_attention_heads"] * p["head_dim"]:
        raise ValueError("qwen2 derives head_dim from hidden_size / num_attention_heads; make them agree")
    eos_ids = [tok.token_to_id(EOS_TOKEN), tok.token_to_id(IM_END)]
    cfg: dict[str, Any] = {
        "architectures": [cls_name],
        "model_type": model_type,
        # the embedding may be wider than the tokenizer (as in many checkpoints), never narrower
        "vocab_size": max(int(p["vocab_size"]), tok.get_vocab_size(with_added_tokens=True)),
        "hidden_size": p["hidden_size"],
        "intermediate_size": p["intermediate_size"],
        "num_hidden_layers": p["num_hidden_layers"],
        "num_attention_heads": p["num_attention_heads"],
        "num_key_value_heads": p["num_key_value_heads"],
        "head_dim": p["head_dim"],
        "hidden_act": "silu",
        "max_position_embeddings": p["max_position_embeddings"],
        "rms_norm_eps": p["rms_norm_eps"],
        "rope_theta": p["rope_theta"],
        "rope_scaling": None,
        "tie_word_embeddings": p["tie_word_embeddings"],
        "initializer_range": p["init_std"],
        "attention_dropout": 0.0,
        "use_cache": True,
        "bos_token_id": tok.token_to_id(BOS_TOKEN),
        "eos_token_id": eos_ids,
        "pad_token_id": tok.token_to_id(PAD_TOKEN),
        "torch_dtype": p["dtype"],
    }
    if (p["attention_bias"] and model_type not in ("llama", "qwen3", "granite")) or (
        p["mlp_bias"] and model_type not in ("llama", "granite")
    ):
        raise ValueError(f"{model_type} has no switch for these biases")
    if model_type in ("llama", "granite"):
        cfg.update(attention_bias=bool(p["attention_bias"]), mlp_bias=bool(p["mlp_bias"]), pretraining_tp=1)
    if model_type == "granite":  # Granite 3's kind of values, none of them 1
        cfg.update(embedding_multiplier=12.0, residual_multiplier=0.22, attention_multiplier=0.0078125 * 8,
                   logits_scaling=8.0)  # fmt: skip
    if arch == "llama3":
        cfg["rope_scaling"] = {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 1024,
        }
    if model_type in ("mistral", "phi3"):
        cfg["sliding_window"] = None
    if model_type == "phi3":
        cfg.update(original_max_position_embeddings=p["max_position_embeddings"], resid_pdrop=0.0, embd_pdrop=0.0)
    if model_type in ("qwen2", "qwen3"):
        cfg.update(use_sliding_window=False, sliding_window=None, max_window_layers=p["num_hidden_layers"])
    if model_type == "qwen3":
        cfg["attention_bias"] = bool(p["attention_bias"])
    return cfg


def _random_weights(arch: str, cfg: dict[str, Any], seed: int, std: float) -> dict[str, torch.Tensor]:
    """Normal(0, std) matrices and unit norms, drawn in a fixed order from one seeded generator."""
    gen = torch.Generator().manual_seed(seed)
    h, inter, hd = cfg["hidden_size"], cfg["intermediate_size"], cfg["head_dim"]
    nq, nkv, vocab = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["vocab_size"]

    def normal(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen, dtype=torch.float32) * std

    w: dict[str, torch.Tensor] = {"model.embed_tokens.weight": normal(vocab, h)}
    for i in range(cfg["num_hidden_layers"]):
        pre = f"model.layers.{i}."
        w[pre + "self_attn.q_proj.weight"] = normal(nq * hd, h)
        w[pre + "self_attn.k_proj.weight"] = normal(nkv * hd, h)
        w[pre + "self_attn.v_proj.weight"] = normal(nkv * hd, h)
        w[pre + "self_attn.o_proj.weight"] = normal(h, nq * hd)
        if arch == "qwen2" or cfg.get("attention_bias"):
            w[pre + "self_attn.q_proj.bias"] = normal(nq * hd)
            w[pre + "self_attn.k_proj.bias"] = normal(nkv * hd)
            w[pre + "self_attn.v_proj.bias"] = normal(nkv * hd)
        if cfg.get("attention_bias"):  # Llama and Qwen3 switch o_proj's with q/k/v's; Qwen2 has none
            w[pre + "self_attn.o_proj.bias"] = normal(h)
        if cfg.get("mlp_bias"):
            w[pre + "mlp.gate_proj.bias"] = normal(inter)
            w[pre + "mlp.up_proj.bias"] = normal(inter)
            w[pre + "mlp.down_proj.bias"] = normal(h)
        if arch == "qwen3":
            w[pre + "self_attn.q_norm.weight"] = torch.ones(hd)
            w[pre + "self_attn.k_norm.weight"] = torch.ones(hd)
        w[pre + "mlp.gate_proj.weight"] = normal(inter, h)
        w[pre + "mlp.up_proj.weight"] = normal(inter, h)
        w[pre + "mlp.down_proj.weight"] = normal(h, inter)
        w[pre + "input_layernorm.weight"] = torch.ones(h)
        w[pre + "post_attention_layernorm.weight"] = torch.ones(h)
    w["model.norm.weight"] = torch.ones(h)
    if not cfg["tie_word_embeddings"]:
        w["lm_head.weight"] = normal(vocab, h)
    if arch == "phi3":  # Phi-3 stores q/k/v as one matrix and gate/up as another
        for i in range(cfg["num_hidden_layers"]):
            pre = f"model.layers.{i}."
            w[pre + "self_attn.qkv_proj.weight"] = torch.cat([w.pop(pre + f"self_attn.{x}_proj.weight") for x in "qkv"])
            w[pre + "mlp.gate_up_proj.weight"] = torch.cat([w.pop(pre + f"mlp.{x}_proj.weight") for x in ("gate", "up")])
    return w


def _write_weights(out_dir: Path, weights: dict[str, torch.Tensor], shards: int) -> None:
    meta = {"format": "pt"}
    if shards <= 1:
        save_file(weights, str(out_dir / "model.safetensors"), metadata=meta)
        return
    names = list(weights)
    shards = min(shards, len(names))
    per = -(-len(names) // shards)
    weight_map: dict[str, str] = {}
    for s in range(shards):
        fname = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        part = {n: weights[n] for n in names[s * per : (s + 1) * per]}
        save_file(part, str(out_dir / fname), metadata=meta)
        weight_map.update(dict.fromkeys(part, fname))
    total = sum(t.numel() * t.element_size() for t in weights.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    _write_json(out_dir / "model.safetensors.index.json", index)


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def make_tiny_model(
    out_dir: Path, arch: str = "llama", seed: int = 0, *, weights: bool = True, **overrides: Any
) -> Path:
    """Write the tiny model into `out_dir` (created) and return it.

    overrides: any key of DEFAULTS, e.g. num_hidden_layers=4, tie_word_embeddings=True,
    dtype="bfloat16", shards=3. `weights=False` writes the config and tokenizer only: a model of any
    shape to serve with `load_format=dummy` (random weights made on the device at start-up).
    """
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown arch {arch!r}; choose one of {', '.join(ARCHITECTURES)}")
    unknown = set(overrides) - set(DEFAULTS)
    if unknown:
        raise ValueError(f"unknown options {sorted(unknown)}; known: {sorted(DEFAULTS)}")
    params = {**DEFAULTS, **overrides}
    if params["dtype"] not in ("float32", "bfloat16", "float16"):
        raise ValueError(f"dtype must be float32, bfloat16 or float16, not {params['dtype']!r}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    uses_bos = ARCHITECTURES[arch][1] not in ("qwen2", "qwen3")
    tok = train_tokenizer(params["vocab_size"], add_bos=uses_bos)
    cfg = _model_config(arch, tok, params)
    for stale in out_dir.glob("model*.safetensors*"):
        stale.unlink()
    if weights:
        dtype = getattr(torch, params["dtype"])
        tensors = _random_weights(arch, cfg, seed, params["init_std"])
        _write_weights(out_dir, {k: v.to(dtype).contiguous() for k, v in tensors.items()}, int(params["shards"]))
    _write_json(out_dir / "config.json", cfg)
    tok.save(str(out_dir / "tokenizer.json"), pretty=False)
    added = {
        str(tok.token_to_id(t)): {
            "content": t,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": t in SPECIAL_TOKENS,
        }
        for t in SPECIAL_TOKENS + TOOL_MARKERS
    }
    _write_json(
        out_dir / "tokenizer_config.json",
        {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": BOS_TOKEN if uses_bos else None,
            "eos_token": IM_END,
            "pad_token": PAD_TOKEN,
            "add_bos_token": uses_bos,
            "add_eos_token": False,
            "clean_up_tokenization_spaces": False,
            "model_max_length": params["max_position_embeddings"],
            "added_tokens_decoder": added,
            "additional_special_tokens": [IM_START, IM_END],
            "chat_template": CHAT_TEMPLATE,
        },
    )
    _write_json(
        out_dir / "generation_config.json",
        {
            "bos_token_id": cfg["bos_token_id"],
            "eos_token_id": cfg["eos_token_id"],
            "pad_token_id": cfg["pad_token_id"],
            "do_sample": False,
        },
    )
    return out_dir
