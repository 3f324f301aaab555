"""The model's tokenizer, its chat template and incremental detokenization."""

from __future__ import annotations

import json
import random
import shutil
from datetime import datetime
from pathlib import Path

import pytest
from tokenizers import Tokenizer as HFTokenizerCore
from tokenizers import decoders, models, pre_tokenizers, trainers

from cacheproxy.engine.detokenizer import IncrementalDetokenizer
from cacheproxy.engine.tiny_model import make_tiny_model
from cacheproxy.engine.tokenizer import ChatTemplateError, Tokenizer

TEXTS = [
    "Hello, world!",
    "  leading spaces and\ttabs\nnew lines\r\n",
    "café crème brûlée — naïve déjà vu",
    "日本語のテキスト、東京 and 你好世界",
    "emoji 😀🚀👍🏽 and a family 👨‍👩‍👧",
    "numbers 3.14159 -42 1e10 $5,000 (#12) 100%",
    'json {"name": "get_weather", "arguments": {"city": "Paris"}}',
    "",
]

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city <as text> & more",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "description": "Ville, e.g. Zürich"}},
            "required": ["city"],
        },
    },
}

TOOL_CONVERSATION = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Weather in Zürich?"},
    {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {
                "id": "call_1",
                "type": "function",
                "function": {"name": "get_weather", "arguments": {"city": "Zürich"}},
            }
        ],
    },
    {"role": "tool", "tool_call_id": "call_1", "content": "12°C, light rain"},
]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("tiny"), arch="llama", seed=0)


@pytest.fixture(scope="module")
def tok(tiny_dir: Path) -> Tokenizer:
    return Tokenizer(tiny_dir)


def _folder_with_template(src: Path, dst: Path, template: str | list | None) -> Path:
    """A copy of the tiny model's tokenizer files whose tokenizer_config carries `template`."""
    dst.mkdir(parents=True, exist_ok=True)
    for name in ("tokenizer.json", "generation_config.json", "config.json"):
        shutil.copy(src / name, dst / name)
    cfg = json.loads((src / "tokenizer_config.json").read_text())
    if template is None:
        cfg.pop("chat_template")
    else:
        cfg["chat_template"] = template
    (dst / "tokenizer_config.json").write_text(json.dumps(cfg))
    return dst


# --- encode / decode -------------------------------------------------------------------------


@pytest.mark.parametrize("text", TEXTS)
def test_decode_of_encode_gives_back_the_text(tok: Tokenizer, text: str) -> None:
    ids = tok.encode(text, add_special_tokens=False)
    assert tok.decode(ids) == text
    assert all(0 <= i < tok.vocab_size for i in ids)


def test_multibyte_characters_span_several_tokens(tok: Tokenizer) -> None:
    # A rare character is spelled in raw bytes, so its pieces alone are not valid UTF-8.
    ids = tok.encode("🧬", add_special_tokens=False)
    assert len(ids) > 1
    assert "\ufffd" in tok.decode(ids[:1])


def test_plain_encode_starts_with_bos_only_when_asked(tok: Tokenizer) -> None:
    assert tok.bos_token_id is not None
    with_bos = tok.encode("hello there", add_special_tokens=True)
    without = tok.encode("hello there", add_special_tokens=False)
    assert with_bos == [tok.bos_token_id, *without]


def test_special_tokens_in_text_are_single_ids_and_skippable(tok: Tokenizer) -> None:
    ids = tok.encode("<|im_start|>user\nhi<|im_end|>", add_special_tokens=False)
    im_start, im_end = tok.token_to_id("<|im_start|>"), tok.token_to_id("<|im_end|>")
    assert ids[0] == im_start and ids[-1] == im_end
    assert tok.decode(ids, skip_special_tokens=True) == "user\nhi"
    assert tok.decode(ids, skip_special_tokens=False) == "<|im_start|>user\nhi<|im_end|>"
    assert {im_start, im_end} <= tok.special_ids


def test_eos_ids_join_tokenizer_config_and_generation_config(tok: Tokenizer, tiny_dir: Path) -> None:
    gen = json.loads((tiny_dir / "generation_config.json").read_text())
    assert tok.eos_token_ids[0] == tok.token_to_id("<|im_end|>")  # tokenizer_config's eos first
    assert set(tok.eos_token_ids) == {*gen["eos_token_id"], tok.token_to_id("<|im_end|>")}
    assert len(tok.eos_token_ids) == len(set(tok.eos_token_ids))


def test_vocab_size_counts_added_tokens(tok: Tokenizer, tiny_dir: Path) -> None:
    cfg = json.loads((tiny_dir / "config.json").read_text())
    assert tok.vocab_size == cfg["vocab_size"]
    assert tok.token_to_id("</tool_response>") == tok.vocab_size - 1


def test_missing_tokenizer_json_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"tokenizer\.json"):
        Tokenizer(tmp_path)


# --- the tiny model's own chat template ------------------------------------------------------


def test_tiny_template_puts_tools_in_the_system_turn_and_renders_calls_and_results(tok: Tokenizer) -> None:
    text = tok.apply_chat_template(TOOL_CONVERSATION, tools=[WEATHER_TOOL])
    system_end = text.index("<|im_end|>")
    tool_json = json.dumps(WEATHER_TOOL, ensure_ascii=False)
    assert text.startswith("<s><|im_start|>system\nYou are terse.\n\n")
    assert 0 < text.index(tool_json) < system_end  # not HTML-escaped, inside the system turn
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Zürich"}}\n</tool_call>' in text
    assert "<|im_start|>tool\n<tool_response>\n12°C, light rain\n</tool_response><|im_end|>\n" in text
    assert text.endswith("<|im_start|>assistant\n")


def test_tool_call_arguments_sent_as_a_json_string_render_as_the_object(tok: Tokenizer) -> None:
    as_string = json.loads(json.dumps(TOOL_CONVERSATION))
    as_string[2]["tool_calls"][0]["function"]["arguments"] = json.dumps({"city": "Zürich"})
    assert tok.apply_chat_template(as_string, tools=[WEATHER_TOOL]) == tok.apply_chat_template(
        TOOL_CONVERSATION, tools=[WEATHER_TOOL]
    )
    assert isinstance(as_string[2]["tool_calls"][0]["function"]["arguments"], str)  # caller's copy untouched


def test_without_generation_prompt_the_text_ends_after_the_last_turn(tok: Tokenizer) -> None:
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    text = tok.apply_chat_template(msgs, add_generation_prompt=False)
    assert text == "<s><|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nhello<|im_end|>\n"


def test_content_given_as_text_parts_renders_like_a_string(tok: Tokenizer) -> None:
    parts = [
        {"role": "user", "content": [{"type": "text", "text": "first"}, {"type": "text", "text": "second"}]}
    ]
    plain = [{"role": "user", "content": "first\nsecond"}]
    assert tok.apply_chat_template(parts) == tok.apply_chat_template(plain)


def test_non_text_content_parts_are_refused(tok: Tokenizer) -> None:
    msgs = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}]
    with pytest.raises(ValueError, match="image_url"):
        tok.apply_chat_template(msgs)


def test_encode_chat_adds_no_second_bos(tok: Tokenizer) -> None:
    ids = tok.encode_chat([{"role": "user", "content": "hi"}])
    assert ids[0] == tok.bos_token_id and ids[1] != tok.bos_token_id
    assert tok.decode(ids, skip_special_tokens=False) == tok.apply_chat_template(
        [{"role": "user", "content": "hi"}]
    )


def test_unknown_role_raises_the_templates_message_as_value_error(tok: Tokenizer) -> None:
    with pytest.raises(ValueError, match="unknown message role: narrator"):
        tok.apply_chat_template([{"role": "narrator", "content": "Once upon a time"}])


def test_a_message_without_role_is_refused(tok: Tokenizer) -> None:
    with pytest.raises(ChatTemplateError, match=r"messages\[0\]"):
        tok.apply_chat_template([{"content": "no role"}])


def test_tiny_template_renders_as_transformers_renders_it(tiny_dir: Path, tok: Tokenizer) -> None:
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(str(tiny_dir))
    for msgs, tools in [(TOOL_CONVERSATION, [WEATHER_TOOL]), (TOOL_CONVERSATION[1:2], None)]:
        ours = tok.apply_chat_template(msgs, tools=tools)
        theirs = hf.apply_chat_template(msgs, tools=tools, tokenize=False, add_generation_prompt=True)
        assert ours == theirs


# --- real chat templates of other models, and template errors ---------------------------------

LLAMA31_TEMPLATE = """{{- bos_token }}
{%- if custom_tools is defined %}
    {%- set tools = custom_tools %}
{%- endif %}
{%- if not tools_in_user_message is defined %}
    {%- set tools_in_user_message = true %}
{%- endif %}
{%- if not date_string is defined %}
    {%- if strftime_now is defined %}
        {%- set date_string = strftime_now("%d %b %Y") %}
    {%- else %}
        {%- set date_string = "26 Jul 2024" %}
    {%- endif %}
{%- endif %}
{%- if not tools is defined %}
    {%- set tools = none %}
{%- endif %}

{#- This block extracts the system message, so we can slot it into the right place. #}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content']|trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}

{#- System message #}
{{- "<|start_header_id|>system<|end_header_id|>\\n\\n" }}
{%- if tools is not none %}
    {{- "Environment: ipython\\n" }}
{%- endif %}
{{- "Cutting Knowledge Date: December 2023\\n" }}
{{- "Today Date: " + date_string + "\\n\\n" }}
{%- if tools is not none and not tools_in_user_message %}
    {{- "You have access to the following functions. To call a function, please respond with JSON for a function call." }}
    {{- 'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.' }}
    {{- "Do not use variables.\\n\\n" }}
    {%- for t in tools %}
        {{- t | tojson(indent=4) }}
        {{- "\\n\\n" }}
    {%- endfor %}
{%- endif %}
{{- system_message }}
{{- "<|eot_id|>" }}

{#- Custom tools are passed in a user message with some extra guidance #}
{%- if tools_in_user_message and not tools is none %}
    {#- Extract the first user message so we can plug it in here #}
    {%- if messages | length != 0 %}
        {%- set first_user_message = messages[0]['content']|trim %}
        {%- set messages = messages[1:] %}
    {%- else %}
        {{- raise_exception("Cannot put tools in the first user message when there's no first user message!") }}
{%- endif %}
    {{- '<|start_header_id|>user<|end_header_id|>\\n\\n' -}}
    {{- "Given the following functions, please respond with a JSON for a function call " }}
    {{- "with its proper arguments that best answers the given prompt.\\n\\n" }}
    {{- 'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.' }}
    {{- "Do not use variables.\\n\\n" }}
    {%- for t in tools %}
        {{- t | tojson(indent=4) }}
        {{- "\\n\\n" }}
    {%- endfor %}
    {{- first_user_message + "<|eot_id|>"}}
{%- endif %}

{%- for message in messages %}
    {%- if not (message.role == 'ipython' or message.role == 'tool' or 'tool_calls' in message) %}
        {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | trim + '<|eot_id|>' }}
    {%- elif 'tool_calls' in message %}
        {%- if not message.tool_calls|length == 1 %}
            {{- raise_exception("This model only supports single tool-calls at once!") }}
        {%- endif %}
        {%- set tool_call = message.tool_calls[0].function %}
        {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}
        {{- '{"name": "' + tool_call.name + '", ' }}
        {{- '"parameters": ' }}
        {{- tool_call.arguments | tojson }}
        {{- "}" }}
        {{- "<|eot_id|>" }}
    {%- elif message.role == "tool" or message.role == "ipython" %}
        {{- "<|start_header_id|>ipython<|end_header_id|>\\n\\n" }}
        {%- if message.content is mapping or message.content is iterable %}
            {{- message.content | tojson }}
        {%- else %}
            {{- message.content }}
        {%- endif %}
        {{- "<|eot_id|>" }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}
{%- endif %}
"""

QWEN25_TEMPLATE = """{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}
    {%- endif %}
    {{- "\\n\\n# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\nYou are provided with function signatures within <tools></tools> XML tags:\\n<tools>" }}
    {%- for tool in tools %}
        {{- "\\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\"name\\": <function-name>, \\"arguments\\": <args-json-object>}\\n</tool_call><|im_end|>\\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}
    {%- else %}
        {{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\\n<tool_call>\\n{"name": "' }}
            {{- tool_call.name }}
            {{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}\\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\\n<tool_response>\\n' }}
        {{- message.content }}
        {{- '\\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""

MISTRAL_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token}}"
    "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}"
)

# Loop controls, the `generation` block of training templates, and namespace(): all used by real templates.
CONTROLS_TEMPLATE = """{%- set ns = namespace(last_user=-1) %}
{%- for m in messages %}{% if m.role == 'user' %}{% set ns.last_user = loop.index0 %}{% endif %}{% endfor %}
{%- for m in messages %}
{%- if m.role == 'system' %}{% continue %}{% endif %}
{%- if loop.index0 > ns.last_user %}{% break %}{% endif %}
{{- m.role }}={% generation %}{{ m.content }}{% endgeneration %};
{%- endfor %}
{%- if add_generation_prompt %}>{% endif %}"""

CHAT = [
    {"role": "system", "content": "  Be helpful.  "},
    {"role": "user", "content": "Hi there "},
    {"role": "assistant", "content": "Hello! How can I help?"},
    {"role": "user", "content": "What's 2+2? Answer in 日本語 🙂"},
]


@pytest.mark.parametrize(
    ("name", "template", "messages", "tools"),
    [
        ("llama3.1", LLAMA31_TEMPLATE, CHAT, None),
        ("llama3.1-tools", LLAMA31_TEMPLATE, TOOL_CONVERSATION, [WEATHER_TOOL]),
        ("qwen2.5", QWEN25_TEMPLATE, CHAT, None),
        ("qwen2.5-tools", QWEN25_TEMPLATE, TOOL_CONVERSATION, [WEATHER_TOOL]),
        ("mistral", MISTRAL_TEMPLATE, CHAT[1:], None),
        ("controls", CONTROLS_TEMPLATE, CHAT, None),
    ],
)
def test_real_templates_render_exactly_as_transformers_renders_them(
    tiny_dir: Path, tmp_path: Path, name: str, template: str, messages: list, tools: list | None
) -> None:
    transformers = pytest.importorskip("transformers")
    folder = _folder_with_template(tiny_dir, tmp_path / name, template)
    ours = Tokenizer(folder).apply_chat_template(messages, tools=tools, date_string="01 Jan 2026")
    hf = transformers.AutoTokenizer.from_pretrained(str(folder))
    theirs = hf.apply_chat_template(
        messages, tools=tools, tokenize=False, add_generation_prompt=True, date_string="01 Jan 2026"
    )
    assert ours == theirs
    assert messages[-1]["content"].strip()[:8] in ours


def test_llama_template_gets_todays_date_from_strftime_now(tiny_dir: Path, tmp_path: Path) -> None:
    tok = Tokenizer(_folder_with_template(tiny_dir, tmp_path / "llama", LLAMA31_TEMPLATE))
    before = datetime.now().strftime("%d %b %Y")
    text = tok.apply_chat_template(CHAT)
    after = datetime.now().strftime("%d %b %Y")
    assert f"Today Date: {before}\n" in text or f"Today Date: {after}\n" in text
    assert text.startswith("<s><|start_header_id|>system<|end_header_id|>\n\n")
    assert text.endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")


def test_llama_tools_go_into_the_first_user_turn_as_indented_json(tiny_dir: Path, tmp_path: Path) -> None:
    tok = Tokenizer(_folder_with_template(tiny_dir, tmp_path / "llama", LLAMA31_TEMPLATE))
    text = tok.apply_chat_template(TOOL_CONVERSATION, tools=[WEATHER_TOOL])
    user_turn = text.split("<|start_header_id|>user<|end_header_id|>\n\n", 1)[1].split("<|eot_id|>")[0]
    assert json.dumps(WEATHER_TOOL, indent=4, ensure_ascii=False) in user_turn
    assert user_turn.endswith("Weather in Zürich?")
    assert '{"name": "get_weather", "parameters": {"city": "Zürich"}}<|eot_id|>' in text


def test_template_raise_exception_becomes_value_error_with_its_message(
    tiny_dir: Path, tmp_path: Path
) -> None:
    tok = Tokenizer(_folder_with_template(tiny_dir, tmp_path / "mistral", MISTRAL_TEMPLATE))
    with pytest.raises(ValueError, match="roles must alternate"):
        tok.apply_chat_template([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}])


def test_template_with_a_syntax_error_is_a_value_error(tiny_dir: Path, tmp_path: Path) -> None:
    tok = Tokenizer(
        _folder_with_template(tiny_dir, tmp_path / "broken", "{% for m in messages %}{{ m.content }")
    )
    with pytest.raises(ValueError, match="does not parse"):
        tok.apply_chat_template([{"role": "user", "content": "a"}])


def test_template_type_errors_on_bad_messages_are_value_errors(tiny_dir: Path, tmp_path: Path) -> None:
    tok = Tokenizer(_folder_with_template(tiny_dir, tmp_path / "qwen", QWEN25_TEMPLATE))
    with pytest.raises(ValueError, match="chat template"):
        tok.apply_chat_template([{"role": "user", "content": None}])  # str + None


def test_templates_cannot_escape_the_sandbox(tiny_dir: Path, tmp_path: Path) -> None:
    evil = "{{ ''.__class__.__mro__[1].__subclasses__() }}"
    tok = Tokenizer(_folder_with_template(tiny_dir, tmp_path / "evil", evil))
    with pytest.raises(ValueError):
        tok.apply_chat_template([{"role": "user", "content": "a"}])
    mutate = "{% set x = [] %}{{ x.append(1) }}"
    tok = Tokenizer(_folder_with_template(tiny_dir, tmp_path / "mutate", mutate))
    with pytest.raises(ValueError):
        tok.apply_chat_template([{"role": "user", "content": "a"}])


def test_a_model_without_template_gets_the_plain_fallback(tiny_dir: Path, tmp_path: Path) -> None:
    tok = Tokenizer(_folder_with_template(tiny_dir, tmp_path / "base", None))
    assert tok.chat_template is None
    text = tok.apply_chat_template([{"role": "system", "content": "S"}, {"role": "user", "content": "U"}])
    assert text == "<s>system: S\nuser: U\nassistant:"
    with_tools = tok.apply_chat_template([{"role": "user", "content": "U"}], tools=[WEATHER_TOOL])
    assert json.dumps([WEATHER_TOOL], ensure_ascii=False) in with_tools


def test_named_templates_use_the_default_and_a_jinja_file_wins(tiny_dir: Path, tmp_path: Path) -> None:
    named = [{"name": "tool_use", "template": "TOOLS"}, {"name": "default", "template": "DEFAULT"}]
    folder = _folder_with_template(tiny_dir, tmp_path / "named", named)
    assert Tokenizer(folder).apply_chat_template([{"role": "user", "content": "a"}]) == "DEFAULT"
    (folder / "chat_template.jinja").write_text("FILE {{ messages | length }}")
    assert Tokenizer(folder).apply_chat_template([{"role": "user", "content": "a"}]) == "FILE 1"


# --- incremental detokenization ----------------------------------------------------------------


def _stream(detok: IncrementalDetokenizer, ids: list[int]) -> list[str]:
    deltas = [detok.add(i) for i in ids]
    deltas.append(detok.finish())
    return deltas


@pytest.mark.parametrize("text", [*TEXTS, "🧬🧬 Ünïcödé 𝔘𝔫𝔦 ok", "<|im_start|>assistant\nhi<|im_end|>"])
def test_streamed_text_never_splits_a_character_and_adds_up(tok: Tokenizer, text: str) -> None:
    ids = tok.encode(text, add_special_tokens=False)
    for skip in (True, False):
        detok = IncrementalDetokenizer(tok, skip_special_tokens=skip)
        deltas = _stream(detok, ids)
        assert "".join(deltas) == tok.decode(ids, skip_special_tokens=skip) == detok.text
        assert not any("\ufffd" in d for d in deltas)


def test_a_partial_character_is_held_back_until_complete(tok: Tokenizer) -> None:
    ids = tok.encode("🧬", add_special_tokens=False)
    detok = IncrementalDetokenizer(tok)
    assert [detok.add(i) for i in ids[:-1]] == [""] * (len(ids) - 1)
    assert detok.pending_tokens == len(ids) - 1
    assert detok.add(ids[-1]) == "🧬"
    assert detok.pending_tokens == 0


@pytest.mark.parametrize("seed", range(6))
def test_random_token_streams_add_up_to_the_full_decode(tok: Tokenizer, seed: int) -> None:
    # Random ids make invalid UTF-8, lone special tokens, everything: the sum must still be exact.
    rng = random.Random(seed)
    ids = [rng.randrange(tok.vocab_size) for _ in range(rng.randint(1, 300))]
    for skip in (True, False):
        detok = IncrementalDetokenizer(tok, skip_special_tokens=skip)
        assert "".join(_stream(detok, ids)) == tok.decode(ids, skip_special_tokens=skip)


def test_sentencepiece_style_leading_spaces_survive_streaming() -> None:
    # Metaspace decoders drop the space of the first token only: decoding token by token would lose
    # every space; the window keeps them.
    core = HFTokenizerCore(models.BPE(unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Metaspace()
    core.decoder = decoders.Metaspace()
    corpus = ["the quick brown fox jumps over the lazy dog"] * 20 + ["hello world, hello there"] * 20
    core.train_from_iterator(
        corpus, trainers.BpeTrainer(vocab_size=120, special_tokens=["<unk>"], show_progress=False)
    )

    class Adapter:
        def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
            return core.decode(ids, skip_special_tokens=skip_special_tokens)

    text = "hello the lazy fox, hello world"
    ids = core.encode(text).ids
    assert "".join(core.decode([i]) for i in ids) != text  # the naive way really does break
    detok = IncrementalDetokenizer(Adapter())
    assert "".join(_stream(detok, ids)) == core.decode(ids) == text


def test_find_stop_reports_the_earliest_stop_completed_by_new_text(tok: Tokenizer) -> None:
    detok = IncrementalDetokenizer(tok)
    detok.add_many(tok.encode("The answer is 42", add_special_tokens=False))
    assert detok.find_stop(["STOP", "\n\n"], new_chars=len(detok.text)) is None
    before = len(detok.text)
    delta = detok.add_many(tok.encode(". Done\n\nNext STOP", add_special_tokens=False))
    assert detok.find_stop(["STOP", "\n\n"], new_chars=len(delta)) == (before + len(". Done"), "\n\n")
    # A stop that straddles the old and new text is found from the new part alone.
    d2 = IncrementalDetokenizer(tok)
    d2.add_many(tok.encode("abc EN", add_special_tokens=False))
    new = d2.add_many(tok.encode("D", add_special_tokens=False))
    assert d2.find_stop(["END"], new_chars=len(new)) == (4, "END")


def test_safe_length_holds_back_a_possible_stop_prefix(tok: Tokenizer) -> None:
    detok = IncrementalDetokenizer(tok)
    detok.add_many(tok.encode("Result: 7 </an", add_special_tokens=False))
    assert detok.safe_length(["</answer>"]) == len(detok.text) - len("</an")
    assert detok.safe_length(["zzz"]) == len(detok.text)
    assert detok.safe_length([]) == len(detok.text)


def test_developer_role_is_the_system_role_unless_the_template_names_it(tiny_dir: Path, tmp_path: Path) -> None:
    # OpenAI's newer clients send instructions as "developer"; templates of the served families know "system".
    as_developer = [{"role": "developer", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    as_system = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    for name, template in (("tiny", None), ("llama", LLAMA31_TEMPLATE), ("qwen", QWEN25_TEMPLATE)):
        tok = Tokenizer(tiny_dir if template is None else _folder_with_template(tiny_dir, tmp_path / name, template))
        text = tok.apply_chat_template(as_developer, date_string="01 Jan 2026")
        assert text == tok.apply_chat_template(as_system, date_string="01 Jan 2026"), name
        assert "developer" not in text
    naming = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}{# roles: developer, user #}"
    tok = Tokenizer(_folder_with_template(tiny_dir, tmp_path / "naming", naming))
    assert tok.apply_chat_template(as_developer, add_generation_prompt=False) == "[developer] Be brief.\n[user] Hi\n"


def test_generation_config_sampling_values_become_the_defaults_when_in_range(tiny_dir: Path, tmp_path: Path) -> None:
    folder = _folder_with_template(tiny_dir, tmp_path / "gen", None)
    gen = {"do_sample": True, "temperature": 0.7, "top_p": 0.8, "top_k": 20, "repetition_penalty": 1.05}
    (folder / "generation_config.json").write_text(json.dumps(gen))
    assert Tokenizer(folder).generation_defaults == {"temperature": 0.7, "top_p": 0.8, "top_k": 20}
    (folder / "generation_config.json").write_text(json.dumps({"temperature": 9, "top_p": 0, "top_k": True}))
    assert Tokenizer(folder).generation_defaults == {}  # out of range or not numbers: none of them
    assert Tokenizer(tiny_dir).generation_defaults == {}  # the tiny model recommends nothing
