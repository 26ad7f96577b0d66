"""Validate rows per format, streaming over the Arrow data: every problem counted, the first few shown with
file:line, all in one line; then labels, duplicates and the held-out eval split."""
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Iterator

from sft.config import Config, Fields
from sft.data.formats import class_id
from sft.data.sources import Rows
from sft.errors import UserError

MAX_PROBLEMS_SHOWN = 3
MAX_LABELS_SHOWN = 5
INTEGER = re.compile(r"[+-]?\d+")
BATCH_ROWS = 1000  # rows turned into Python objects at a time: memory stays flat however large the data
ROLES = ("system", "user", "assistant", "tool")


def iter_records(rows: Rows, columns: list[str] | None = None) -> Iterator[tuple[int, dict[str, Any]]]:
    """(row number, record) over the dataset, one batch of Python objects at a time."""
    dataset = rows.dataset
    if columns is not None:
        dataset = dataset.select_columns([c for c in columns if c in dataset.column_names])
    index = 0
    for batch in dataset.iter(batch_size=BATCH_ROWS):
        names = list(batch)
        for values in zip(*(batch[name] for name in names)):
            yield index, dict(zip(names, values))
            index += 1


def detect_format(config: Config, rows: Rows) -> str:
    if config.data.format != "auto":
        return config.data.format
    if config.task == "classification":
        return "classification"
    columns = set(rows.dataset.column_names)
    fields = config.data.fields
    if fields.messages in columns:
        return "messages"
    if {fields.prompt, fields.completion} <= columns:
        return "prompt_completion"
    if {fields.instruction, fields.output} <= columns:
        return "instruction"
    if fields.text in columns:
        return "text"
    first = f" ({rows.where(0)})" if len(rows) else ""
    raise UserError(f"data.format: cannot tell the format from columns {sorted(columns)}{first}; "
                    f"expected {fields.messages}, {fields.prompt}+{fields.completion}, {fields.instruction}+"
                    f"{fields.output} or {fields.text}, or set data.fields / data.format")


def format_columns(data_format: str, fields: Fields) -> list[str]:
    """The columns a format reads (all others are dropped before tokenization)."""
    return {"classification": [fields.text, fields.label] + ([fields.text_pair] if fields.text_pair else []),
            "messages": [fields.messages], "prompt_completion": [fields.prompt, fields.completion],
            "instruction": [fields.instruction, fields.input, fields.output], "text": [fields.text]}[data_format]


def _required(data_format: str, fields: Fields) -> list[tuple[str, type | tuple]]:
    required = {
        "classification": [(fields.text, str), (fields.label, (str, int))],
        "messages": [(fields.messages, list)],
        "prompt_completion": [(fields.prompt, str), (fields.completion, str)],
        "instruction": [(fields.instruction, str), (fields.output, str)],
        "text": [(fields.text, str)],
    }[data_format]
    if data_format == "classification" and fields.text_pair:
        required.append((fields.text_pair, str))
    return required


def record_problems(record: dict, data_format: str, fields: Fields) -> list[str]:
    """What is wrong with one row (empty when it is fine), without the location."""
    problems = []
    for name, kind in _required(data_format, fields):
        value = record.get(name)
        if value is None or value == "":
            problems.append(f"missing field '{name}'")
        elif not isinstance(value, kind) or isinstance(value, bool):
            problems.append(f"field '{name}' should be {_kind_name(kind)}, got {type(value).__name__}")
    if data_format == "messages" and isinstance(record.get(fields.messages), list):
        problems += _message_problems(record[fields.messages])
    return problems


def row_problems(rows: Rows, data_format: str, config: Config, config_key: str) -> list[str]:
    """The bad rows of one source as one problem: every one counted, the first few shown with file:line."""
    fields = config.data.fields
    if not len(rows):
        return [f"{config_key}: no examples found; check the file or query"]
    if _clean_by_arrow(rows.dataset, data_format, fields):
        return []
    count, shown = 0, []
    for index, record in iter_records(rows, format_columns(data_format, fields)):
        problems = record_problems(record, data_format, fields)
        count += len(problems)
        for problem in problems[:MAX_PROBLEMS_SHOWN - len(shown)]:
            shown.append(f"{rows.where(index)}: {problem}")
    if not count:
        return []
    more = f" (and {count - len(shown)} more)" if count > len(shown) else ""
    return [f"{config_key}: {count} bad example(s): {'; '.join(shown)}{more}"]


def _clean_by_arrow(dataset, data_format: str, fields: Fields) -> bool:
    """True when the Arrow column types and a few vectorised checks prove that no row has a problem, as in clean
    data: the row-by-row check (in one process, ~5 µs a row) then has nothing to find. Anything else (nulls, empty
    strings, other types, a row selection) is left to that check, which says what is wrong where."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if dataset._indices is not None:
        return False
    for name, kind in _required(data_format, fields):
        if name not in dataset.column_names:
            return False
        column, kinds = dataset.data.column(name), kind if isinstance(kind, tuple) else (kind,)
        if column.null_count:
            return False
        if pa.types.is_string(column.type) or pa.types.is_large_string(column.type):
            if str not in kinds or pc.any(pc.equal(column, "")).as_py():
                return False
        elif pa.types.is_integer(column.type):
            if int not in kinds:
                return False
        elif not (list in kinds and data_format == "messages" and _messages_clean(column)):
            return False
    return True


def _messages_clean(column) -> bool:
    """Every conversation is a list of messages with a known role and string content, one of them an assistant's."""
    import pyarrow as pa
    import pyarrow.compute as pc

    text = (pa.string(), pa.large_string())
    for chunk in column.chunks:
        if not (pa.types.is_list(chunk.type) or pa.types.is_large_list(chunk.type)):
            return False
        messages = chunk.flatten()
        if not pa.types.is_struct(messages.type) or messages.null_count \
                or {"role", "content"} - {f.name for f in messages.type}:
            return False
        role, content = pc.struct_field(messages, "role"), pc.struct_field(messages, "content")
        if role.type not in text or content.type not in text or role.null_count or content.null_count \
                or not pc.all(pc.is_in(role, value_set=pa.array(ROLES))).as_py():
            return False
        # The conversations (by position in this chunk) that hold an assistant message: all of them.
        with_answer = pc.unique(pc.filter(pc.list_parent_indices(chunk), pc.equal(role, "assistant")))
        if len(with_answer) != len(chunk):
            return False
    return True


def _message_problems(messages: list) -> list[str]:
    problems = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("content"), str) \
                or message.get("role") not in ROLES:
            problems.append(f"message {i} needs role (system/user/assistant/tool) and string content")
    if not any(isinstance(m, dict) and m.get("role") == "assistant" for m in messages):
        problems.append("no assistant message to learn from")
    return problems


def _kind_name(kind: type | tuple) -> str:
    names = {str: "a string", int: "an integer", list: "a list"}
    kinds = kind if isinstance(kind, tuple) else (kind,)
    return " or ".join(names[k] for k in kinds)


# Labels

def resolve_labels(config: Config, train: Rows, eval_rows: Rows | None) -> tuple[list[str], list[str]]:
    """Class names in id order (given, or inferred from train) and every mismatch between them and the data, each
    with counts and first rows. Labels that are not a string or an integer are bad rows, reported by row_problems."""
    name = config.data.fields.label
    train_labels = _count_labels(train, name)
    eval_labels = _count_labels(eval_rows, name) if eval_rows is not None else None
    if not train_labels.counts:  # no usable label at all: row_problems names the rows
        return [], []
    declared = config.data.label_names
    values = set(train_labels.counts) | set(eval_labels.counts if eval_labels else ())
    if declared is None and {type(v) for v in values} == {int, str}:
        return [], [f"data.train: field '{name}' mixes integers and strings; use one kind, or set data.label_names"]
    label_names = declared if declared is not None else _inferred_names(train_labels, config.model.num_labels)
    problems = []
    num_labels = config.model.num_labels
    if num_labels is not None and num_labels != len(label_names):
        problems.append(f"model.num_labels: {num_labels}, but the labels give {len(label_names)} classes "
                        f"({train_labels.listed(train)}); fix num_labels or data.label_names")
    if len(label_names) < 2:
        where = "data.label_names" if declared is not None else "data.train"
        problems.append(f"{where}: only one class ({train_labels.listed(train)}); classification needs two or more "
                        f"(is data.fields.label the right column?)")
    outside = "data.label_names" if declared is not None else f"ids 0..{len(label_names) - 1}"
    unknown = train_labels.outside(label_names)
    if unknown.counts:
        problems.append(f"data.train: labels outside {outside}: {unknown.listed(train)}; fix the data or "
                        f"data.label_names")
    unknown = eval_labels.outside(label_names) if eval_labels else None
    if unknown and unknown.counts:
        if declared is None and all(isinstance(v, str) for v in unknown.counts):
            problems.append(f"data.eval: labels not seen in data.train: {unknown.listed(eval_rows)}; the model "
                            f"cannot learn them: add training examples or fix the labels")
        else:
            problems.append(f"data.eval: labels outside {outside}: {unknown.listed(eval_rows)}; fix the data or "
                            f"data.label_names")
    seen = {class_id(value, label_names) for value in train_labels.counts}
    missing = [label for i, label in enumerate(label_names) if i not in seen]
    if missing and len(label_names) >= 2:
        given = "declared in data.label_names" if declared is not None else \
            f"model.num_labels {num_labels}" if num_labels else f"integer labels run up to {len(label_names) - 1}"
        problems.append(f"data.train: no examples of class {', '.join(map(repr, missing))} ({given}); the model "
                        f"cannot learn a class it never sees: add examples or drop the class")
    return label_names, problems


@dataclass
class LabelCounts:
    """How often each label value occurs, and the row it first occurs in."""
    counts: Counter = field(default_factory=Counter)
    first: dict[Any, int] = field(default_factory=dict)

    def listed(self, rows: Rows) -> str:
        values = self.counts.most_common()
        shown = ", ".join(f"{v!r} ×{n} (first {rows.where(self.first[v])})" for v, n in values[:MAX_LABELS_SHOWN])
        return shown + (f", and {len(values) - MAX_LABELS_SHOWN} more" if len(values) > MAX_LABELS_SHOWN else "")

    def outside(self, label_names: list[str]) -> "LabelCounts":
        unknown = [v for v in self.counts if class_id(v, label_names) is None]
        return LabelCounts(Counter({v: self.counts[v] for v in unknown}), {v: self.first[v] for v in unknown})


def _count_labels(rows: Rows, name: str) -> LabelCounts:
    labels = LabelCounts()
    for index, record in iter_records(rows, [name]):
        value = record.get(name)
        if isinstance(value, (str, int)) and not isinstance(value, bool) and value != "":
            labels.counts[value] += 1
            labels.first.setdefault(value, index)
    return labels


def _inferred_names(labels: LabelCounts, num_labels: int | None) -> list[str]:
    """Integer labels are class ids; strings are names, sorted (by number when every one is an integer, as CSV
    files give them: "2" before "10")."""
    values = list(labels.counts)
    if values and all(isinstance(v, int) for v in values):
        return [str(i) for i in range(num_labels or max(values) + 1)]
    if all(INTEGER.fullmatch(v) for v in values):
        return sorted(values, key=lambda v: (int(v), v))
    return sorted(values)


# Duplicates and the eval split

def duplicate_free(rows: Rows, columns: list[str]) -> tuple[Rows, int]:
    """Keep the first of each set of identical examples (same values in `columns`); return them and the count
    removed. One 128-bit hash per row in a numpy array: no Python set of the whole dataset."""
    import hashlib
    import json

    import numpy as np

    hashes = np.empty((len(rows), 2), dtype=np.uint64)
    for index, record in iter_records(rows, columns):
        digest = hashlib.blake2b(json.dumps(record, sort_keys=True, default=str).encode(), digest_size=16).digest()
        hashes[index] = np.frombuffer(digest, dtype=np.uint64)
    _, first = np.unique(hashes, axis=0, return_index=True)
    removed = len(rows) - len(first)
    return (rows.select(np.sort(first)) if removed else rows), removed


def split_eval(rows: Rows, fraction: float, seed: int) -> tuple[Rows, Rows]:
    """Deterministic held-out split: the same seed and data always give the same eval examples."""
    train, held_out = eval_split_rows(len(rows), fraction, seed)
    return rows.select(train), rows.select(held_out)


def eval_split_rows(count: int, fraction: float, seed: int) -> tuple[Any, Any]:
    """(train row numbers, eval row numbers), each sorted: the split_eval of `count` rows."""
    import numpy as np

    order = np.random.default_rng(seed).permutation(count)
    n_eval = max(1, round(count * fraction))
    if n_eval >= count:
        raise UserError(f"data.eval_fraction: {fraction} of {count} examples leaves none to train on")
    return np.sort(order[n_eval:]), np.sort(order[:n_eval])
