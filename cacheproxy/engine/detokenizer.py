"""Text of one sequence, token by token, for streaming.

Decoding token i alone is wrong for two reasons: a UTF-8 character may span several byte-level
tokens (its first tokens decode to U+FFFD), and some decoders depend on the neighbour (SentencePiece
drops the space of the first token only). So each step decodes a short window that starts at the
previous emitted chunk and emits what the new token added, holding it back while the window's text
ends in U+FFFD. Every emitted delta ends on a character boundary, and the deltas add up to
`decode(all ids)` (`finish` hands over whatever is still held back).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

REPLACEMENT_CHAR = "\ufffd"


class Decoder(Protocol):
    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str: ...


class IncrementalDetokenizer:
    def __init__(self, tokenizer: Decoder, skip_special_tokens: bool = True) -> None:
        self._tokenizer = tokenizer
        self._skip = skip_special_tokens
        self.ids: list[int] = []
        self.text = ""  # everything emitted so far
        # ids[_window_start:_emitted_upto] decodes to the tail of `text` (the window's context);
        # ids[_emitted_upto:] are held back.
        self._window_start = 0
        self._emitted_upto = 0

    def _decode(self, ids: Sequence[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip)

    def add(self, token_id: int) -> str:
        """Append one token; return the text it completes ("" while a character is unfinished)."""
        self.ids.append(token_id)
        context = self._decode(self.ids[self._window_start : self._emitted_upto])
        window = self._decode(self.ids[self._window_start :])
        if window.endswith(REPLACEMENT_CHAR) or len(window) <= len(context) or not window.startswith(context):
            return ""
        delta = window[len(context) :]
        self._window_start = self._emitted_upto
        self._emitted_upto = len(self.ids)
        self.text += delta
        return delta

    def add_many(self, token_ids: Sequence[int]) -> str:
        return "".join(self.add(t) for t in token_ids)

    def finish(self) -> str:
        """The held-back rest (an unfinished character decodes to U+FFFD, as in a full decode)."""
        full = self._decode(self.ids)
        if full.startswith(self.text):
            rest = full[len(self.text) :]
        else:
            context = self._decode(self.ids[self._window_start : self._emitted_upto])
            rest = self._decode(self.ids[self._window_start :])[len(context) :]
        self._window_start = self._emitted_upto = len(self.ids)
        self.text += rest
        return rest

    @property
    def pending_tokens(self) -> int:
        """Tokens whose text is held back."""
        return len(self.ids) - self._emitted_upto

    def find_stop(self, stops: Sequence[str], new_chars: int) -> tuple[int, str] | None:
        """The earliest stop string that the last `new_chars` characters of `text` completed.

        Returns (index in `text` where it starts, the stop string) or None. Only the region a new
        match can touch is searched, so the cost does not grow with the text.
        """
        if not stops or new_chars <= 0:
            return None
        longest = max(len(s) for s in stops)
        region_start = max(0, len(self.text) - new_chars - longest + 1)
        region = self.text[region_start:]
        best: tuple[int, str] | None = None
        for stop in stops:
            if not stop:
                continue
            i = region.find(stop)
            if i >= 0 and (best is None or region_start + i < best[0]):
                best = (region_start + i, stop)
        return best

    def safe_length(self, stops: Sequence[str]) -> int:
        """How much of `text` may be streamed: the rest could be the start of a stop string."""
        n = len(self.text)
        hold = 0
        for stop in stops:
            for k in range(min(len(stop) - 1, n), hold, -1):
                if self.text.endswith(stop[:k]):
                    hold = k
                    break
        return n - hold
