"""Bench traffic generated from a seed: the request shapes that make a prompt cache pay off, or not.

- agent: every session shares one long system prompt and one set of tool definitions; each session has
  its own task, and its conversation grows turn by turn by an assistant tool call and the tool's result.
  Turn k+1's prompt therefore starts with all of turn k's.
- chat: multi-turn conversations behind a short shared system prompt; each turn appends the assistant's
  reply and the next user message.
- rag: one shared set of long documents; each request puts a random subset of them (in retrieval order,
  so rarely the same order twice) after a shared instruction, then asks a question.
- mixed: sessions of all three, interleaved.

Assistant turns and tool results are generated from the seed, not taken from the model's replies, so a
(workload, requests, seed, sizes) tuple is always the same list of requests, whatever the model says.
Text comes from a seeded word list; any tokenizer handles it.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from typing import Any, Literal

WorkloadName = Literal["agent", "chat", "rag", "mixed"]
WORKLOADS: tuple[str, ...] = ("agent", "chat", "rag", "mixed")
# Session kinds of the mixed workload and their weights.
MIXED_WEIGHTS = {"agent": 0.4, "chat": 0.35, "rag": 0.25}

_WORDS = (  # noqa: SIM905 - a paragraph reads better than a list
    "account action address agent answer apply archive area balance batch before begin below branch "
    "budget buffer build cache call careful change channel check choose city client cluster code "
    "column commit compare config connect context copy count create current customer daily data "
    "date debug default delete deliver deploy detail device direct disk document done draft during "
    "early edit email enable engine error estimate event every expect export fail field file filter "
    "final first follow format forward found function gather given goal group handle header health "
    "history host hour image import include index input install issue item job join journal keep key "
    "label large latency layer leave level limit line list load local lock log look machine manage "
    "market measure memory merge message method metric minute model monitor month move name network "
    "next node note number object open order output owner page parse partner path pause payment "
    "pending plan policy port prefix price print priority process product project query queue quick "
    "range rate read record region release remote report request result retry return review route "
    "rule run sample save schedule schema search second section select send server service session "
    "share shift short signal size slow source split stable start state status step storage store "
    "stream summary support switch system table target task team test text thread ticket time token "
    "tool total trace track traffic update upload usage user value vendor verify version view volume "
    "wait warning week window worker write year zone"
).split()

_TOOL_NAMES = ("search_documents", "read_file", "write_file", "run_query", "send_email", "get_weather",
               "create_ticket", "list_orders", "fetch_url", "calculate", "schedule_meeting", "lookup_user")


@dataclass(frozen=True, slots=True)
class WorkloadSizes:
    """How long each part is, in words (a word is one to three tokens for a typical BPE)."""

    system_words: int = 300  # the agent's shared system prompt
    tools: int = 6  # tool definitions every agent request carries
    task_words: int = 40  # an agent session's first user message
    tool_result_words: int = 50
    agent_turns: int = 6  # most requests in one agent session (at least 2)
    chat_system_words: int = 40
    chat_message_words: int = 30
    chat_turns: int = 5  # most requests in one chat session (at least 1)
    documents: int = 12  # the shared RAG corpus
    document_words: int = 150
    documents_per_question: int = 3
    question_words: int = 20

    def __post_init__(self) -> None:
        for name in self.__dataclass_fields__:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")
        if self.documents_per_question > self.documents:
            raise ValueError("documents_per_question cannot exceed documents")


@dataclass(frozen=True, slots=True)
class BenchRequest:
    kind: str  # agent | chat | rag
    session: int
    turn: int
    messages: list[dict[str, Any]]
    tools: list[dict[str, Any]] | None
    prompt_cache_key: str


@dataclass(frozen=True, slots=True)
class Workload:
    name: str
    seed: int
    sessions: list[list[BenchRequest]]  # the requests of one session run in order, sessions concurrently

    @property
    def requests(self) -> int:
        return sum(len(s) for s in self.sessions)


class _Text:
    def __init__(self, rng: random.Random) -> None:
        self.rng = rng

    def words(self, n: int) -> str:
        return " ".join(self.rng.choice(_WORDS) for _ in range(n))

    def sentences(self, n: int) -> str:
        """About n words as sentences: capitalized, with full stops, as prose reads."""
        out: list[str] = []
        left = n
        while left > 0:
            k = min(left, self.rng.randint(6, 16))
            out.append(self.words(k).capitalize() + ".")
            left -= k
        return " ".join(out)


class _Corpus:
    """What sessions share: the agent's system prompt and tools, the chat system prompt, the documents."""

    def __init__(self, rng: random.Random, sizes: WorkloadSizes) -> None:
        text = _Text(rng)
        self.agent_system = ("You are an operations agent. Use the tools to finish the task, one call at a "
                             "time, and answer when done. " + text.sentences(sizes.system_words))
        names = list(_TOOL_NAMES)
        rng.shuffle(names)
        self.tools = [self._tool(text, names[i % len(names)] + (f"_{i // len(names)}" if i >= len(names) else ""))
                      for i in range(sizes.tools)]
        self.chat_system = "You are a helpful assistant. " + text.sentences(sizes.chat_system_words)
        self.rag_system = ("Answer the question from the documents below only; say which document you used. "
                           + text.sentences(20))
        self.documents = [f"Document {i + 1}: {text.words(3).title()}\n{text.sentences(sizes.document_words)}"
                          for i in range(sizes.documents)]

    @staticmethod
    def _tool(text: _Text, name: str) -> dict[str, Any]:
        params = {text.rng.choice(_WORDS) + f"_{j}": {"type": text.rng.choice(["string", "integer", "boolean"]),
                                                      "description": text.words(6)}
                  for j in range(text.rng.randint(1, 4))}
        return {"type": "function", "function": {
            "name": name, "description": text.sentences(18),
            "parameters": {"type": "object", "properties": params, "required": list(params)[:1]}}}


def _agent_session(rng: random.Random, corpus: _Corpus, sizes: WorkloadSizes, sid: int, n: int
                   ) -> list[BenchRequest]:
    text = _Text(rng)
    history: list[dict[str, Any]] = [{"role": "system", "content": corpus.agent_system},
                                     {"role": "user", "content": text.sentences(sizes.task_words)}]
    key = f"agent-{sid}"
    out = []
    for turn in range(n):
        out.append(BenchRequest("agent", sid, turn, [dict(m) for m in history], corpus.tools, key))
        tool = rng.choice(corpus.tools)["function"]
        args = {p: (rng.randint(0, 999) if spec["type"] == "integer" else rng.random() < 0.5
                    if spec["type"] == "boolean" else text.words(3))
                for p, spec in tool["parameters"]["properties"].items()}
        call_id = f"call_{sid}_{turn}"
        history.append({"role": "assistant", "content": None, "tool_calls": [
            {"id": call_id, "type": "function",
             "function": {"name": tool["name"], "arguments": json.dumps(args)}}]})
        history.append({"role": "tool", "tool_call_id": call_id,
                        "content": text.sentences(sizes.tool_result_words)})
    return out


def _chat_session(rng: random.Random, corpus: _Corpus, sizes: WorkloadSizes, sid: int, n: int
                  ) -> list[BenchRequest]:
    text = _Text(rng)
    history: list[dict[str, Any]] = [{"role": "system", "content": corpus.chat_system}]
    out = []
    for turn in range(n):
        history.append({"role": "user", "content": text.sentences(sizes.chat_message_words) + "?"})
        out.append(BenchRequest("chat", sid, turn, [dict(m) for m in history], None, f"chat-{sid}"))
        history.append({"role": "assistant", "content": text.sentences(sizes.chat_message_words * 2)})
    return out


def _rag_session(rng: random.Random, corpus: _Corpus, sizes: WorkloadSizes, sid: int) -> list[BenchRequest]:
    text = _Text(rng)
    picked = rng.sample(corpus.documents, sizes.documents_per_question)  # retrieval order: random
    messages = [{"role": "system", "content": corpus.rag_system + "\n\n" + "\n\n".join(picked)},
                {"role": "user", "content": text.sentences(sizes.question_words) + "?"}]
    return [BenchRequest("rag", sid, 0, messages, None, "rag")]


def build_workload(name: str, requests: int, seed: int = 0, sizes: WorkloadSizes | None = None) -> Workload:
    """Exactly `requests` requests, grouped into sessions; the same arguments give the same workload."""
    if name not in WORKLOADS:
        raise ValueError(f"unknown workload {name!r}; one of {', '.join(WORKLOADS)}")
    if requests < 1:
        raise ValueError("requests must be at least 1")
    sizes = sizes or WorkloadSizes()
    rng = random.Random(f"cacheproxy-bench:{name}:{seed}")
    corpus = _Corpus(rng, sizes)
    sessions: list[list[BenchRequest]] = []
    left = requests
    while left > 0:
        kind = name if name != "mixed" else rng.choices(list(MIXED_WEIGHTS), list(MIXED_WEIGHTS.values()))[0]
        sid = len(sessions)
        if kind == "agent":
            session = _agent_session(rng, corpus, sizes, sid, min(left, rng.randint(2, max(2, sizes.agent_turns))))
        elif kind == "chat":
            session = _chat_session(rng, corpus, sizes, sid, min(left, rng.randint(1, sizes.chat_turns)))
        else:
            session = _rag_session(rng, corpus, sizes, sid)
        sessions.append(session)
        left -= len(session)
    return Workload(name, seed, sessions)
