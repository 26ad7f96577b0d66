"""Validate rows per format, streaming over the Arrow data: every problem counted, the first few shown with
file:line, all in one line; then labels, duplicates and the held-out eval split."""
import json
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Iterator

from sft.config import Config, Fields
from sft.data.formats import REASONING_KEYS, chat_format, class_id, standard_message
from sft.data.sources import Rows
from sft.errors import UserError

MAX_PROBLEMS_SHOWN = 3
MAX_LABELS_SHOWN = 5
INTEGER = re.compile(r"[+-]?\d+")
BATCH_ROWS = 1000  # rows turned into Python objects at a time: memory stays flat however large the data
# Roles whose messages are complete as {role, content}: a tool result needs a tool call, checked row by row.
TEXT_ROLES = ("system", "user", "assistant")
SHAREGPT_COLUMN = "conversations"  # ShareGPT's column name, read as data.fields.messages when that is absent


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
    if fields.messages in columns or SHAREGPT_COLUMN in columns:
        return "messages"
    if {fields.prompt, fields.completion} <= columns:
        return "prompt_completion"
    if {fields.instruction, fields.output} <= columns:
        return "instruction"
    if fields.text in columns:
        return "text"
    first = f" ({rows.where(0)})" if len(rows) else ""
    raise UserError(f"data.format: cannot tell the format from columns {sorted(columns)}{first}; "
                    f"expected {fields.messages} (or {SHAREGPT_COLUMN}), {fields.prompt}+{fields.completion}, "
                    f"{fields.instruction}+{fields.output} or {fields.text}, or set data.fields / data.format")


def describe_format(data_format: str, rows: Rows, config: Config) -> str:
    """The detected format and how columns (and, for chats, the message keys and roles of the first rows) are read:
    what `sft check` and `sft prepare` show."""
    fields, columns = config.data.fields, rows.dataset.column_names
    if data_format != "messages":
        return f"{data_format} (columns {', '.join(c for c in format_columns(data_format, fields) if c in columns)})"
    column = fields.messages if fields.messages in columns else SHAREGPT_COLUMN
    roles, names, sharegpt = chat_format(config).roles, Counter(), False
    for _, record in zip(range(BATCH_ROWS), iter_records(rows, [column])):
        for message in record[1][column] if isinstance(record[1][column], list) else []:
            if isinstance(message, dict):
                from_value = "from" in message and "role" not in message
                sharegpt |= from_value
                names[message.get("from") if from_value else message.get("role")] += 1
    shape = "ShareGPT (from/value)" if sharegpt else "OpenAI messages (role/content)"
    mapped = ", ".join(f"{name} → {roles[name].replace('tool_call', 'assistant tool call')}" if roles[name] != name
                       else str(name) for name in names if name in roles)
    tools = f"; tools from column '{fields.tools}'" if fields.tools in columns else ""
    renamed = " (read as data.fields.messages)" if column != fields.messages else ""
    return f"messages: {shape} in column '{column}'{renamed}; roles {mapped or 'none found'}{tools}"


def format_columns(data_format: str, fields: Fields) -> list[str]:
    """The columns a format reads (all others are dropped before tokenization)."""
    return {"classification": [fields.text, fields.label] + ([fields.text_pair] if fields.text_pair else []),
            "messages": [fields.messages, fields.tools], "prompt_completion": [fields.prompt, fields.completion],
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


def record_problems(record: dict, data_format: str, fields: Fields, roles: dict[str, str]) -> list[str]:
    """What is wrong with one row (empty when it is fine), without the location."""
    problems = []
    for name, kind in _required(data_format, fields):
        value = record.get(name)
        if value is None or value == "":
            problems.append(f"missing field '{name}'")
        elif not isinstance(value, kind) or isinstance(value, bool):
            problems.append(f"field '{name}' should be {_kind_name(kind)}, got {type(value).__name__}")
    if data_format == "messages" and isinstance(record.get(fields.messages), list):
        problems += _message_problems(record[fields.messages], roles)
        problems += _tools_problems(record.get(fields.tools), fields.tools)
    return problems


def row_problems(rows: Rows, data_format: str, config: Config, config_key: str) -> list[str]:
    """The bad rows of one source as one problem: every one counted, the first few shown with file:line."""
    fields, roles = config.data.fields, chat_format(config).roles
    if not len(rows):
        return [f"{config_key}: no examples found; check the file or query"]
    if _clean_by_arrow(rows.dataset, data_format, fields):
        return []
    count, shown = 0, []
    for index, record in iter_records(rows, format_columns(data_format, fields)):
        problems = record_problems(record, data_format, fields, roles)
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
    if data_format == "messages" and fields.tools in dataset.column_names \
            and dataset.data.column(fields.tools).null_count < len(dataset):
        return False  # tool schemas: checked row by row
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
        # Only {role, content}: weights, tool calls and ShareGPT keys are checked row by row.
        if not pa.types.is_struct(messages.type) or messages.null_count \
                or {f.name for f in messages.type} != {"role", "content"}:
            return False
        role, content = pc.struct_field(messages, "role"), pc.struct_field(messages, "content")
        if role.type not in text or content.type not in text or role.null_count or content.null_count \
                or not pc.all(pc.is_in(role, value_set=pa.array(TEXT_ROLES))).as_py():
            return False
        # The conversations (by position in this chunk) that hold an assistant message: all of them.
        with_answer = pc.unique(pc.filter(pc.list_parent_indices(chunk), pc.equal(role, "assistant")))
        if len(with_answer) != len(chunk):
            return False
    return True


def _message_problems(conversation: list, roles: dict[str, str]) -> list[str]:
    """The shapes chat data comes in (OpenAI messages with tool calls and weights, ShareGPT): what is wrong."""
    problems, messages = [], []
    for i, message in enumerate(conversation):
        try:
            message = standard_message(message, roles) if isinstance(message, dict) else None
        except ValueError as error:
            problems.append(f"message {i}: {error}; name its role in data.fields.roles (system, user, assistant, "
                            f"tool or tool_call)" if "role" in str(error) else f"message {i}: {error}")
            continue
        if message is None:
            problems.append(f"message {i} needs role (system/user/assistant/tool) and string content")
            continue
        problems += [f"message {i}: {problem}" for problem in _one_message_problems(message, messages)]
        messages.append(message)
    answers = [m for m in messages if m["role"] == "assistant"]
    if not answers and len(messages) == len(conversation):
        problems.append("no assistant message to learn from")
    elif answers and all(m.get("weight") == 0 for m in answers):
        problems.append("every assistant message has weight 0: nothing to learn from")
    return problems


def _one_message_problems(message: dict, earlier: list[dict]) -> list[str]:
    role, content, calls = message["role"], message.get("content"), message.get("tool_calls")
    problems = []
    if calls is not None:
        if role != "assistant":
            problems.append(f"tool_calls on a {role} message (only assistant messages call tools)")
        elif not isinstance(calls, list) or not calls:
            problems.append("tool_calls should be a list of {type, function: {name, arguments}}")
        else:
            for j, call in enumerate(calls):
                function = call.get("function") if isinstance(call, dict) else None
                if not isinstance(function, dict) or not isinstance(function.get("name"), str) \
                        or not function["name"]:
                    problems.append(f"tool_calls[{j}] has no function name (expected {{type: function, function: "
                                    f"{{name, arguments}}}})")
    if not isinstance(content, str) and not (role == "assistant" and calls and content is None):
        problems.append(f"{role} message needs string content" + (" (null only with tool_calls)"
                                                                   if role == "assistant" else ""))
    if role == "tool" and not any(m.get("tool_calls") for m in earlier):
        problems.append("a tool result with no tool call before it")
    weight = message.get("weight")
    if weight is not None and (role != "assistant" or weight not in (0, 1) or isinstance(weight, bool)):
        problems.append(f"weight {weight!r} on a {role} message; weight is 0 or 1, on assistant messages only")
    for key in REASONING_KEYS:
        if message.get(key) is not None and not isinstance(message[key], str):
            problems.append(f"{key} should be a string, got {type(message[key]).__name__}")
    return problems


def _tools_problems(value, name: str) -> list[str]:
    """A row's tool schemas: a list of objects, or a JSON string of one."""
    if value is None or value == "":
        return []
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as error:
            return [f"field '{name}' is not valid JSON ({error.msg} at column {error.colno})"]
    if not isinstance(value, list) or not all(isinstance(schema, dict) for schema in value):
        return [f"field '{name}' should be a list of function schemas (or a JSON string of one)"]
    return []


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
