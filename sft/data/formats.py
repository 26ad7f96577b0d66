"""Formats and masking: one pure function per format returning token ids and labels (loss only where labels are
not IGNORE_INDEX), and the batched `Dataset.map` body that applies them."""
import re
from bisect import bisect_left
from collections import defaultdict

from sft.config import Fields
from sft.errors import UserError

IGNORE_INDEX = -100  # label value the loss skips (torch CrossEntropyLoss ignore_index)
ALPACA_PROMPT = "### Instruction:\n{instruction}\n\n### Response:\n"
ALPACA_PROMPT_WITH_INPUT = "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
# Extra columns the map writes for the data summary; dropped before the data is stored.
FULL_LENGTH, TRAINABLE = "_full_length", "_trainable"


def tokenize_text(tokenizer, text: str, max_length: int | None) -> dict:
    input_ids = _with_eos(tokenizer, tokenizer(text)["input_ids"])[:max_length]
    return {"input_ids": input_ids, "labels": list(input_ids)}


def tokenize_prompt_completion(tokenizer, prompt: str, completion: str, max_length: int | None) -> dict:
    prompt_ids = tokenizer(prompt)["input_ids"]
    answer_ids = _with_eos(tokenizer, tokenizer(completion, add_special_tokens=False)["input_ids"])
    input_ids = (prompt_ids + answer_ids)[:max_length]
    labels = ([IGNORE_INDEX] * len(prompt_ids) + answer_ids)[:max_length]  # loss on the answer only
    return {"input_ids": input_ids, "labels": labels}


def tokenize_instruction(tokenizer, instruction: str, input_text: str, output: str, max_length: int | None) -> dict:
    """Chat-tuned tokenizers get a user/assistant conversation; base models the Alpaca prompt."""
    if tokenizer.chat_template:
        user = f"{instruction}\n\n{input_text}" if input_text else instruction
        messages = [{"role": "user", "content": user}, {"role": "assistant", "content": output}]
        return tokenize_messages(tokenizer, messages, max_length)
    template = ALPACA_PROMPT_WITH_INPUT if input_text else ALPACA_PROMPT
    return tokenize_prompt_completion(tokenizer, template.format(instruction=instruction, input=input_text),
                                      output, max_length)


def tokenize_messages(tokenizer, messages: list[dict], max_length: int | None) -> dict:
    """Render with the tokenizer's chat template; loss on assistant turns (their end-of-turn tokens included)."""
    return tokenize_conversations(tokenizer, [messages], max_length)[0]


def tokenize_conversations(tokenizer, conversations: list[list[dict]], max_length: int | None) -> list[dict]:
    """tokenize_messages for many conversations at once: one template call per kind of rendering and one tokenizer
    call for the batch (per-call overhead, not the work, dominates short chats)."""
    template = tokenizer.chat_template or ""
    if "{% generation %}" in template or "{%- generation %}" in template:
        encoded = tokenizer.apply_chat_template(conversations, tokenize=True, return_dict=True,
                                                return_assistant_tokens_mask=True)
        pairs = [(list(ids), [token if answer else IGNORE_INDEX for token, answer in zip(ids, mask)])
                 for ids, mask in zip(encoded["input_ids"], encoded["assistant_masks"])]
    else:
        pairs = _answer_labels_by_prefix(tokenizer, conversations)
    return [{"input_ids": input_ids[:max_length], "labels": labels[:max_length]} for input_ids, labels in pairs]


def _answer_labels_by_prefix(tokenizer, conversations: list[list[dict]]) -> list[tuple[list[int], list[int]]]:
    """For templates without {% generation %} markers: an assistant turn is the text between the rendering of the
    conversation up to its generation prompt and the rendering that includes the turn. Returns (input_ids, labels)."""
    def render(turn_lists: list[list[dict]], generation_prompt: bool = False) -> list[str]:
        filled = [turns for turns in turn_lists if turns]
        rendered = iter(render_chats(tokenizer, filled, generation_prompt) if filled else [])
        return [next(rendered) if turns else "" for turns in turn_lists]

    texts = render(conversations)
    turns = [(c, i) for c, messages in enumerate(conversations) for i, m in enumerate(messages)
             if m["role"] == "assistant"]
    starts = render([conversations[c][:i] for c, i in turns], generation_prompt=True)
    # The conversation through its last turn is its full text: one rendering fewer for the common case.
    throughs = render([conversations[c][: i + 1] if i < len(conversations[c]) - 1 else [] for c, i in turns])
    spans: list[list[tuple[int, int]]] = [[] for _ in conversations]
    for (c, i), start, through in zip(turns, starts, throughs):
        through = through if i < len(conversations[c]) - 1 else texts[c]
        if not (through.startswith(start) and texts[c].startswith(through)):
            raise UserError("the tokenizer's chat template renders earlier turns differently once later turns exist; "
                            "add {% generation %} markers to the template (tokenizer.chat_template) to mark answers")
        spans[c].append((len(start), len(through)))
    results = []
    for encoding, text, answer_spans in zip(_encode(tokenizer, texts), texts, spans):
        input_ids = encoding.ids
        # A token belongs to an answer when its first character does; the labels are copied by slices.
        labels = [IGNORE_INDEX] * len(input_ids)
        for span_start, span_end in answer_spans:
            first = _first_token_from(encoding, span_start, len(text))
            end = _first_token_from(encoding, span_end, len(text))
            labels[first:end] = input_ids[first:end]
        results.append((input_ids, labels))
    return results


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


def prompt_ids(tokenizer, record: dict, data_format: str, fields: Fields) -> list[int]:
    """The tokens a causal-LM example of this format starts with before its answer, exactly as training tokenized
    them: what a trained model continues from (`sft predict`). A trailing assistant turn in messages is the
    expected answer and left out."""
    if data_format == "messages":
        messages = list(record[fields.messages])
        while messages and messages[-1]["role"] == "assistant":
            messages.pop()
        return _conversation_start(tokenizer, messages)
    if data_format == "instruction":
        instruction, input_text = record[fields.instruction], record.get(fields.input) or ""
        if tokenizer.chat_template:
            user = f"{instruction}\n\n{input_text}" if input_text else instruction
            return _conversation_start(tokenizer, [{"role": "user", "content": user}])
        template = ALPACA_PROMPT_WITH_INPUT if input_text else ALPACA_PROMPT
        return tokenizer(template.format(instruction=instruction, input=input_text))["input_ids"]
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


def render_chats(tokenizer, conversations: list[list[dict]], generation_prompt: bool) -> list[str]:
    """`tokenizer.apply_chat_template(conversations, tokenize=False, add_generation_prompt=...)` for rows read from
    Arrow. apply_chat_template first deep-copies every message to turn message objects into dicts and drop the fields
    that are None; rows from Arrow are plain dicts already, so dropping the None fields is all that copy does here
    (a few percent of the masking CPU: rendering runs about 2.4 times per conversation)."""
    from transformers.utils.chat_template_utils import render_jinja_template

    messages = [[{key: value for key, value in message.items() if value is not None} for message in conversation]
                for conversation in conversations]
    rendered, _ = render_jinja_template(messages, chat_template=tokenizer.get_chat_template(),
                                        add_generation_prompt=generation_prompt, **tokenizer.special_tokens_map)
    return rendered


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
                    max_length: int) -> tuple[dict, int]:
    """One validated row → (example truncated to max_length, its length before truncation)."""
    if data_format == "classification":
        label_id = class_id(record[fields.label], label_names)
        pair = record.get(fields.text_pair) if fields.text_pair else None
        example = tokenize_classification(tokenizer, record[fields.text], pair, label_id, None)
        full_length = len(example["input_ids"])
        if full_length > max_length:  # pairs truncate longest-first, not by a slice: let the tokenizer do it
            example = tokenize_classification(tokenizer, record[fields.text], pair, label_id, max_length)
        return example, full_length
    if data_format == "messages":
        example = tokenize_messages(tokenizer, record[fields.messages], None)
    elif data_format == "prompt_completion":
        example = tokenize_prompt_completion(tokenizer, record[fields.prompt], record[fields.completion], None)
    elif data_format == "instruction":
        example = tokenize_instruction(tokenizer, record[fields.instruction], record.get(fields.input) or "",
                                       record[fields.output], None)
    else:
        example = tokenize_text(tokenizer, record[fields.text], None)
    return _truncated(example, max_length), len(example["input_ids"])


def tokenize_batch(batch: dict[str, list], data_format: str, fields: Fields, tokenizer,
                   label_names: list[str] | None, max_length: int) -> dict[str, list]:
    """`Dataset.map(batched=True)` body: examples plus their full length and (causal LM) trainable-token count."""
    names = list(batch)
    if data_format == "messages":  # the whole batch in one go (see tokenize_conversations)
        full = tokenize_conversations(tokenizer, batch[fields.messages], None)
        results = [(_truncated(example, max_length), len(example["input_ids"])) for example in full]
    else:
        results = [tokenize_record(dict(zip(names, values)), data_format, fields, tokenizer, label_names, max_length)
                   for values in zip(*(batch[name] for name in names))]
    columns: dict[str, list] = defaultdict(list)
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
