"""Formats and masking: one pure function per format returning token ids and labels (loss only where labels are
not IGNORE_INDEX), and the batched `Dataset.map` body that applies them."""
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
    if "{% generation %}" in (tokenizer.chat_template or "") or "{%- generation %}" in (tokenizer.chat_template or ""):
        encoded = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True,
                                                return_assistant_tokens_mask=True)
        input_ids, in_answer = list(encoded["input_ids"]), list(encoded["assistant_masks"])
    else:
        input_ids, in_answer = _assistant_mask_by_prefix(tokenizer, messages)
    labels = [token if answer else IGNORE_INDEX for token, answer in zip(input_ids, in_answer)]
    return {"input_ids": input_ids[:max_length], "labels": labels[:max_length]}


def _assistant_mask_by_prefix(tokenizer, messages: list[dict]) -> tuple[list[int], list[bool]]:
    """For templates without {% generation %} markers: an assistant turn is the text between the rendering of the
    conversation up to its generation prompt and the rendering that includes the turn."""
    def render(turns: list[dict], generation_prompt: bool = False) -> str:
        if not turns:
            return ""
        return tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=generation_prompt)

    text = render(messages)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        # The conversation through its last turn is `text` itself: one rendering fewer for the common case.
        start, through = render(messages[:i], generation_prompt=True), \
            text if i == len(messages) - 1 else render(messages[: i + 1])
        if not (through.startswith(start) and text.startswith(through)):
            raise UserError("the tokenizer's chat template renders earlier turns differently once later turns exist; "
                            "add {% generation %} markers to the template (tokenizer.chat_template) to mark answers")
        spans.append((len(start), len(through)))
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    in_answer = [any(s <= char_start < e for s, e in spans) for char_start, _ in encoded["offset_mapping"]]
    return list(encoded["input_ids"]), in_answer


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
        label = record[fields.label]
        label_id = label_names.index(label) if isinstance(label, str) else label
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
    # Every format truncates by cutting the end off both lists: the same slice the functions apply themselves.
    full_length = len(example["input_ids"])
    return {"input_ids": example["input_ids"][:max_length], "labels": example["labels"][:max_length]}, full_length


def tokenize_batch(batch: dict[str, list], data_format: str, fields: Fields, tokenizer,
                   label_names: list[str] | None, max_length: int) -> dict[str, list]:
    """`Dataset.map(batched=True)` body: examples plus their full length and (causal LM) trainable-token count."""
    columns: dict[str, list] = defaultdict(list)
    names = list(batch)
    for values in zip(*(batch[name] for name in names)):
        example, full_length = tokenize_record(dict(zip(names, values)), data_format, fields, tokenizer, label_names,
                                               max_length)
        for name, value in example.items():
            columns[name].append(value)
        columns[FULL_LENGTH].append(full_length)
        if data_format != "classification":
            columns[TRAINABLE].append(sum(label != IGNORE_INDEX for label in example["labels"]))
    return dict(columns)
