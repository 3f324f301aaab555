"""What goes into the engine and what comes out: the contract between the server and the engine."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal


class EngineError(Exception):
    """A request the engine refuses; `code` follows the OpenAI error codes."""

    def __init__(self, message: str, code: str = "invalid_request_error", status: int = 400) -> None:
        super().__init__(message)
        self.code = code
        self.status = status


class EngineOverloaded(EngineError):
    def __init__(self, message: str = "too many requests waiting; retry later") -> None:
        super().__init__(message, code="rate_limit_exceeded", status=429)


@dataclass(frozen=True, slots=True)
class StructuredOutput:
    """What a request's text must match (engine/grammar.py). `spec`: a JSON schema as JSON text, a
    regex, a JSON list of strings (choice), a grammar in Lark or GBNF (told apart by its syntax), or
    one in llguidance's Lark (which may embed JSON schemas as `%json{...}`)."""

    kind: Literal["json_schema", "regex", "choice", "grammar", "lark"]
    spec: str
    # Lazy constraints, for tool calls the model may or may not make. after_token: the text is free until
    # the model writes this token (`<tool_call>`, `[TOOL_CALLS]`), and the constraint holds from just
    # after it to the end. tentative: the model's first tokens are fed to the constraint unmasked while
    # they are blank; the first other token either fits it (it then holds to the end) or leaves the text
    # free (Llama 3's calls, a bare JSON object that is the whole answer).
    after_token: int | None = None
    tentative: bool = False
    # Whose compiled copy this is (the request's prefix-cache namespace): requests share a compiled
    # constraint only within one, as they share cached prefixes, since how long compiling took would
    # tell one tenant what another asked for. Not part of the grammar.
    scope: str = ""

    @property
    def lazy(self) -> bool:
        """Free text until the model begins what it describes (after_token or tentative)."""
        return self.after_token is not None or self.tentative


@dataclass(slots=True)
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0: off
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int | None = None  # None: none; 0: the chosen token's; k: and the top k
    min_tokens: int = 0
    presence_penalty: float = 0.0  # OpenAI's, over generated tokens (engine/penalties.py)
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0  # transformers' and vLLM's, over prompt and generated tokens
    logit_bias: dict[int, float] = field(default_factory=dict)  # token id -> added to its logit
    structured: StructuredOutput | None = None  # the text must match it (engine/grammar.py)

    def validate(self) -> None:
        if self.max_tokens < 1:
            raise EngineError("max_tokens must be at least 1", "invalid_value")
        if not 0.0 <= self.temperature <= 100.0:
            raise EngineError("temperature must be between 0 and 100", "invalid_value")
        if not 0.0 < self.top_p <= 1.0:
            raise EngineError("top_p must be in (0, 1]", "invalid_value")
        if self.top_k < 0:
            raise EngineError("top_k must be >= 0", "invalid_value")
        if self.seed is not None and not -(2**63) <= self.seed < 2**64:
            raise EngineError("seed must fit in 64 bits", "invalid_value")
        if self.logprobs is not None and not 0 <= self.logprobs <= 20:
            raise EngineError("top_logprobs must be between 0 and 20", "invalid_value")
        if not (-2.0 <= self.presence_penalty <= 2.0 and -2.0 <= self.frequency_penalty <= 2.0):
            raise EngineError("presence_penalty and frequency_penalty must be between -2 and 2", "invalid_value")
        if not 0.0 < self.repetition_penalty <= 10.0:
            raise EngineError("repetition_penalty must be in (0, 10]", "invalid_value")
        if any(t < 0 or not -100.0 <= b <= 100.0 for t, b in self.logit_bias.items()):
            raise EngineError("logit_bias maps token ids to values between -100 and 100", "invalid_value")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0 or self.top_k == 1


@dataclass(slots=True)
class GenerationRequest:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    # Namespaces the prefix cache: the tenant salt (and a client's cache_salt). "" = global.
    cache_salt: str = ""


@dataclass(slots=True)
class TokenLogprob:
    token_id: int
    token: str
    logprob: float
    top: list[tuple[int, str, float]] = field(default_factory=list)


@dataclass(slots=True)
class GenerationOutput:
    """One step's worth of a request's output: a text delta and its token ids."""

    request_id: str
    text: str
    token_ids: list[int]
    finish_reason: str | None = None  # "stop" | "length" | "abort" | None while running
    prompt_tokens: int = 0
    completion_tokens: int = 0
    # Filled on the first output of a request (and repeated on the last):
    cached_tokens: int = 0
    cached_tokens_by_tier: dict[str, int] = field(default_factory=dict)
    queue_time_s: float = 0.0
    logprobs: list[TokenLogprob] | None = None
    stop_reason: str | int | None = None  # the stop string or token id that ended it
