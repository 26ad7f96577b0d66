"""Chat data as people bring it (sft/data/formats.py, validation.py): ShareGPT, OpenAI messages with tool calls,
per-turn weights, data.train_on, reasoning traces and data.system_prompt, token by token against hand-written
renderings, with real chat template shapes."""
import json

import pytest
from conftest import CHAT_TEMPLATE, build_tiny_tokenizer, write_jsonl

from sft.config import Config
from sft.data import IGNORE_INDEX, load_rows, tokenize_instruction, tokenize_messages, tokenize_rows
from sft.data.formats import ChatFormat
from sft.errors import UserError

# ChatML that renders the tool schemas (in a system turn), tool calls (content null or empty) and tool results.
TOOL_TEMPLATE = (
    "{{ bos_token }}{% if tools %}<|im_start|>system\n{% for t in tools %}{{ t.function.name }}: "
    "{{ t.function.description }}\n{% endfor %}<|im_end|>\n{% endif %}"
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% if m.content %}{{ m.content }}{% endif %}"
    "{% for c in m.tool_calls or [] %}<tool_call>{{ c.function.name }} {{ c.function.arguments if c.function.arguments "
    "is string else c.function.arguments | tojson }}</tool_call>{% endfor %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
# ChatML with {% generation %} around each assistant message.
MARKED_TEMPLATE = CHAT_TEMPLATE.replace(
    "{{ m['content'] }}<|im_end|>\n",
    "{% if m['role'] == 'assistant' %}{% generation %}{{ m['content'] }}<|im_end|>\n{% endgeneration %}"
    "{% else %}{{ m['content'] }}<|im_end|>\n{% endif %}")
# ChatML that renders an assistant's reasoning_content (or thinking) in <think> tags before the answer.
REASONING_TEMPLATE = CHAT_TEMPLATE.replace(
    "{{ m['content'] }}<|im_end|>",
    "{% set r = m.reasoning_content or m.thinking %}{% if m['role'] == 'assistant' and r %}<think>{{ r }}</think>"
    "{% endif %}{{ m['content'] }}<|im_end|>")
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "the weather of a city",
                                           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]
CALL = {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "paris"}'}}


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    return {name: build_tiny_tokenizer(tmp_path_factory.mktemp(name), chat_template=template)
            for name, template in (("tool", TOOL_TEMPLATE), ("marked", MARKED_TEMPLATE), ("plain", CHAT_TEMPLATE),
                                   ("reasoning", REASONING_TEMPLATE))}


def expected(tokenizer, segments: list[tuple[str, bool]]) -> dict:
    """Token ids and labels of a hand-written rendering: (text, carries loss) pieces, split where tokens split."""
    input_ids, labels = [], []
    for text, trained in segments:
        piece = tokenizer(text, add_special_tokens=False)["input_ids"]
        input_ids += piece
        labels += piece if trained else [IGNORE_INDEX] * len(piece)
    assert input_ids == tokenizer("".join(text for text, _ in segments), add_special_tokens=False)["input_ids"]
    return {"input_ids": input_ids, "labels": labels}


def user(text):
    return {"role": "user", "content": text}


def assistant(text, **more):
    return {"role": "assistant", "content": text, **more}


TOOL_CONVERSATION = [user("weather in paris ?"), assistant(None, tool_calls=[CALL]),
                     {"role": "tool", "tool_call_id": "c1", "content": "sunny"}, assistant("it is sunny")]
TOOL_SEGMENTS = [
    ("<s><|im_start|>system\nget_weather: the weather of a city\n<|im_end|>\n<|im_start|>user\nweather in paris ?"
     "<|im_end|>\n<|im_start|>assistant\n", False),
    ('<tool_call>get_weather {"city": "paris"}</tool_call><|im_end|>\n', True),
    ("<|im_start|>tool\nsunny<|im_end|>\n<|im_start|>assistant\n", False),
    ("it is sunny<|im_end|>\n", True)]


def test_tool_calls_are_trained_but_not_tool_results_schemas_or_system(tokenizers):
    tokenizer = tokenizers["tool"]
    example = tokenize_messages(tokenizer, TOOL_CONVERSATION, None, tools=TOOLS)
    assert example == expected(tokenizer, TOOL_SEGMENTS)
    # An empty string instead of null content renders and trains the same.
    conversation = [dict(m, content="") if m.get("tool_calls") else m for m in TOOL_CONVERSATION]
    assert tokenize_messages(tokenizer, conversation, None, tools=TOOLS) == example


def chat_config(path, **data) -> Config:
    return Config.model_validate({"task": "causal_lm", "model": {"name": "m"},
                                  "data": {"train": str(path), "eval_fraction": 0, **data}})


def tokenized_file(tmp_path, tokenizer, rows, name="a.jsonl", **data):
    write_jsonl(tmp_path / name, rows)
    config = chat_config(tmp_path / name, **data)
    loaded = load_rows(config, tmp_path)
    examples, summary = tokenize_rows(loaded.train, loaded.data_format, config, tokenizer, None, "data.train",
                                      tmp_path / name.replace(".jsonl", ""))
    return examples, summary, loaded


def test_a_tools_column_as_json_string_or_list_reaches_the_template(tmp_path, tokenizers):
    tokenizer = tokenizers["tool"]
    (tmp_path / "s").mkdir()
    (tmp_path / "l").mkdir()
    as_string, _, _ = tokenized_file(tmp_path, tokenizer, [{"messages": TOOL_CONVERSATION, "tools": json.dumps(TOOLS)}],
                                     "s.jsonl")
    as_list, summary, _ = tokenized_file(tmp_path, tokenizer, [{"messages": TOOL_CONVERSATION, "tools": TOOLS}], "l.jsonl")
    reference = expected(tokenizer, TOOL_SEGMENTS)
    for examples in (as_string, as_list):
        assert examples[0]["input_ids"] == reference["input_ids"] and examples[0]["labels"] == reference["labels"]
    assert summary["assistant_turns"] == {"trained": 2, "skipped": 0}


def test_files_of_plain_and_tool_call_conversations_train_together(tmp_path, tokenizers):
    """A tool-call file reads its messages as JSON values and has a tools column; a plain chat file reads them as
    structs and has none: together they concatenate, and each example is tokenized as its file alone would be."""
    tokenizer = tokenizers["tool"]
    plain = [{"messages": [user("hi"), assistant("hello")]}]
    tools = [{"messages": TOOL_CONVERSATION, "tools": TOOLS}]
    alone = [tokenized_file(tmp_path, tokenizer, rows, name)[0][0] for name, rows in (("p.jsonl", plain),
                                                                                     ("t.jsonl", tools))]
    write_jsonl(tmp_path / "plain.jsonl", plain)
    write_jsonl(tmp_path / "tools.jsonl", tools)
    config = Config.model_validate({"task": "causal_lm", "model": {"name": "m"}, "data": {
        "train": [str(tmp_path / "plain.jsonl"), str(tmp_path / "tools.jsonl")], "eval_fraction": 0}})
    loaded = load_rows(config, tmp_path)
    together, _ = tokenize_rows(loaded.train, loaded.data_format, config, tokenizer, None, "data.train",
                                tmp_path / "together")
    assert [dict(e) for e in together] == [dict(e) for e in alone]
    assert together[1]["labels"] == expected(tokenizer, TOOL_SEGMENTS)["labels"]


SHAREGPT = {"conversations": [
    {"from": "system", "value": "be brief"}, {"from": "human", "value": "weather in paris ?"},
    {"from": "function_call", "value": json.dumps({"name": "get_weather", "arguments": {"city": "paris"}})},
    {"from": "observation", "value": "sunny"}, {"from": "gpt", "value": "it is sunny"},
    {"from": "human", "value": "thanks"}, {"from": "chatgpt", "value": "you are welcome"}],
    "tools": json.dumps(TOOLS)}
OPENAI = {"messages": [
    {"role": "system", "content": "be brief"}, user("weather in paris ?"),
    assistant(None, tool_calls=[{"type": "function", "function": {"name": "get_weather", "arguments": {"city": "paris"}}}]),
    {"role": "tool", "content": "sunny"}, assistant("it is sunny"), user("thanks"), assistant("you are welcome")],
    "tools": json.dumps(TOOLS)}


@pytest.mark.parametrize("template", ["tool", "marked"])
def test_sharegpt_and_openai_messages_give_identical_tokens_and_labels(tmp_path, tokenizers, template):
    tokenizer = tokenizers[template]
    (tmp_path / "share").mkdir()
    (tmp_path / "open").mkdir()
    rows = [OPENAI, {"messages": OPENAI["messages"][1:5]}] if template == "tool" else \
        [{"messages": [m for m in OPENAI["messages"] if m["role"] != "tool" and not m.get("tool_calls")]}]
    sharegpt_rows = [{"conversations": [_as_sharegpt(m) for m in row["messages"]], **({"tools": row["tools"]}
                                                                                     if "tools" in row else {})}
                     for row in rows]
    if template == "tool":
        assert sharegpt_rows[0] == SHAREGPT
    from_sharegpt, summary, loaded = tokenized_file(tmp_path, tokenizer, sharegpt_rows, "share.jsonl")
    from_openai, _, _ = tokenized_file(tmp_path, tokenizer, rows, "open.jsonl")
    assert from_sharegpt[:] == from_openai[:]
    assert sum(label != IGNORE_INDEX for label in from_sharegpt[0]["labels"]) > 0
    assert "ShareGPT (from/value) in column 'conversations'" in loaded.format_description
    assert "human → user" in loaded.format_description and "gpt → assistant" in loaded.format_description


def _as_sharegpt(message: dict) -> dict:
    names = {"system": "system", "user": "human", "tool": "observation"}
    if message.get("tool_calls"):
        return {"from": "function_call", "value": json.dumps(message["tool_calls"][0]["function"])}
    name = names.get(message["role"]) or ("chatgpt" if message["content"] == "you are welcome" else "gpt")
    return {"from": name, "value": message["content"]}


def test_role_names_of_other_tools_are_mapped_by_data_fields_roles(tmp_path, tokenizers):
    rows = [{"messages": [{"role": "customer", "content": "hi"}, {"role": "agent", "content": "hello"}]}]
    write_jsonl(tmp_path / "a.jsonl", rows)
    with pytest.raises(UserError, match=r"a.jsonl:1: message 0: unknown role 'customer'; name its role in "
                                        r"data.fields.roles"):
        load_rows(chat_config(tmp_path / "a.jsonl"), tmp_path)
    roles = {"customer": "user", "agent": "assistant"}
    examples, _, loaded = tokenized_file(tmp_path, tokenizers["plain"], rows, fields={"roles": roles})
    assert examples[0]["labels"] == expected(tokenizers["plain"], [
        ("<s><|im_start|>customer\nhi<|im_end|>\n".replace("customer", "user") + "<|im_start|>assistant\n", False),
        ("hello<|im_end|>\n", True)])["labels"]
    assert "customer → user, agent → assistant" in loaded.format_description


WEIGHTED = [user("add 2 and 3"), assistant("five", weight=0), user("and 4 ?"), assistant("seven", weight=1),
            user("and 5 ?"), assistant("eight")]


@pytest.mark.parametrize("template", ["plain", "marked"])
@pytest.mark.parametrize("train_on", ["all_assistant", "last_assistant"])
def test_weight_zero_turns_and_last_assistant_carry_no_loss(tokenizers, template, train_on):
    tokenizer = tokenizers[template]
    example = tokenize_messages(tokenizer, WEIGHTED, None, ChatFormat(train_on=train_on))
    assert example == expected(tokenizer, [
        ("<s><|im_start|>user\nadd 2 and 3<|im_end|>\n<|im_start|>assistant\nfive<|im_end|>\n<|im_start|>user\n"
         "and 4 ?<|im_end|>\n<|im_start|>assistant\n", False),
        ("seven<|im_end|>\n", train_on == "all_assistant"),
        ("<|im_start|>user\nand 5 ?<|im_end|>\n<|im_start|>assistant\n", False),
        ("eight<|im_end|>\n", True)])


def test_the_summary_counts_trained_and_skipped_turns(tmp_path, tokenizers):
    rows = [{"messages": WEIGHTED}, {"messages": WEIGHTED[:2] + WEIGHTED[2:4]}]
    _, summary, _ = tokenized_file(tmp_path, tokenizers["plain"], rows, train_on="last_assistant")
    assert summary["assistant_turns"] == {"trained": 2, "skipped": 3}


@pytest.mark.parametrize("template", ["plain", "marked"])
def test_a_conversation_opening_with_an_assistant_turn_trains_only_its_answer(tokenizers, template):
    tokenizer = tokenizers[template]
    example = tokenize_messages(tokenizer, [assistant("hello"), user("hi"), assistant("how are you")], None)
    assert example == expected(tokenizer, [
        ("<s><|im_start|>assistant\n", False), ("hello<|im_end|>\n", True),
        ("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n", False), ("how are you<|im_end|>\n", True)])


def test_a_template_that_cannot_render_an_empty_conversation_says_how_to_fix_it(tmp_path):
    tokenizer = build_tiny_tokenizer(tmp_path, chat_template="{{ messages[0]['role'] }}" + CHAT_TEMPLATE)
    with pytest.raises(UserError, match="a conversation starts with an assistant message.*start conversations with "
                                        "a user message, or set data.system_prompt"):
        tokenize_messages(tokenizer, [assistant("hello")], None)


@pytest.mark.parametrize("key", ["reasoning_content", "thinking"])
@pytest.mark.parametrize("train_on_reasoning", [True, False])
def test_reasoning_reaches_the_template_and_is_trained_or_left_out_of_the_loss(tokenizers, key, train_on_reasoning):
    tokenizer = tokenizers["reasoning"]
    messages = [user("add 2 and 3"), assistant("five", **{key: "two plus three"})]
    example = tokenize_messages(tokenizer, messages, None, ChatFormat(train_on_reasoning=train_on_reasoning))
    assert example == expected(tokenizer, [
        ("<s><|im_start|>user\nadd 2 and 3<|im_end|>\n<|im_start|>assistant\n", False),
        ("<think>two plus three", train_on_reasoning), ("</think>five<|im_end|>\n", True)])


def test_system_prompt_is_added_where_there_is_none(tokenizers):
    tokenizer = tokenizers["plain"]
    chat = ChatFormat(system_prompt="be brief")
    example = tokenize_messages(tokenizer, [user("add 2 and 3"), assistant("five")], None, chat)
    reference = expected(tokenizer, [
        ("<s><|im_start|>system\nbe brief<|im_end|>\n<|im_start|>user\nadd 2 and 3<|im_end|>\n<|im_start|>assistant\n",
         False), ("five<|im_end|>\n", True)])
    assert example == reference
    assert tokenize_instruction(tokenizer, "add 2 and 3", "", "five", None, system_prompt="be brief") == reference
    own = [{"role": "system", "content": "be kind"}, user("add 2 and 3"), assistant("five")]
    assert tokenize_messages(tokenizer, own, None, chat) == tokenize_messages(tokenizer, own, None)


def test_a_template_that_drops_tool_calls_stops_instead_of_training(tmp_path, tokenizers):
    rows = [{"messages": TOOL_CONVERSATION}] * 3
    with pytest.raises(UserError, match="chat template does not render tool calls .*'get_weather'.* use a chat "
                                        "template that renders tool_calls"):
        tokenized_file(tmp_path, tokenizers["plain"], rows)


@pytest.mark.parametrize("command", ["check", "prepare"])
def test_check_and_prepare_say_how_the_data_was_read(tmp_path, monkeypatch, capsys, tiny_causal_lm, command):
    import yaml
    from rich.console import Console

    from sft.cli import main

    monkeypatch.setattr("sft.cli_output.console", Console(width=400))  # one table row per line
    rows = [{"conversations": [{"from": "human", "value": f"add {a} and 2"}, {"from": "gpt", "value": "five"},
                               {"from": "human", "value": "and 4 ?"}, {"from": "gpt", "value": f"{a}"}]}
            for a in range(6)]
    write_jsonl(tmp_path / "share.jsonl", rows)
    (tmp_path / "c.yaml").write_text(yaml.safe_dump({
        "task": "causal_lm", "model": {"name": str(tiny_causal_lm)}, "output": {"dir": str(tmp_path / "runs")},
        "data": {"train": str(tmp_path / "share.jsonl"), "eval_fraction": 0, "train_on": "last_assistant",
                 "max_length": 128, "cache_dir": str(tmp_path / "cache")}}))
    assert main([command, str(tmp_path / "c.yaml")]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "read as │ messages: ShareGPT (from/value) in column 'conversations' (read as data.fields.messages); " \
           "roles human → user, gpt → assistant" in out
    if command == "prepare":
        assert "assistant turns │ 6 trained, 6 skipped (weight 0 or data.train_on)" in out
