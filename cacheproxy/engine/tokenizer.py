"""A model's own tokenizer and chat template, read from its Hugging Face folder.

tokenizer.json is run by the `tokenizers` library (the reference implementation); the chat template
from tokenizer_config.json (or chat_template.jinja) is rendered by jinja2 in an immutable sandbox
with the helpers real templates call, so the prompt text is the one the model was trained on.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
from jinja2 import nodes
from jinja2.ext import Extension
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer as _HFTokenizer


class ChatTemplateError(ValueError):
    """The chat template could not render these messages (the server answers 400)."""


class _GenerationBlock(Extension):
    """`{% generation %}…{% endgeneration %}` marks assistant text for training masks; here it only renders."""

    tags = frozenset({"generation"})

    def parse(self, parser: jinja2.parser.Parser) -> list[nodes.Node]:
        next(parser.stream)
        return list(parser.parse_statements(("name:endgeneration",), drop_needle=True))


def _raise_exception(message: str) -> None:
    raise jinja2.TemplateError(message)


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    # Templates expect plain json.dumps; jinja's own filter HTML-escapes '<', '>', '&' and "'".
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _template_environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True,
        lstrip_blocks=True,
        extensions=["jinja2.ext.loopcontrols", _GenerationBlock],
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env


def _token_content(value: Any) -> str | None:
    """A special token as tokenizer_config.json writes it: a string or an AddedToken dict."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    return None


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    return json.loads(path.read_text(encoding="utf-8"))


def _as_id_list(value: Any) -> list[int]:
    if value is None:
        return []
    if isinstance(value, int):
        return [value]
    return [int(v) for v in value]


def _text_of_parts(parts: Sequence[Any]) -> str:
    texts: list[str] = []
    for part in parts:
        if isinstance(part, str):
            texts.append(part)
        elif isinstance(part, dict) and part.get("type") in ("text", "input_text", "output_text"):
            texts.append(str(part.get("text", "")))
        else:
            kind = part.get("type") if isinstance(part, dict) else type(part).__name__
            raise ChatTemplateError(
                f"content part of type {kind!r} is not supported: this model reads text only"
            )
    # OpenAI sends a long text as several parts; they are one text, read in order.
    return "\n".join(texts)


def _normalize_tool_call(call: Any) -> Any:
    """Arguments arrive as a JSON string (OpenAI); templates expect the object, as HF's examples pass it."""
    if not isinstance(call, dict):
        return call
    call = dict(call)
    fn = call.get("function")
    target = dict(fn) if isinstance(fn, dict) else call
    args = target.get("arguments")
    if isinstance(args, str):
        try:
            parsed = json.loads(args)
        except json.JSONDecodeError:
            parsed = None
        if isinstance(parsed, dict):
            target["arguments"] = parsed
    if isinstance(fn, dict):
        call["function"] = target
    return call


def normalize_messages(messages: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """Copies of the messages in the shape chat templates read: text content, object arguments."""
    out: list[dict[str, Any]] = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or "role" not in message:
            raise ChatTemplateError(f"messages[{i}] must be an object with a 'role'")
        m = dict(message)
        content = m.get("content")
        if isinstance(content, list):
            m["content"] = _text_of_parts(content)
        if m.get("tool_calls"):
            m["tool_calls"] = [_normalize_tool_call(c) for c in m["tool_calls"]]
        out.append(m)
    return out


def _sampling_defaults(generation: dict[str, Any]) -> dict[str, float | int]:
    """The sampling values generation_config.json recommends (Qwen2.5-Instruct: temperature 0.7, top_p 0.8,
    top_k 20), those in range only."""
    out: dict[str, float | int] = {}
    t, p, k = generation.get("temperature"), generation.get("top_p"), generation.get("top_k")
    if isinstance(t, int | float) and not isinstance(t, bool) and 0.0 <= t <= 2.0:
        out["temperature"] = float(t)
    if isinstance(p, int | float) and not isinstance(p, bool) and 0.0 < p <= 1.0:
        out["top_p"] = float(p)
    if isinstance(k, int) and not isinstance(k, bool) and k > 0:
        out["top_k"] = k
    return out


class Tokenizer:
    """Encode, decode and chat-template for one model folder."""

    def __init__(self, folder: Path | str) -> None:
        folder = Path(folder)
        tok_file = folder / "tokenizer.json"
        if not tok_file.is_file():
            raise FileNotFoundError(f"{folder} has no tokenizer.json (only fast tokenizers are supported)")
        self.folder = folder
        self._tok = _HFTokenizer.from_file(str(tok_file))
        config = _read_json(folder / "tokenizer_config.json")
        generation = _read_json(folder / "generation_config.json")
        model_config = _read_json(folder / "config.json")

        self.bos_token = _token_content(config.get("bos_token"))
        self.eos_token = _token_content(config.get("eos_token"))
        self.pad_token = _token_content(config.get("pad_token"))
        self.unk_token = _token_content(config.get("unk_token"))
        # Only the tokenizer's own BOS counts: Qwen's configs name a bos id that is never written.
        self.bos_token_id = self._id_of(self.bos_token)
        # Generation stops at any of: the tokenizer's eos, then generation_config's (Llama 3 and
        # Qwen list several there), else config.json's.
        eos_ids: list[int] = []
        eos_from_config = self._id_of(self.eos_token)
        if eos_from_config is not None:
            eos_ids.append(eos_from_config)
        extra = generation.get("eos_token_id")
        if extra is None:
            extra = model_config.get("eos_token_id")
        eos_ids += [e for e in _as_id_list(extra) if e not in eos_ids]
        self.eos_token_ids: list[int] = eos_ids
        self.pad_token_id = self._id_of(self.pad_token)
        self.generation_defaults = _sampling_defaults(generation)

        self.chat_template = self._read_chat_template(folder, config)
        self._env = _template_environment()
        self._compiled: jinja2.Template | None = None
        self.special_ids: frozenset[int] = frozenset(
            i for i, t in self._tok.get_added_tokens_decoder().items() if t.special
        )

    @staticmethod
    def _read_chat_template(folder: Path, config: dict[str, Any]) -> str | None:
        jinja_file = folder / "chat_template.jinja"
        if jinja_file.is_file():
            return jinja_file.read_text(encoding="utf-8")
        template = config.get("chat_template")
        if isinstance(template, list):
            # Several named templates: "default" is the chat one ("tool_use", "rag" are variants).
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
            template = named.get("default") or next(iter(named.values()), None)
        return template if isinstance(template, str) else None

    def _id_of(self, token: str | None) -> int | None:
        return None if token is None else self._tok.token_to_id(token)

    @property
    def eos_token_id(self) -> int | None:
        return self.eos_token_ids[0] if self.eos_token_ids else None

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def to_json(self) -> str:
        """The tokenizer as tokenizer.json holds it (what the grammar engine reads)."""
        return self._tok.to_str()

    def id_to_token(self, token_id: int) -> str | None:
        return self._tok.id_to_token(token_id)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_with_starts(self, text: str) -> tuple[list[int], list[int]]:
        """(ids, the character where each token starts) of text with nothing added (a rendered chat)."""
        enc = self._tok.encode(text, add_special_tokens=False)
        return enc.ids, [start for start, _ in enc.offsets]

    def added_token_texts(self) -> list[str]:
        """Every added token's text (the tokenizer finds these in a text before anything else)."""
        return [t.content for t in self._tok.get_added_tokens_decoder().values() if t.content]

    def boundary_tokens(self) -> dict[str, int]:
        """Added tokens matched as written with no whitespace taken from before them (text -> id): the
        tokenizer splits text at them before anything else, so no token spans one's start."""
        return {t.content: i for i, t in self._tok.get_added_tokens_decoder().items()
                if t.content and not t.lstrip and not t.normalized and not t.single_word}  # fmt: skip

    def encode_batch(self, texts: list[str], add_special_tokens: bool = True) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(texts, add_special_tokens=add_special_tokens)]

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    # --- chat ------------------------------------------------------------------------------

    def _template(self) -> jinja2.Template:
        if self._compiled is None:
            assert self.chat_template is not None
            try:
                self._compiled = self._env.from_string(self.chat_template)
            except jinja2.TemplateSyntaxError as e:
                raise ChatTemplateError(
                    f"the model's chat template does not parse: {e} (line {e.lineno})"
                ) from e
        return self._compiled

    def apply_chat_template(
        self,
        messages: list[dict[str, Any]],
        tools: list[dict[str, Any]] | None = None,
        add_generation_prompt: bool = True,
        **kwargs: Any,
    ) -> str:
        """The prompt text for these messages; it already holds BOS when the template writes it.

        Raises ChatTemplateError (a ValueError) when the template refuses the messages.
        """
        msgs = normalize_messages(messages)
        if self.chat_template is None or "developer" not in self.chat_template:
            # OpenAI's "developer" role is its newer name for "system" (the Agents SDK sends it); a
            # template that does not name it would refuse it, drop it, or show the model a role
            # it never saw in training.
            msgs = [{**m, "role": "system"} if m["role"] == "developer" else m for m in msgs]
        if self.chat_template is None:
            return self._fallback_chat(msgs, tools, add_generation_prompt)
        context = {
            "bos_token": self.bos_token or "",
            "eos_token": self.eos_token or "",
            "pad_token": self.pad_token or "",
            "unk_token": self.unk_token or "",
            **kwargs,
            "messages": msgs,
            "tools": tools or None,
            "add_generation_prompt": add_generation_prompt,
        }
        template = self._template()
        try:
            return template.render(**context)
        except jinja2.TemplateError as e:
            raise ChatTemplateError(f"chat template error: {e}") from e
        except (TypeError, KeyError, IndexError, AttributeError, ValueError) as e:
            # Templates do '+' on content and index messages; a request that breaks them is a bad request.
            raise ChatTemplateError(f"chat template failed on these messages: {type(e).__name__}: {e}") from e

    def encode_chat(
        self,
        messages: list[dict[str, Any]],
        tools: list[dict[str, Any]] | None = None,
        add_generation_prompt: bool = True,
        **kwargs: Any,
    ) -> list[int]:
        """Token ids of the rendered prompt; special tokens come from the text, none are added."""
        text = self.apply_chat_template(messages, tools, add_generation_prompt, **kwargs)
        return self.encode(text, add_special_tokens=False)

    def _fallback_chat(
        self, msgs: list[dict[str, Any]], tools: list[dict[str, Any]] | None, add_generation_prompt: bool
    ) -> str:
        """`role: content` lines, for models that ship no template (base models)."""
        parts: list[str] = [self.bos_token or ""]
        if tools:
            parts.append("tools: " + _tojson(tools) + "\n")
        for m in msgs:
            text = m.get("content") or ""
            if not isinstance(text, str):
                text = _tojson(text)
            for call in m.get("tool_calls") or []:
                text += ("\n" if text else "") + "tool_call: " + _tojson(call.get("function", call))
            parts.append(f"{m['role']}: {text}\n")
        if add_generation_prompt:
            parts.append("assistant:")
        return "".join(parts)
