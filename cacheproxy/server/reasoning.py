"""A reasoning model's thinking apart from its answer: `<think>…</think>` (Qwen3, DeepSeek-R1 and their
distills) comes back as `reasoning_content`, the rest as `content`.

Whether a model reasons is read from its chat template (it writes `</think>`). The generation prompt may
already open the block (DeepSeek-R1's ends with `<think>\\n`), so the text starts inside it; Qwen3 with
`enable_thinking: false` closes an empty block in the prompt, so the text is all answer.
"""

from __future__ import annotations

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"


def template_reasons(chat_template: str | None) -> bool:
    return THINK_CLOSE in (chat_template or "")


def prompt_opens_reasoning(prompt_text: str) -> bool:
    return prompt_text.rstrip().endswith(THINK_OPEN)


def _held_tail(text: str, tag: str) -> int:
    """Length of the longest end of `text` that may be the start of `tag`."""
    for k in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:k]):
            return k
    return 0


def split_reasoning(text: str, opened: bool, final: bool) -> tuple[str | None, str]:
    """(reasoning, content) of `text` so far; reasoning None when the text has none. `opened`: the prompt
    opened the block. While not `final`, what may still turn out to be a tag, or the blank lines after
    `</think>`, is held back, so each call's parts extend the previous call's (safe to stream)."""
    start = 0
    if not opened:
        head = text.lstrip()
        if head.startswith(THINK_OPEN):
            start = len(text) - len(head) + len(THINK_OPEN)
        elif not final and THINK_OPEN.startswith(head):
            return None, ""  # nothing yet, or the start of "<think>": undecided
        else:
            return None, text
    end = text.find(THINK_CLOSE, start)
    if end < 0:
        reasoning = text[start:]
        return (reasoning if final else reasoning[: len(reasoning) - _held_tail(reasoning, THINK_CLOSE)]), ""
    content = text[end + len(THINK_CLOSE) :].lstrip()
    return text[start:end], content
