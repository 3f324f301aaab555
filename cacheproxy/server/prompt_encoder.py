"""Token ids of chat prompts, reusing those of a recent prompt that the new one extends.

An agent's next prompt is its last one plus a turn or two, and tokenizing it whole costs about a
microsecond a token on the host (tens of milliseconds at 32k tokens: more than a GPU-tier hit takes).
Tokenizers split text at added tokens (`<|im_start|>`, `<|eot_id|>`, ...) before anything else, so the
ids before such a token never depend on what follows it: a prompt that shares a remembered prompt's
text up to one is tokenized from there on, and the ids before it are the remembered ones.

Prompts are remembered per prefix-cache namespace, as the KV is: a hit is faster, and that must not
tell one tenant what another sent. At start the tokenizer is checked on probe texts rendered by its
own chat template; one that fails them (some normaliser reaching across added tokens) is always
tokenized whole.
"""

from __future__ import annotations

import re
import sys
import threading
from array import array
from collections import OrderedDict
from dataclasses import dataclass

import xxhash

from cacheproxy.engine.tokenizer import ChatTemplateError, Tokenizer
from cacheproxy.log import get_logger

log = get_logger(__name__)


@dataclass(slots=True)
class _Remembered:
    scope: str
    text: str
    ids: array  # int32 ids
    # (char where an added token starts, its index in ids, chain hash of text[:char]) at each place the
    # prompt may be cut
    cuts: list[tuple[int, int, int]]

    @property
    def nbytes(self) -> int:
        return sys.getsizeof(self.text) + self.ids.itemsize * len(self.ids)


class PromptEncoder:
    def __init__(self, tokenizer: Tokenizer, max_bytes: int) -> None:
        self._tok = tokenizer
        self._max_bytes = max_bytes
        self._bytes = 0
        self._lock = threading.Lock()
        self.tokens_reused = 0  # ids taken from remembered prompts, over all calls
        self.tokens_encoded = 0  # ids the tokenizer made, over all calls
        self._prompts: OrderedDict[int, _Remembered] = OrderedDict()  # id(entry) -> entry, oldest first
        # (scope, chain hash at a cut) -> the newest prompt with that cut, and the cut
        self._index: dict[tuple[str, int], tuple[_Remembered, tuple[int, int, int]]] = {}
        boundaries = tokenizer.boundary_tokens()
        self._boundary_ids = set(boundaries.values())
        self._pattern: re.Pattern[str] | None = None
        if max_bytes > 0 and boundaries:
            # Every added token, longest first, as the tokenizer scans for them (leftmost, then longest):
            # the places found are where its scan splits the text; cuts are kept only at those where a
            # boundary token starts.
            alternatives = sorted(set(tokenizer.added_token_texts()), key=len, reverse=True)
            self._pattern = re.compile("|".join(re.escape(t) for t in alternatives))
            if not self._holds_on_probes():
                log.warning("prompts are tokenized whole: this tokenizer's output before an added token "
                            "depends on what follows it")  # fmt: skip
                self._pattern = None

    @property
    def enabled(self) -> bool:
        return self._pattern is not None

    def encode(self, text: str, scope: str) -> list[int]:
        """Token ids of `text` (a rendered chat prompt; nothing added), as a whole encode gives them."""
        if self._pattern is None:
            ids = self._tok.encode(text, add_special_tokens=False)
            with self._lock:
                self.tokens_encoded += len(ids)
            return ids
        places = [m.start() for m in self._pattern.finditer(text)]
        hashes = _chain_hashes(text, places)
        found = self._longest_shared(text, scope, places, hashes)
        if found is None:
            ids, starts = self._tok.encode_with_starts(text)
            donor, cut_char, cut_index = None, 0, 0
        else:
            donor, cut_char, cut_index = found
            tail_ids, tail_starts = self._tok.encode_with_starts(text[cut_char:])
            ids = donor.ids[:cut_index].tolist() + tail_ids
            starts = [0] * cut_index + [cut_char + s for s in tail_starts]
        with self._lock:
            self.tokens_reused += cut_index
            self.tokens_encoded += len(ids) - cut_index
        self._remember(scope, text, ids, starts, places, hashes, donor, cut_char)
        return ids

    def _longest_shared(self, text: str, scope: str, places: list[int], hashes: list[int]
                        ) -> tuple[_Remembered, int, int] | None:  # fmt: skip
        with self._lock:
            for place, h in zip(reversed(places), reversed(hashes), strict=True):
                hit = self._index.get((scope, h))
                if hit is None:
                    continue
                entry, cut = hit
                # the hash chain names the text; the comparison makes a collision harmless
                if cut[0] == place > 0 and entry.text[:place] == text[:place]:
                    self._prompts.move_to_end(id(entry))
                    return entry, cut[0], cut[1]
        return None

    def _remember(self, scope: str, text: str, ids: list[int], starts: list[int], places: list[int],
                  hashes: list[int], donor: _Remembered | None, known_until: int) -> None:  # fmt: skip
        """Indexes `text` at each place where one of its tokens is an added token starting there. Before
        `known_until` it is `donor`'s text (and `starts` holds 0s): its cuts there are the donor's."""
        entry = _Remembered(scope, text, array("i", ids), [])
        if entry.nbytes > self._max_bytes // 4:
            return  # one prompt never holds more than a quarter of the memory
        if donor is not None:
            entry.cuts = [c for c in donor.cuts if c[0] < known_until]
        token_at = {s: i for i, s in enumerate(starts) if s >= known_until and ids[i] in self._boundary_ids}
        for place, h in zip(places, hashes, strict=True):
            i = token_at.get(place) if place >= known_until else None
            if i is not None:
                entry.cuts.append((place, i, h))
        with self._lock:
            self._prompts[id(entry)] = entry
            self._bytes += entry.nbytes
            for cut in entry.cuts:
                self._index[(scope, cut[2])] = (entry, cut)  # the newest prompt answers for a shared start
            while self._bytes > self._max_bytes and self._prompts:
                _, old = self._prompts.popitem(last=False)
                self._bytes -= old.nbytes
                for cut in old.cuts:
                    if self._index.get((old.scope, cut[2]), (None,))[0] is old:
                        del self._index[(old.scope, cut[2])]

    def _holds_on_probes(self) -> bool:
        """Whether, on texts the chat template renders, every cut gives the whole encode's ids."""
        texts = []
        system = {"role": "system", "content": "You are terse.  Answer in one line.\n"}
        turns = [
            {"role": "user", "content": " Héllo wörld — 你好 🙂\n\n  spaced  "},
            {"role": "assistant", "content": "Sure:\tdone.  "},
            {"role": "user", "content": "again?"},
        ]
        # with and without a system turn: some templates refuse one
        for conversation in (turns[:1], turns):
            for messages in (conversation, [system, *conversation]):
                try:
                    texts.append(self._tok.apply_chat_template(messages))
                except (ChatTemplateError, ValueError):
                    continue
        if not texts:
            return False  # nothing to check it on: not taken on trust
        assert self._pattern is not None
        for text in texts:
            ids, starts = self._tok.encode_with_starts(text)
            for m in self._pattern.finditer(text):
                index = next((i for i, s in enumerate(starts) if s == m.start() and ids[i] in self._boundary_ids), None)
                if index is None or index == 0:
                    continue
                tail, _ = self._tok.encode_with_starts(text[m.start():])
                if ids[index:] != tail:
                    return False
                head, _ = self._tok.encode_with_starts(text[: m.start()] + m.group() + " other text")
                if head[:index] != ids[:index]:
                    return False
        return True


def _chain_hashes(text: str, places: list[int]) -> list[int]:
    """At each place, a hash of text[:place], each chained from the one before."""
    out, h, last = [], 0, 0
    for place in places:
        h = xxhash.xxh3_64_intdigest(text[last:place].encode("utf-8", "surrogatepass"), seed=h)
        out.append(h)
        last = place
    return out
