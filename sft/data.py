"""Data stage: read rows from files or databases, validate them with file:line errors, and tokenize per format."""
import csv
import hashlib
import json
import random
import sqlite3
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from sft.config import Config, FileSource, Source, SQLSource
from sft.errors import UserError

IGNORE_INDEX = -100  # label value the loss skips (torch CrossEntropyLoss ignore_index)
ALPACA_PROMPT = "### Instruction:\n{instruction}\n\n### Response:\n"
ALPACA_PROMPT_WITH_INPUT = "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
FILE_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")
MAX_PROBLEMS_SHOWN = 3


@dataclass
class DataFile:
    """One input as recorded in the manifest."""
    source: str
    sha256: str
    rows: int


@dataclass
class Rows:
    """Raw examples plus where each came from (file:line), for error messages."""
    records: list[dict[str, Any]] = field(default_factory=list)
    where: list[str] = field(default_factory=list)
    files: list[DataFile] = field(default_factory=list)

    def extend(self, other: "Rows") -> None:
        self.records += other.records
        self.where += other.where
        self.files += other.files

    def subset(self, indices: list[int]) -> "Rows":
        return Rows([self.records[i] for i in indices], [self.where[i] for i in indices], self.files)


# Read sources

def read_source(source: Source, config_key: str, default_split: str = "train") -> Rows:
    if isinstance(source, SQLSource):
        return _read_sql(source, config_key)
    if isinstance(source, FileSource):
        return _read_path(Path(source.path), config_key, source.split or default_split, split_given=bool(source.split))
    rows = Rows()
    for path in [source] if isinstance(source, str) else source:
        rows.extend(_read_path(Path(path), config_key, default_split, split_given=False))
    return rows


def _read_path(path: Path, config_key: str, split: str, split_given: bool) -> Rows:
    if path.is_dir():
        return _read_saved_dataset(path, config_key, split, split_given)
    if not path.is_file():
        raise UserError(f"{config_key}: {path} does not exist; check the path (and DATA_PATH in .env)")
    readers: dict[str, Callable[[Path], Rows]] = {
        ".jsonl": _read_jsonl, ".json": _read_json, ".csv": _read_csv, ".parquet": _read_parquet}
    reader = readers.get(path.suffix.lower())
    if reader is None:
        raise UserError(f"{config_key}: {path}: unsupported file type; use one of {', '.join(FILE_SUFFIXES)} "
                        f"or a datasets save_to_disk folder")
    rows = reader(path)
    rows.files = [DataFile(str(path), _sha256_file(path), len(rows.records))]
    return rows


def _read_jsonl(path: Path) -> Rows:
    rows = Rows()
    with path.open(encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise UserError(f"{path}:{line_no}: invalid JSON ({error.msg} at column {error.colno}); "
                                f"each line must be one JSON object") from None
            _require_object(record, f"{path}:{line_no}")
            rows.records.append(record)
            rows.where.append(f"{path}:{line_no}")
    return rows


def _read_json(path: Path) -> Rows:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise UserError(f"{path}:{error.lineno}: invalid JSON ({error.msg}); fix the file or convert it to JSONL") from None
    if not isinstance(data, list):
        raise UserError(f"{path}: expected a JSON array of objects at the top level")
    rows = Rows()
    for index, record in enumerate(data):
        _require_object(record, f"{path}: item {index}")
        rows.records.append(record)
        rows.where.append(f"{path}: item {index}")
    return rows


def _read_csv(path: Path) -> Rows:
    rows = Rows()
    with path.open(encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        for record in reader:
            where = f"{path}:{reader.line_num}"
            if None in record:
                raise UserError(f"{where}: more values than header columns; quote fields that contain commas")
            rows.records.append(record)
            rows.where.append(where)
    return rows


def _read_parquet(path: Path) -> Rows:
    import pyarrow.parquet as pq

    records = pq.read_table(path).to_pylist()
    return Rows(records, [f"{path}: row {i + 1}" for i in range(len(records))])


def _read_saved_dataset(path: Path, config_key: str, split: str, split_given: bool) -> Rows:
    from datasets import DatasetDict, load_from_disk

    try:
        dataset = load_from_disk(str(path))
    except FileNotFoundError:
        raise UserError(f"{config_key}: {path} is a folder but not a datasets save_to_disk folder") from None
    if isinstance(dataset, DatasetDict):
        if split not in dataset:
            raise UserError(f"{config_key}: {path} has splits {', '.join(dataset)}, not '{split}'; "
                            f"write {config_key}: {{path: {path}, split: NAME}}")
        dataset = dataset[split]
    elif split_given:
        raise UserError(f"{config_key}: {path} holds a single dataset without splits; remove split")
    records = dataset.to_list()
    rows = Rows(records, [f"{path}[{split}]: row {i + 1}" for i in range(len(records))])
    rows.files = [DataFile(str(path), _sha256_folder(path), len(records))]
    return rows


def _read_sql(source: SQLSource, config_key: str) -> Rows:
    from sft.secrets import mask

    url = source.database
    if not url.startswith("sqlite:///"):
        raise UserError(f"{config_key}.database: {mask(url)}: only sqlite:///path URLs are supported so far; "
                        f"export the table to Parquet/JSONL or use SQLite")
    db_path = Path(url.removeprefix("sqlite:///"))
    if not db_path.is_file():
        raise UserError(f"{config_key}.database: {db_path} does not exist; check the path")
    # Read-only URI: the tool never writes into the user's data.
    connection = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)
    try:
        cursor = connection.execute(source.query)
        columns = [d[0] for d in cursor.description or []]
        records = [dict(zip(columns, row)) for row in cursor.fetchall()]
    except sqlite3.Error as error:
        raise UserError(f"{config_key}.query: {error}; check the SQL against {db_path}") from None
    finally:
        connection.close()
    digest = hashlib.sha256(json.dumps([source.query, records], default=str).encode()).hexdigest()
    rows = Rows(records, [f"{db_path}: query row {i + 1}" for i in range(len(records))])
    rows.files = [DataFile(f"{db_path} :: {source.query}", digest, len(records))]
    return rows


def _require_object(record: Any, where: str) -> None:
    if not isinstance(record, dict):
        raise UserError(f"{where}: expected a JSON object with named fields, got {type(record).__name__}")


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _sha256_folder(path: Path) -> str:
    digest = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        digest.update(str(file.relative_to(path)).encode())
        digest.update(_sha256_file(file).encode())
    return digest.hexdigest()


# Validate rows per format (every problem collected, then one line)

def detect_format(config: Config, rows: Rows) -> str:
    if config.data.format != "auto":
        return config.data.format
    if config.task == "classification":
        return "classification"
    columns = set(rows.records[0]) if rows.records else set()
    fields = config.data.fields
    if fields.messages in columns:
        return "messages"
    if {fields.prompt, fields.completion} <= columns:
        return "prompt_completion"
    if {fields.instruction, fields.output} <= columns:
        return "instruction"
    if fields.text in columns:
        return "text"
    raise UserError(f"data.format: cannot tell the format from columns {sorted(columns)} ({rows.where[0]}); "
                    f"expected {fields.messages}, {fields.prompt}+{fields.completion}, {fields.instruction}+"
                    f"{fields.output} or {fields.text}, or set data.fields / data.format")


def validate_rows(rows: Rows, data_format: str, config: Config, config_key: str) -> None:
    fields = config.data.fields
    required = {
        "classification": [(fields.text, str), (fields.label, (str, int))],
        "messages": [(fields.messages, list)],
        "prompt_completion": [(fields.prompt, str), (fields.completion, str)],
        "instruction": [(fields.instruction, str), (fields.output, str)],
        "text": [(fields.text, str)],
    }[data_format]
    if data_format == "classification" and fields.text_pair:
        required.append((fields.text_pair, str))
    if not rows.records:
        raise UserError(f"{config_key}: no examples found; check the file or query")
    problems = []
    for record, where in zip(rows.records, rows.where):
        for name, kind in required:
            value = record.get(name)
            if value is None or value == "":
                problems.append(f"{where}: missing field '{name}'")
            elif not isinstance(value, kind) or isinstance(value, bool):
                problems.append(f"{where}: field '{name}' should be {_kind_name(kind)}, got {type(value).__name__}")
        if data_format == "messages" and isinstance(record.get(fields.messages), list):
            problems += _message_problems(record[fields.messages], where)
    if problems:
        raise UserError(_summarize(f"{config_key}", problems))


def _message_problems(messages: list, where: str) -> list[str]:
    problems = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("content"), str) \
                or message.get("role") not in ("system", "user", "assistant", "tool"):
            problems.append(f"{where}: message {i} needs role (system/user/assistant/tool) and string content")
    if not any(isinstance(m, dict) and m.get("role") == "assistant" for m in messages):
        problems.append(f"{where}: no assistant message to learn from")
    return problems


def _kind_name(kind: type | tuple) -> str:
    names = {str: "a string", int: "an integer", list: "a list"}
    kinds = kind if isinstance(kind, tuple) else (kind,)
    return " or ".join(names[k] for k in kinds)


def _summarize(prefix: str, problems: list[str]) -> str:
    shown = "; ".join(problems[:MAX_PROBLEMS_SHOWN])
    more = f" (and {len(problems) - MAX_PROBLEMS_SHOWN} more)" if len(problems) > MAX_PROBLEMS_SHOWN else ""
    return f"{prefix}: {len(problems)} bad example(s): {shown}{more}"


def resolve_labels(config: Config, train: Rows, eval_rows: Rows | None) -> list[str]:
    """Class names in id order: given, or inferred (sorted) from train; every label must map to one."""
    name = config.data.fields.label
    values = [r[name] for r in train.records]
    label_names = config.data.label_names
    if label_names is None:
        if all(isinstance(v, int) for v in values):
            count = config.model.num_labels or max(values) + 1
            label_names = [str(i) for i in range(count)]
        elif all(isinstance(v, str) for v in values):
            label_names = sorted(set(values))
        else:
            raise UserError(f"data.train: field '{name}' mixes integers and strings; use one kind, or set data.label_names")
    num_labels = config.model.num_labels
    if num_labels is not None and num_labels != len(label_names):
        raise UserError(f"model.num_labels: {num_labels}, but the labels give {len(label_names)} classes "
                        f"({', '.join(label_names)}); fix num_labels or data.label_names")
    if len(label_names) < 2:
        raise UserError(f"data.train: only one label value ({label_names[0]}) found; classification needs two or more")
    for key, rows in (("data.train", train), ("data.eval", eval_rows)):
        if rows is not None:
            _check_labels_known(rows, name, label_names, key)
    return label_names


def _check_labels_known(rows: Rows, name: str, label_names: list[str], config_key: str) -> None:
    unknown: Counter = Counter()
    first_seen: dict[Any, str] = {}
    for record, where in zip(rows.records, rows.where):
        value = record[name]
        known = value in label_names if isinstance(value, str) else 0 <= value < len(label_names)
        if not known:
            unknown[value] += 1
            first_seen.setdefault(value, where)
    if unknown:
        listed = ", ".join(f"{v!r} ×{n} (first {first_seen[v]})" for v, n in unknown.most_common())
        raise UserError(f"{config_key}: labels outside {label_names}: {listed}; fix the data or data.label_names")


def split_eval(rows: Rows, fraction: float, seed: int) -> tuple[Rows, Rows]:
    """Deterministic held-out split: the same seed and data always give the same eval examples."""
    indices = list(range(len(rows.records)))
    random.Random(seed).shuffle(indices)
    n_eval = max(1, round(len(indices) * fraction))
    if n_eval >= len(indices):
        raise UserError(f"data.eval_fraction: {fraction} of {len(indices)} examples leaves none to train on")
    return rows.subset(sorted(indices[n_eval:])), rows.subset(sorted(indices[:n_eval]))


# Tokenize: one pure function per format, each returning token ids and labels

def tokenize_text(tokenizer, text: str, max_length: int) -> dict:
    input_ids = _with_eos(tokenizer, tokenizer(text)["input_ids"])[:max_length]
    return {"input_ids": input_ids, "labels": list(input_ids)}


def tokenize_prompt_completion(tokenizer, prompt: str, completion: str, max_length: int) -> dict:
    prompt_ids = tokenizer(prompt)["input_ids"]
    answer_ids = _with_eos(tokenizer, tokenizer(completion, add_special_tokens=False)["input_ids"])
    input_ids = (prompt_ids + answer_ids)[:max_length]
    labels = ([IGNORE_INDEX] * len(prompt_ids) + answer_ids)[:max_length]  # loss on the answer only
    return {"input_ids": input_ids, "labels": labels}


def tokenize_instruction(tokenizer, instruction: str, input_text: str, output: str, max_length: int) -> dict:
    """Chat-tuned tokenizers get a user/assistant conversation; base models the Alpaca prompt."""
    if tokenizer.chat_template:
        user = f"{instruction}\n\n{input_text}" if input_text else instruction
        messages = [{"role": "user", "content": user}, {"role": "assistant", "content": output}]
        return tokenize_messages(tokenizer, messages, max_length)
    template = ALPACA_PROMPT_WITH_INPUT if input_text else ALPACA_PROMPT
    return tokenize_prompt_completion(tokenizer, template.format(instruction=instruction, input=input_text),
                                      output, max_length)


def tokenize_messages(tokenizer, messages: list[dict], max_length: int) -> dict:
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
        start, through = render(messages[:i], generation_prompt=True), render(messages[: i + 1])
        if not (through.startswith(start) and text.startswith(through)):
            raise UserError("the tokenizer's chat template renders earlier turns differently once later turns exist; "
                            "add {% generation %} markers to the template (tokenizer.chat_template) to mark answers")
        spans.append((len(start), len(through)))
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    in_answer = [any(s <= char_start < e for s, e in spans) for char_start, _ in encoded["offset_mapping"]]
    return list(encoded["input_ids"]), in_answer


def tokenize_classification(tokenizer, text: str, text_pair: str | None, label: int, max_length: int) -> dict:
    encoded = tokenizer(text, text_pair, truncation=True, max_length=max_length)
    return {**encoded, "labels": label}


def _with_eos(tokenizer, ids: list[int]) -> list[int]:
    eos = tokenizer.eos_token_id
    return ids + [eos] if eos is not None and (not ids or ids[-1] != eos) else ids


def tokenize_rows(rows: Rows, data_format: str, config: Config, tokenizer, label_names: list[str] | None,
                  config_key: str) -> list[dict]:
    """Tokenize every row; causal-LM examples whose answer was truncated away are dropped and reported."""
    import logging

    fields, max_length = config.data.fields, config.data.max_length
    examples, dropped = [], []
    for record, where in zip(rows.records, rows.where):
        if data_format == "classification":
            label = record[fields.label]
            label_id = label_names.index(label) if isinstance(label, str) else label
            pair = record.get(fields.text_pair) if fields.text_pair else None
            examples.append(tokenize_classification(tokenizer, record[fields.text], pair, label_id, max_length))
            continue
        if data_format == "messages":
            example = tokenize_messages(tokenizer, record[fields.messages], max_length)
        elif data_format == "prompt_completion":
            example = tokenize_prompt_completion(tokenizer, record[fields.prompt], record[fields.completion], max_length)
        elif data_format == "instruction":
            example = tokenize_instruction(tokenizer, record[fields.instruction], record.get(fields.input) or "",
                                           record[fields.output], max_length)
        else:
            example = tokenize_text(tokenizer, record[fields.text], max_length)
        if all(label == IGNORE_INDEX for label in example["labels"]):
            dropped.append(where)
        else:
            examples.append(example)
    if dropped:
        message = (f"{config_key}: {len(dropped)} example(s) have no answer tokens left after truncation to "
                   f"data.max_length={max_length} (first: {dropped[0]}); raise data.max_length or shorten prompts")
        if not examples:
            raise UserError(message)
        logging.getLogger("sft").warning("%s; skipped them", message)
    return examples


# Token-budget batching

def group_by_tokens(lengths: list[int], max_tokens: int) -> list[list[int]]:
    """Pack example indices into batches of at most max_tokens tokens (best-fit decreasing).

    Every batch then does about the same work, which keeps a GPU busy where fixed example counts would not.
    Trainer's sampler shuffles the batches each epoch."""
    import bisect

    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    batches: list[list[int]] = []
    room: list[tuple[int, int]] = []  # (free tokens, batch index), sorted
    for index in order:
        slot = bisect.bisect_left(room, (lengths[index], -1))
        if slot < len(room):
            free, batch = room.pop(slot)
        else:
            free, batch = max_tokens, len(batches)
            batches.append([])
        batches[batch].append(index)
        bisect.insort(room, (free - lengths[index], batch))
    return batches


# The whole stage

@dataclass
class LoadedRows:
    """Validated raw examples: what `sft check` inspects and what tokenization consumes."""
    train: Rows
    eval: Rows | None
    data_format: str
    label_names: list[str] | None


@dataclass
class PreparedData:
    train: Any  # datasets.Dataset of token ids (or of token-budget batches)
    eval: Any | None
    data_format: str
    label_names: list[str] | None
    files: list[DataFile]


def load_rows(config: Config) -> LoadedRows:
    train = read_source(config.data.train, "data.train")
    eval_rows = read_source(config.data.eval, "data.eval", default_split="validation") if config.data.eval else None
    data_format = detect_format(config, train)
    validate_rows(train, data_format, config, "data.train")
    if eval_rows is not None:
        validate_rows(eval_rows, data_format, config, "data.eval")
    elif config.data.eval_fraction > 0:
        files = train.files
        train, eval_rows = split_eval(train, config.data.eval_fraction, config.training.seed)
        eval_rows.files = []  # the files are recorded once, under train
        train.files = files
    label_names = resolve_labels(config, train, eval_rows) if data_format == "classification" else None
    return LoadedRows(train, eval_rows, data_format, label_names)


def prepare(config: Config, tokenizer) -> PreparedData:
    from datasets import Dataset

    loaded = load_rows(config)
    datasets = []
    for key, rows in (("data.train", loaded.train), ("data.eval", loaded.eval)):
        if rows is None:
            datasets.append(None)
            continue
        examples = tokenize_rows(rows, loaded.data_format, config, tokenizer, loaded.label_names, key)
        if config.training.max_tokens_per_batch and config.task == "causal_lm":
            examples = _batches_by_tokens(examples, config.training.max_tokens_per_batch)
        datasets.append(Dataset.from_list(examples))
    files = loaded.train.files + (loaded.eval.files if loaded.eval else [])
    return PreparedData(datasets[0], datasets[1], loaded.data_format, loaded.label_names, files)


def _batches_by_tokens(examples: list[dict], max_tokens: int) -> list[dict]:
    """Each row becomes one batch: lists of examples' input_ids and labels, flattened by the collator."""
    batches = group_by_tokens([len(e["input_ids"]) for e in examples], max_tokens)
    return [{"input_ids": [examples[i]["input_ids"] for i in batch], "labels": [examples[i]["labels"] for i in batch]}
            for batch in batches]
