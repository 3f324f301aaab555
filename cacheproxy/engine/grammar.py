"""Structured outputs: a request's JSON schema, regex, choice or grammar as a mask over the vocabulary.

llguidance (the grammar engine vLLM, SGLang and llama.cpp use) compiles the constraint against the
model's own tokenizer.json and, at each step, says which tokens may come next; the runner sets every
other logit to -inf before sampling, so the text always stays a prefix of something the constraint
accepts. A compiled constraint is kept (by its text) and copied per request: agent frameworks send the
same schema again and again, and a copy costs about a microsecond where compiling costs milliseconds.

JSON is written with one space after ':' and ',' and no other whitespace (a schema's own `x-guidance`
may change that): with free whitespace a model can loop on blank lines until max_tokens.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from collections.abc import Callable

import llguidance
import numpy as np
import torch

from cacheproxy.engine.request import EngineError, StructuredOutput

JSON_LAYOUT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
_CACHED_GRAMMARS = 64


def _grammar(spec: StructuredOutput) -> str:
    """llguidance's grammar text; ValueError when `spec` cannot be read at all."""
    if spec.kind == "json_schema":
        return llguidance.LLMatcher.grammar_from_json_schema(spec.spec, defaults=JSON_LAYOUT)  # type: ignore[arg-type]
    if spec.kind == "regex":
        return llguidance.LLMatcher.grammar_from_regex(spec.spec)
    if spec.kind == "choice":
        options = json.loads(spec.spec)
        if not isinstance(options, list) or not options or not all(isinstance(o, str) for o in options):
            raise ValueError("a choice is a non-empty list of strings")
        return llguidance.LLMatcher.grammar_from_lark("start: " + " | ".join(json.dumps(o) for o in options))
    if spec.kind == "lark":
        return llguidance.LLMatcher.grammar_from_lark(spec.spec)
    return llguidance.grammar_from("grammar", spec.spec)


def _said(error: str, limit: int = 600) -> str:
    """The grammar engine's error as a client should read it: no backtrace of its internals, bounded."""
    error = error.split("\n<backtrace>", 1)[0].strip()
    return error if len(error) <= limit else error[:limit] + " …"


class TokenMatcher:
    """One sequence's place in its constraint."""

    __slots__ = ("_m", "words")

    def __init__(self, matcher: llguidance.LLMatcher, words: int) -> None:
        self._m = matcher
        self.words = words  # int32 words of its mask

    def fill_mask(self, row: np.ndarray) -> None:
        """Writes the allowed next tokens into `row` (int32 words, bit i of word w = token 32w+i). A
        matcher in error allows everything: the engine ends its sequence after this step, and an
        all-forbidden row would leave nothing to sample."""
        if self._m.is_error():
            row[:] = -1
            return
        self._m.unsafe_compute_mask_ptr(row.ctypes.data, row.nbytes)

    def accept(self, token: int) -> bool:
        """Advances past a sampled token; False when the constraint cannot take it (it then stays
        in error)."""
        return self._m.consume_token(token)

    @property
    def done(self) -> bool:
        """The text is complete: the constraint allows nothing but the end of text."""
        return self._m.is_stopped()

    @property
    def error(self) -> str:
        return self._m.get_error()


class GrammarCompiler:
    """Compiles structured outputs for one model's vocabulary; safe to call from any thread."""

    def __init__(self, tokenizer_json: Callable[[], str], vocab_size: int, eos_ids: list[int]) -> None:
        """tokenizer_json: gives tokenizer.json's text (read only once structured outputs are asked for);
        vocab_size: the width of the model's logits, or the tokenizer's if that is wider."""
        self.vocab_size = vocab_size
        self.mask_words = (vocab_size + 31) // 32
        self._tokenizer_json = tokenizer_json
        self._eos = sorted(eos_ids)
        self._tokenizer: llguidance.LLTokenizer | None = None
        self._tokenizer_error: str | None = None
        self._compiled: OrderedDict[StructuredOutput, llguidance.LLMatcher] = OrderedDict()
        self._lock = threading.Lock()
        self._tokenizer_lock = threading.Lock()

    def _llg_tokenizer(self) -> llguidance.LLTokenizer:
        # Made once, on first use or by `warm`: on a 128k-token vocabulary it takes ~0.5 s, holding the
        # GIL (CPU machine, a synthetic 128k BPE vocabulary).
        with self._tokenizer_lock:
            if self._tokenizer is None and self._tokenizer_error is None:
                try:
                    self._tokenizer = llguidance.LLTokenizer(
                        self._tokenizer_json(), n_vocab=self.vocab_size, eos_token=self._eos or None
                    )
                except Exception as exc:  # a tokenizer llguidance cannot read: no request can be structured
                    self._tokenizer_error = f"structured outputs are not available for this tokenizer: {exc}"
            if self._tokenizer is None:
                raise EngineError(str(self._tokenizer_error), "unsupported_value")
            return self._tokenizer

    def warm(self) -> bool:
        """Reads the vocabulary now, so that the first request with tools or a format does not wait for it
        (and hold up every other request meanwhile). False when structured outputs are unavailable."""
        try:
            self._llg_tokenizer()
        except EngineError:
            return False
        return True

    def _compile(self, spec: StructuredOutput) -> llguidance.LLMatcher:
        with self._lock:
            matcher = self._compiled.get(spec)
            if matcher is not None:
                self._compiled.move_to_end(spec)
                return matcher
            tokenizer = self._llg_tokenizer()
        try:
            grammar = _grammar(spec)
        except (ValueError, TypeError) as exc:
            raise EngineError(f"invalid {spec.kind}: {_said(str(exc))}", "invalid_value") from None
        matcher = llguidance.LLMatcher(tokenizer, grammar, log_level=0)  # drops the GIL while compiling
        if matcher.is_error():
            raise EngineError(f"invalid {spec.kind}: {_said(matcher.get_error())}", "invalid_value")
        with self._lock:
            self._compiled[spec] = matcher
            while len(self._compiled) > _CACHED_GRAMMARS:
                self._compiled.popitem(last=False)
        return matcher

    def check(self, spec: StructuredOutput) -> None:
        """Raises EngineError when `spec` does not compile (the server's 400)."""
        self._compile(spec)

    def compiled(self, spec: StructuredOutput) -> bool:
        """Whether `spec` is compiled already (a check would only find it)."""
        with self._lock:
            return spec in self._compiled

    def matcher(self, spec: StructuredOutput) -> TokenMatcher:
        return TokenMatcher(self._compile(spec).deep_copy(), self.mask_words)


def apply_masks(logits: torch.Tensor, rows: list[int], matchers: list[TokenMatcher]) -> None:
    """Sets the logits of tokens their sequence's constraint forbids to -inf, in place: `rows[i]` of
    `logits` [N, V] belongs to `matchers[i]`. Computed on the host (while the device may still be
    working on the logits), then unpacked on the logits' device."""
    words = matchers[0].words
    masks = np.zeros((len(rows), words), dtype=np.int32)
    for i, m in enumerate(matchers):
        m.fill_mask(masks[i])
    bits = torch.from_numpy(masks).to(logits.device, non_blocking=False)
    shifts = torch.arange(32, dtype=torch.int32, device=logits.device)
    allowed = ((bits.unsqueeze(-1) >> shifts) & 1).view(len(rows), words * 32)[:, : logits.shape[-1]]
    index = torch.tensor(rows, dtype=torch.long, device=logits.device)
    sub = logits.index_select(0, index)
    sub.masked_fill_(allowed == 0, float("-inf"))
    logits.index_copy_(0, index, sub)
