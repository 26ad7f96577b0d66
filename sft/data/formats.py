"""Formats and masking: one pure function per format returning token ids and labels (loss only where labels are
not IGNORE_INDEX), and the batched `Dataset.map` body that applies them."""
import json
import re
from bisect import bisect_left
from collections import defaultdict
from dataclasses import dataclass, field

from sft.config import Config, Fields
from sft.errors import UserError

IGNORE_INDEX = -100  # label value the loss skips (torch CrossEntropyLoss ignore_index)
ALPACA_PROMPT = "### Instruction:\n{instruction}\n\n### Response:\n"
ALPACA_PROMPT_WITH_INPUT = "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
# Extra columns the map writes for the data summary; dropped before the data is stored.
FULL_LENGTH, TRAINABLE = "_full_length", "_trainable"
TRAINED_TURNS, SKIPPED_TURNS = "_trained_turns", "_skipped_turns"
ROLES = ("system", "user", "assistant", "tool")
# Role names as ShareGPT data writes them (LLaMA-Factory's list) → the roles chat templates read. tool_call: a
# ShareGPT turn whose value is the call as JSON ({"name", "arguments"}); it becomes an assistant's tool_calls.
USUAL_ROLES = {"system": "system", "user": "user", "human": "user", "assistant": "assistant", "gpt": "assistant",
               "model": "assistant", "chatgpt": "assistant", "bing": "assistant", "bard": "assistant",
               "tool": "tool", "observation": "tool", "function": "tool", "function_call": "tool_call",
               "tool_call": "tool_call"}
REASONING_KEYS = ("reasoning_content", "thinking")  # the names reasoning models' chat templates read


@dataclass
class ChatFormat:
    """How conversations are read (role names) and which of their tokens carry loss (data.train_on and friends)."""
    roles: dict[str, str] = field(default_factory=lambda: dict(USUAL_ROLES))
    train_on: str = "all_assistant"
    train_on_reasoning: bool = True
    system_prompt: str | None = None


def chat_format(config: Config) -> ChatFormat:
    data = config.data
    return ChatFormat({**USUAL_ROLES, **data.fields.roles}, data.train_on, data.train_on_reasoning, data.system_prompt)


def standard_message(message: dict, roles: dict[str, str]) -> dict:
    """One message as chat templates read it ({role, content, ...}), from OpenAI or ShareGPT ({from, value}) shape.
    OpenAI messages with a usual role come back as they are (no copy: the common case stays cheap). Raises
    ValueError for a role it cannot map or a ShareGPT tool call that is not JSON."""
    role = message.get("role")
    if role in ROLES and roles.get(role, role) == role and "from" not in message:
        return message
    sharegpt = "from" in message and "role" not in message
    name = message.get("from") if sharegpt else role
    if not isinstance(name, str) or name not in roles:
        raise ValueError(f"unknown role {name!r}" if name is not None else "no role (or from)")
    content = message.get("value") if sharegpt else message.get("content")
    rest = {key: value for key, value in message.items() if key not in ("from", "value", "role", "content")}
    if roles[name] != "tool_call":
        return {"role": roles[name], "content": content, **rest}
    try:
        calls = json.loads(content) if isinstance(content, str) else content
    except json.JSONDecodeError:
        raise ValueError(f"a {name} turn holds the call as JSON ({{\"name\": ..., \"arguments\": ...}}), "
                         f"not {str(content)[:40]!r}") from None
    calls = calls if isinstance(calls, list) else [calls]
    return {"role": "assistant", **rest,
            "tool_calls": [{"type": "function", "function": call} if isinstance(call, dict) and "function" not in call
                           else call for call in calls]}


def to_messages(conversation: list[dict], chat: ChatFormat) -> list[dict]:
    """A conversation in OpenAI message form, with data.system_prompt when it has no system message."""
    messages = [standard_message(message, chat.roles) for message in conversation]
    if chat.system_prompt is not None and not any(message["role"] == "system" for message in messages):
        messages = [{"role": "system", "content": chat.system_prompt}, *messages]
    return messages


def trained_turns(messages: list[dict], train_on: str) -> list[int]:
    """The assistant messages that carry loss: never one with weight 0 (OpenAI's per-turn switch); with
    last_assistant only the last of the others."""
    turns = [i for i, message in enumerate(messages) if message["role"] == "assistant" and message.get("weight") != 0]
    return turns[-1:] if train_on == "last_assistant" else turns


def tool_schemas(value) -> list | None:
    """A row's tools column: a list of function schemas, or the same as a JSON string."""
    if isinstance(value, str):
        return json.loads(value) if value.strip() else None
    return value


def tokenize_text(tokenizer, text: str, max_length: int | None) -> dict:
    input_ids = _with_eos(tokenizer, tokenizer(text)["input_ids"])[:max_length]
    return {"input_ids": input_ids, "labels": list(input_ids)}


def tokenize_prompt_completion(tokenizer, prompt: str, completion: str, max_length: int | None) -> dict:
    prompt_ids = tokenizer(prompt)["input_ids"]
    answer_ids = _with_eos(tokenizer, tokenizer(completion, add_special_tokens=False)["input_ids"])
    input_ids = (prompt_ids + answer_ids)[:max_length]
    labels = ([IGNORE_INDEX] * len(prompt_ids) + answer_ids)[:max_length]  # loss on the answer only
    return {"input_ids": input_ids, "labels": labels}


def tokenize_instruction(tokenizer, instruction: str, input_text: str, output: str, max_length: int | None,
                         system_prompt: str | None = None) -> dict:
    """Chat-tuned tokenizers get a user/assistant conversation (after the system prompt, if any); base models the
    Alpaca prompt."""
    prompt = instruction_prompt(tokenizer, instruction, input_text)
    if isinstance(prompt, str):
        return tokenize_prompt_completion(tokenizer, prompt, output, max_length)
    messages = [prompt, {"role": "assistant", "content": output}]
    return tokenize_messages(tokenizer, messages, max_length, ChatFormat(system_prompt=system_prompt))


def instruction_prompt(tokenizer, instruction: str, input_text: str) -> dict | str:
    """What an instruction row asks, as the model sees it before the answer: a user message for chat-tuned
    tokenizers, the Alpaca prompt text for base models."""
    if tokenizer.chat_template:
        return {"role": "user", "content": f"{instruction}\n\n{input_text}" if input_text else instruction}
    template = ALPACA_PROMPT_WITH_INPUT if input_text else ALPACA_PROMPT
    return template.format(instruction=instruction, input=input_text)


def tokenize_messages(tokenizer, messages: list[dict], max_length: int | None, chat: ChatFormat | None = None,
                      tools: list | None = None) -> dict:
    """Render with the tokenizer's chat template; loss on the trained assistant turns (their end-of-turn tokens
    included), never on the system prompt, user turns, tool results or the tool schemas."""
    return tokenize_conversations(tokenizer, [messages], max_length, chat, [tools])[0]


def tokenize_conversations(tokenizer, conversations: list[list[dict]], max_length: int | None,
                           chat: ChatFormat | None = None, tools: list[list | None] | None = None) -> list[dict]:
    """tokenize_messages for many conversations at once: one template call per kind of rendering and one tokenizer
    call for the batch (per-call overhead, not the work, dominates short chats)."""
    chat = chat or ChatFormat()
    conversations = [to_messages(conversation, chat) for conversation in conversations]
    tools = tools or [None] * len(conversations)
    template = tokenizer.chat_template
    if not template:
        raise UserError(f"the tokenizer of {tokenizer.name_or_path} has no chat template, which chat (messages) data "
                        f"needs; use a chat model's tokenizer, or convert the data to prompt/completion")
    if "{% generation %}" in template or "{%- generation %}" in template:
        texts, spans = _answer_spans_by_markers(tokenizer, conversations, tools, chat.train_on)
    else:
        texts, spans = _answer_spans_by_prefix(tokenizer, conversations, tools, chat.train_on)
    results = []
    for encoding, text, answer_spans, messages in zip(_encode(tokenizer, texts), texts, spans, conversations):
        input_ids = encoding.ids
        # A token belongs to an answer when its first character does; the labels are copied by slices.
        labels = [IGNORE_INDEX] * len(input_ids)
        for turn, (span_start, span_end) in answer_spans:
            _check_tool_calls_rendered(messages[turn], text[span_start:span_end])
            if not chat.train_on_reasoning:
                span_start = _after_reasoning(messages[turn], text, span_start, span_end)
            first = _first_token_from(encoding, span_start, len(text))
            end = _first_token_from(encoding, span_end, len(text))
            labels[first:end] = input_ids[first:end]
        results.append({"input_ids": input_ids[:max_length], "labels": labels[:max_length]})
    return results


Spans = list[tuple[int, tuple[int, int]]]  # (message index, (first character, end character)) per trained turn


def _answer_spans_by_markers(tokenizer, conversations: list[list[dict]], tools: list, train_on: str) \
        -> tuple[list[str], list[Spans]]:
    """Templates with {% generation %} markers: the marked blocks, one per assistant message in order."""
    texts, indices = render_chats(tokenizer, conversations, False, tools, generation_indices=True)
    spans = []
    for messages, blocks in zip(conversations, indices):
        answers = [i for i, message in enumerate(messages) if message["role"] == "assistant"]
        if len(blocks) != len(answers):
            raise UserError(f"the tokenizer's chat template marks {len(blocks)} {{% generation %}} block(s) in a "
                            f"conversation with {len(answers)} assistant message(s); mark each assistant message "
                            f"once (tokenizer.chat_template)")
        trained = set(trained_turns(messages, train_on))
        spans.append([(turn, block) for turn, block in zip(answers, blocks) if turn in trained])
    return texts, spans


def _answer_spans_by_prefix(tokenizer, conversations: list[list[dict]], tools: list, train_on: str) \
        -> tuple[list[str], list[Spans]]:
    """For templates without {% generation %} markers: an assistant turn is the text between the rendering of the
    conversation up to its generation prompt and the rendering that includes the turn."""
    def render(picked: list[tuple[int, list[dict]]], generation_prompt: bool = False) -> list[str]:
        return render_chats(tokenizer, [turns for _, turns in picked], generation_prompt,
                            [tools[c] for c, _ in picked]) if picked else []

    texts = render(list(enumerate(conversations)))
    turns = [(c, i) for c, messages in enumerate(conversations) for i in trained_turns(messages, train_on)]
    if any(i == 0 for _, i in turns):
        _check_renders_empty_conversation(tokenizer)
    # A conversation that opens with an assistant turn: its answer starts after the generation prompt of an empty
    # conversation (the start-of-text token and the role header are prompt, not answer).
    starts = render([(c, conversations[c][:i]) for c, i in turns], generation_prompt=True)
    # The conversation through its last turn is its full text: one rendering fewer for the common case.
    through_turns = [(c, i) for c, i in turns if i < len(conversations[c]) - 1]
    throughs = iter(render([(c, conversations[c][: i + 1]) for c, i in through_turns]))
    spans: list[Spans] = [[] for _ in conversations]
    for (c, i), start in zip(turns, starts):
        through = next(throughs) if i < len(conversations[c]) - 1 else texts[c]
        if not (through.startswith(start) and texts[c].startswith(through)):
            raise UserError("the tokenizer's chat template renders earlier turns differently once later turns exist; "
                            "add {% generation %} markers to the template (tokenizer.chat_template) to mark answers")
        spans[c].append((i, (len(start), len(through))))
    return texts, spans


def _check_renders_empty_conversation(tokenizer) -> None:
    try:
        render_chats(tokenizer, [[]], generation_prompt=True)
    except Exception as error:  # a Jinja error in the user's template, e.g. messages[0] of an empty list
        raise UserError(f"a conversation starts with an assistant message, and the tokenizer's chat template cannot "
                        f"render the prompt before it ({error}); start conversations with a user message, or set "
                        f"data.system_prompt") from None


def _after_reasoning(message: dict, text: str, start: int, end: int) -> int:
    """data.train_on_reasoning false: the answer's loss starts after its reasoning trace (as rendered)."""
    reasoning = next((message[key] for key in REASONING_KEYS if message.get(key)), None)
    found = text.find(reasoning, start, end) if reasoning else -1
    return found + len(reasoning) if found >= 0 else start


def _check_tool_calls_rendered(message: dict, answer: str) -> None:
    """A template that leaves tool calls out would train on an answer without them: stop and say so."""
    for call in message.get("tool_calls") or []:
        name = (call.get("function") or call)["name"]
        if name not in answer:
            raise UserError(f"the tokenizer's chat template does not render tool calls (the call of {name!r} is "
                            f"missing from the rendered answer); use a chat template that renders tool_calls "
                            f"(tokenizer.chat_template) or leave the tool-call turns out")


def _first_token_from(encoding, char: int, text_length: int) -> int:
    """The first token that starts at or after character `char`: bisect over the ascending offsets ((char,) sorts
    before every (char, end)). Asked of the Rust encoding first: reading every offset into Python tuples measured
    ~10% of the masked tokenization. The bisect decides whenever the boundary is not clean (a token straddling it,
    several tokens starting at one character, a character no token covers)."""
    token = encoding.char_to_token(char) if char < text_length else len(encoding)
    if token is not None and (token == 0 or encoding.token_to_chars(token - 1)[0] < char) \
            and (token == len(encoding) or encoding.token_to_chars(token)[0] == char):
        return token
    return bisect_left(encoding.offsets, (char,))


def prompt_ids(tokenizer, record: dict, data_format: str, fields: Fields, chat: ChatFormat | None = None) -> list[int]:
    """The tokens a causal-LM example of this format starts with before its answer, exactly as training tokenized
    them (with the run's chat_format: system prompt, role names): what a trained model continues from
    (`sft predict`). A trailing assistant turn in messages is the expected answer and left out."""
    chat = chat or ChatFormat()
    if data_format == "messages":
        messages = to_messages(record[fields.messages], chat)
        while messages and messages[-1]["role"] == "assistant":
            messages.pop()
        return _conversation_start(tokenizer, messages)
    if data_format == "instruction":
        prompt = instruction_prompt(tokenizer, record[fields.instruction], record.get(fields.input) or "")
        if isinstance(prompt, str):
            return tokenizer(prompt)["input_ids"]
        return _conversation_start(tokenizer, to_messages([prompt], chat))
    if data_format == "prompt_completion":
        return tokenizer(record[fields.prompt])["input_ids"]
    return tokenizer(record[fields.text])["input_ids"]  # text: continue it


def _conversation_start(tokenizer, messages: list[dict]) -> list[int]:
    # Rendered to text, then tokenized without special tokens: as tokenize_conversations does for training.
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _encode(tokenizer, texts: list[str]) -> list:
    """The Rust tokenizer's encodings of `texts` (no special tokens added). Straight from the Rust tokenizer when it is
    set up as `tokenizer(texts)` would set it (no truncation, no padding): the Python wrapper turns every encoding into
    lists of ids, attention mask and offsets, which measured ~10% of the masked tokenization's CPU."""
    backend = tokenizer.backend_tokenizer
    if backend.truncation is None and backend.padding is None \
            and backend.encode_special_tokens == tokenizer.split_special_tokens:
        return backend.encode_batch(texts, add_special_tokens=False)
    return tokenizer(texts, add_special_tokens=False).encodings


def render_chats(tokenizer, conversations: list[list[dict]], generation_prompt: bool, tools: list | None = None,
                 generation_indices: bool = False):
    """`tokenizer.apply_chat_template(conversations, tokenize=False, add_generation_prompt=..., tools=...)` for rows
    read from Arrow, with per-conversation tools (one template call per distinct tool list). apply_chat_template first
    deep-copies every message to turn message objects into dicts and drop the fields that are None; rows from Arrow
    are plain dicts already, so dropping the None fields is all that copy does here (a few percent of the masking
    CPU: rendering runs about 2.4 times per conversation). With generation_indices: (texts, {% generation %} spans)."""
    from transformers.utils.chat_template_utils import render_jinja_template

    messages = [[{key: value for key, value in message.items() if value is not None} for message in conversation]
                for conversation in conversations]
    groups: dict[str, list[int]] = defaultdict(list)
    if tools is None or not any(tools):  # the common case: one call, no keys to build
        groups["null"] = list(range(len(messages)))
    else:
        for index, schemas in enumerate(tools):
            groups[json.dumps(schemas)].append(index)
    texts, indices = [""] * len(messages), [[]] * len(messages)
    for key, members in groups.items():
        rendered, spans = render_jinja_template(
            [messages[i] for i in members], tools=json.loads(key), chat_template=tokenizer.get_chat_template(),
            add_generation_prompt=generation_prompt, return_assistant_tokens_mask=generation_indices,
            **tokenizer.special_tokens_map)
        for position, index in enumerate(members):
            texts[index] = rendered[position]
            if generation_indices:
                indices[index] = spans[position]
    return (texts, indices) if generation_indices else texts


def class_id(label: str | int, label_names: list[str]) -> int | None:
    """A label's class id: its place in label_names, else the label itself when it is an integer — also written
    as text, as every CSV value is (so a CSV file of 0/1 reads as the same JSONL does); None when it is neither."""
    if isinstance(label, str):
        if label in label_names:
            return label_names.index(label)
        if not re.fullmatch(r"[+-]?\d+", label):
            return None
        label = int(label)
    return label if 0 <= label < len(label_names) else None


def tokenize_classification(tokenizer, text: str, text_pair: str | None, label: int, max_length: int | None) -> dict:
    encoded = tokenizer(text, text_pair, truncation=max_length is not None, max_length=max_length)
    return {**encoded, "labels": label}


def _with_eos(tokenizer, ids: list[int]) -> list[int]:
    eos = tokenizer.eos_token_id
    return ids + [eos] if eos is not None and (not ids or ids[-1] != eos) else ids


def tokenize_record(record: dict, data_format: str, fields: Fields, tokenizer, label_names: list[str] | None,
                    max_length: int, chat: ChatFormat | None = None) -> tuple[dict, int]:
    """One validated row → (example truncated to max_length, its length before truncation)."""
    if data_format == "classification":
        label_id = class_id(record[fields.label], label_names)
        pair = record.get(fields.text_pair) if fields.text_pair else None
        example = tokenize_classification(tokenizer, record[fields.text], pair, label_id, None)
        full_length = len(example["input_ids"])
        if full_length > max_length:  # pairs truncate longest-first, not by a slice: let the tokenizer do it
            example = tokenize_classification(tokenizer, record[fields.text], pair, label_id, max_length)
        return example, full_length
    chat = chat or ChatFormat()
    if data_format == "messages":
        example = tokenize_messages(tokenizer, record[fields.messages], None, chat,
                                    tool_schemas(record.get(fields.tools)))
    elif data_format == "prompt_completion":
        example = tokenize_prompt_completion(tokenizer, record[fields.prompt], record[fields.completion], None)
    elif data_format == "instruction":
        example = tokenize_instruction(tokenizer, record[fields.instruction], record.get(fields.input) or "",
                                       record[fields.output], None, chat.system_prompt)
    else:
        example = tokenize_text(tokenizer, record[fields.text], None)
    return _truncated(example, max_length), len(example["input_ids"])


def tokenize_batch(batch: dict[str, list], data_format: str, fields: Fields, tokenizer,
                   label_names: list[str] | None, max_length: int, chat: ChatFormat | None = None) -> dict[str, list]:
    """`Dataset.map(batched=True)` body: examples plus their full length, (causal LM) trainable-token count and
    (messages) the assistant turns trained and skipped."""
    names = list(batch)
    columns: dict[str, list] = defaultdict(list)
    if data_format == "messages":  # the whole batch in one go (see tokenize_conversations)
        chat = chat or ChatFormat()
        conversations = [to_messages(conversation, chat) for conversation in batch[fields.messages]]
        tools = [tool_schemas(value) for value in batch[fields.tools]] if fields.tools in batch else None
        full = tokenize_conversations(tokenizer, conversations, None, chat, tools)
        results = [(_truncated(example, max_length), len(example["input_ids"])) for example in full]
        for messages in conversations:
            trained = len(trained_turns(messages, chat.train_on))
            columns[TRAINED_TURNS].append(trained)
            columns[SKIPPED_TURNS].append(sum(message["role"] == "assistant" for message in messages) - trained)
    else:
        results = [tokenize_record(dict(zip(names, values)), data_format, fields, tokenizer, label_names, max_length,
                                   chat) for values in zip(*(batch[name] for name in names))]
    for example, full_length in results:
        for name, value in example.items():
            columns[name].append(value)
        columns[FULL_LENGTH].append(full_length)
        if data_format != "classification":
            columns[TRAINABLE].append(len(example["labels"]) - example["labels"].count(IGNORE_INDEX))
    return dict(columns)


def _truncated(example: dict, max_length: int) -> dict:
    """Every causal-LM format truncates by cutting the end off both lists (the slice the functions apply)."""
    return {"input_ids": example["input_ids"][:max_length], "labels": example["labels"][:max_length]}
