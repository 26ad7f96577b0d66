"""Data stage: every source, file:line errors, labels, the eval split, and token-by-token masks per format."""
import codecs
import json
import sqlite3
from dataclasses import replace

import pytest
from conftest import CHAT_TEMPLATE, build_tiny_tokenizer, write_jsonl

from sft.config import Config
from sft.data import (IGNORE_INDEX, group_by_tokens, load_rows, read_source, split_eval, tokenize_classification,
                      tokenize_instruction, tokenize_messages, tokenize_prompt_completion, tokenize_rows, tokenize_text)
from sft.data.formats import render_chats
from sft.errors import UserError

ROWS = [{"text": f"review {i}", "label": "pos" if i % 3 else "neg"} for i in range(30)]


def make_config(train, task="classification", **data) -> Config:
    return Config.model_validate({"task": task, "model": {"name": "m"}, "data": {"train": train, **data}})


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return build_tiny_tokenizer(tmp_path_factory.mktemp("tok"))


# Sources

def test_jsonl_csv_json_parquet_and_saved_dataset_read_the_same_rows(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    from datasets import Dataset, DatasetDict

    write_jsonl(tmp_path / "a.jsonl", ROWS)
    (tmp_path / "a.json").write_text(json.dumps(ROWS))
    (tmp_path / "a.csv").write_text("text,label\n" + "".join(f"{r['text']},{r['label']}\n" for r in ROWS))
    pq.write_table(pa.Table.from_pylist(ROWS), tmp_path / "a.parquet")
    DatasetDict({"train": Dataset.from_list(ROWS)}).save_to_disk(str(tmp_path / "saved"))
    for source in ("a.jsonl", "a.json", "a.csv", "a.parquet", "saved"):
        rows = read_source(str(tmp_path / source), "data.train", tmp_path)
        assert rows.dataset.to_list() == ROWS, source
        assert len(rows.files) == 1 and rows.files[0].rows == 30 and len(rows.files[0].sha256) == 64


def test_several_files_concatenate_and_keep_their_line_numbers(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", ROWS[:2])
    write_jsonl(tmp_path / "b.jsonl", ROWS[2:5])
    rows = read_source([str(tmp_path / "a.jsonl"), str(tmp_path / "b.jsonl")], "data.train", tmp_path)
    assert len(rows) == 5 and rows.where(2) == f"{tmp_path / 'b.jsonl'}:1"


def test_sqlite_query_reads_rows_without_writing(tmp_path):
    from sft.config import SQLSource

    db = tmp_path / "labels.db"
    with sqlite3.connect(db) as connection:
        connection.execute("CREATE TABLE reviews (body TEXT, verdict TEXT)")
        connection.executemany("INSERT INTO reviews VALUES (?, ?)", [(r["text"], r["label"]) for r in ROWS])
    db.chmod(0o444)  # read-only data directory, as bound into the container
    rows = read_source(SQLSource(database=f"sqlite:///{db}",
                                 query="SELECT body AS text, verdict AS label FROM reviews ORDER BY rowid"), "data.train", tmp_path)
    assert rows.dataset.to_list() == ROWS and rows.files[0].rows == 30
    with pytest.raises(UserError, match=r"data.train.query: no such column: nope"):
        read_source(SQLSource(database=f"sqlite:///{db}", query="SELECT nope FROM reviews"), "data.train", tmp_path)


def test_a_sqlite_query_past_its_timeout_is_cancelled_in_one_line(tmp_path):
    from sft.config import SQLSource

    db = tmp_path / "empty.db"
    sqlite3.connect(db).close()
    # Counts to 200 million: tens of seconds, unless the 1 s timeout interrupts it.
    slow = "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 200000000) " \
           "SELECT count(*) AS text FROM n"
    with pytest.raises(UserError, match=rf"^data.train.query: cancelled after 1 s \(statement timeout\) on {db}; make "
                                        r"the query cheaper or raise data.train.timeout$"):
        read_source(SQLSource(database=f"sqlite:///{db}", query=slow, timeout=1), "data.train", tmp_path)


def test_a_malformed_database_url_is_one_line_naming_the_key(tmp_path):
    from sft.config import SQLSource

    with pytest.raises(UserError, match=r"^data.eval.database: postgresql://ann:\*\*\*@db.example.org:5432x/corpus is "
                                        r"not a valid database URL \(.*'5432x'\); write postgresql://"):
        read_source(SQLSource(database="postgresql://ann:hunter2@db.example.org:5432x/corpus", query="SELECT 1"),
                    "data.eval", tmp_path)


def test_saved_dataset_dict_needs_an_existing_split(tmp_path):
    from datasets import Dataset, DatasetDict

    from sft.config import FileSource

    DatasetDict({"train": Dataset.from_list(ROWS), "test": Dataset.from_list(ROWS[:3])}).save_to_disk(str(tmp_path / "d"))
    assert len(read_source(FileSource(path=str(tmp_path / "d"), split="test"), "data.eval", tmp_path)) == 3
    with pytest.raises(UserError, match=r"data.eval: .* has splits train, test, not 'validation'"):
        read_source(str(tmp_path / "d"), "data.eval", tmp_path, default_split="validation")


@pytest.mark.parametrize("content, expected", [
    ('{"text": "a", "label": "pos"}\n{"text": "b", "label": \n', r"bad.jsonl:2: invalid JSON"),
    ('{"text": "a", "label": "pos"}\n["not", "an", "object"]\n', r"bad.jsonl:2: expected a JSON object"),
])
def test_malformed_jsonl_names_file_and_line(tmp_path, content, expected):
    (tmp_path / "bad.jsonl").write_text(content)
    with pytest.raises(UserError, match=expected):
        read_source(str(tmp_path / "bad.jsonl"), "data.train", tmp_path)


def _as_text(kind: str, rows: list[dict]) -> str:
    if kind == "jsonl":
        return "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    return "text,label\n" + "".join(f"{row['text']},{row.get('label', '')}\n" for row in rows)


# Files as spreadsheets, Windows tools and old Macs write them: byte-order marks, UTF-16, CRLF and CR line ends.
SAVED_AS = {"utf8-bom": lambda text: codecs.BOM_UTF8 + text.encode(), "utf16": lambda text: text.encode("utf-16"),
            "utf16-be": lambda text: codecs.BOM_UTF16_BE + text.encode("utf-16-be"),
            "crlf": lambda text: text.replace("\n", "\r\n").encode(), "cr": lambda text: text.replace("\n", "\r").encode()}


@pytest.mark.parametrize("kind", ["jsonl", "csv"])
@pytest.mark.parametrize("saved_as", SAVED_AS)
def test_files_saved_by_other_tools_read_the_same_rows_and_lines(tmp_path, kind, saved_as):
    rows = [{"text": f"café {i}", "label": "pos" if i % 2 else "neg"} for i in range(6)]
    path = tmp_path / f"a.{kind}"
    path.write_bytes(SAVED_AS[saved_as](_as_text(kind, rows)))
    assert read_source(str(path), "data.train", tmp_path).dataset.to_list() == rows
    rows[2] = {"text": "no label"}  # file line 3 (jsonl) or 4 (csv, after the header)
    path.write_bytes(SAVED_AS[saved_as](_as_text(kind, rows)))
    with pytest.raises(UserError, match=rf"a.{kind}:{3 if kind == 'jsonl' else 4}: missing field 'label'"):
        load_rows(make_config(str(path), eval_fraction=0), tmp_path)


@pytest.mark.parametrize("kind", ["jsonl", "csv"])
def test_a_byte_that_is_not_utf8_is_reported_at_its_line_with_the_fix(tmp_path, kind):
    rows = [{"text": f"review {i}", "label": "pos"} for i in range(5)]
    text = _as_text(kind, rows).replace("review 3", "caf\u00e9 3")
    path = tmp_path / f"a.{kind}"
    path.write_bytes(text.encode("cp1252"))
    line = 4 if kind == "jsonl" else 5
    with pytest.raises(UserError, match=rf"a.{kind}:{line}: byte 0xE9 .* is not UTF-8 .* iconv -f cp1252 -t utf-8"):
        read_source(str(path), "data.train", tmp_path)
    path.write_bytes(text.replace("\n", "\r").encode("cp1252"))  # old Mac line ends count too
    with pytest.raises(UserError, match=rf"a.{kind}:{line}: byte 0xE9"):
        read_source(str(path), "data.train", tmp_path)


def test_a_cut_off_json_line_is_reported_at_its_real_column(tmp_path):
    good = json.dumps(ROWS[0])
    for cut_off in ('{"text": "abc", "label": ', '{"text": "abc", "label": "po'):
        (tmp_path / "a.jsonl").write_text(f"{good}\n{cut_off}\n{good}\n")
        with pytest.raises(UserError) as error:
            read_source(str(tmp_path / "a.jsonl"), "data.train", tmp_path)
        # Column 26: where the value is missing or the cut-off string starts (1-based), not column 1 of the next line.
        assert "a.jsonl:2: invalid JSON" in str(error.value) and "at column 26" in str(error.value)
        assert "the line ends before the object does" in str(error.value)


def test_missing_files_and_unknown_types_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="data.train: .*nope.jsonl does not exist"):
        read_source(str(tmp_path / "nope.jsonl"), "data.train", tmp_path)
    (tmp_path / "x.txt").write_text("hi")
    with pytest.raises(UserError, match="unsupported file type"):
        read_source(str(tmp_path / "x.txt"), "data.train", tmp_path)


def test_missing_fields_and_wrong_types_are_listed_with_lines(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", [{"text": "ok", "label": "pos"}, {"text": "no label"}, {"text": 3, "label": "neg"}])
    with pytest.raises(UserError) as error:
        load_rows(make_config(str(tmp_path / "a.jsonl"), eval_fraction=0), tmp_path)
    message = str(error.value)
    assert "2 bad example(s)" in message and "\n" not in message
    assert f"{tmp_path / 'a.jsonl'}:2: missing field 'label'" in message
    assert f"{tmp_path / 'a.jsonl'}:3: field 'text' should be a string, got int" in message


CLEAN_ROWS = {  # case: (format, rows)
    "class names": ("classification", [{"text": "good", "label": "pos"}, {"text": "bad", "label": "neg"}]),
    "class ids": ("classification", [{"text": "good", "label": 1}, {"text": "bad", "label": 0}]),
    "messages": ("messages", [{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": ""}]}]),
    "prompt_completion": ("prompt_completion", [{"prompt": "p", "completion": "c"}]),
    "instruction": ("instruction", [{"instruction": "i", "output": "o"}]),
    "text": ("text", [{"text": "t"}]),
}
# Each breaks one rule; the vectorised check must leave them to the row-by-row one, which names the row.
BAD_MESSAGES = [
    ([{"role": "user", "content": "q"}], "no assistant message to learn from"),
    ([{"role": "robot", "content": "q"}, {"role": "assistant", "content": "a"}],
     "message 0: unknown role 'robot'; name its role in data.fields.roles"),
    ([{"role": "user", "content": None}, {"role": "assistant", "content": "a"}], "message 0: user message needs string content"),
    ([], "no assistant message to learn from"),
]


@pytest.mark.parametrize("case", sorted(CLEAN_ROWS))
def test_clean_data_is_validated_by_arrow_without_a_python_pass(tmp_path, monkeypatch, case):
    from sft.data import validation

    data_format, rows = CLEAN_ROWS[case][0], CLEAN_ROWS[case][1] * 3
    write_jsonl(tmp_path / "a.jsonl", rows)
    config = make_config(str(tmp_path / "a.jsonl"), task="classification" if data_format == "classification"
                         else "causal_lm", eval_fraction=0)
    source = read_source(config.data.train, "data.train", tmp_path)
    assert validation.row_problems(source, data_format, config, "data.train") == []
    monkeypatch.setattr(validation, "record_problems", lambda *args: pytest.fail("validated row by row"))
    assert validation.row_problems(source, data_format, config, "data.train") == []
    # Contiguous slices (a sliced Arrow table, no row selection) go through the vectorised check too.
    sliced = replace(source, dataset=source.dataset.select(range(1, len(rows))))
    assert validation.row_problems(sliced, data_format, config, "data.train") == []


@pytest.mark.parametrize("messages, problem", BAD_MESSAGES)
def test_bad_conversations_in_a_later_file_are_found_at_their_line(tmp_path, messages, problem):
    good = CLEAN_ROWS["messages"][1] * 2
    write_jsonl(tmp_path / "a.jsonl", good)
    write_jsonl(tmp_path / "b.jsonl", good + [{"messages": messages}] + good)
    config = make_config([str(tmp_path / "a.jsonl"), str(tmp_path / "b.jsonl")], task="causal_lm", eval_fraction=0)
    with pytest.raises(UserError) as error:
        load_rows(config, tmp_path)
    assert f"b.jsonl:3: {problem}" in str(error.value)


# Labels

def test_string_labels_are_inferred_sorted_and_checked_against_num_labels(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", ROWS)
    loaded = load_rows(make_config(str(tmp_path / "a.jsonl")), tmp_path)
    assert loaded.label_names == ["neg", "pos"]
    with pytest.raises(UserError, match=r"model.num_labels: 3, but the labels give 2 classes"):
        load_rows(Config.model_validate({"task": "classification", "model": {"name": "m", "num_labels": 3},
                                         "data": {"train": str(tmp_path / "a.jsonl")}}), tmp_path)


def test_labels_outside_the_declared_set_list_values_counts_and_first_lines(tmp_path):
    rows = ROWS + [{"text": "meh", "label": "neutral"}, {"text": "so so", "label": "neutral"}]
    write_jsonl(tmp_path / "a.jsonl", rows)
    with pytest.raises(UserError) as error:
        load_rows(make_config(str(tmp_path / "a.jsonl"), label_names=["neg", "pos"], eval_fraction=0), tmp_path)
    assert f"'neutral' ×2 (first {tmp_path / 'a.jsonl'}:31)" in str(error.value)


def test_integer_labels_from_csv_are_sorted_by_number(tmp_path):
    (tmp_path / "a.csv").write_text("text,label\n" + "".join(f"t{i},{label}\n" for i, label in
                                                             enumerate(["10", "2", "1", "2", "10", "1"])))
    loaded = load_rows(make_config(str(tmp_path / "a.csv"), eval_fraction=0), tmp_path)
    assert loaded.label_names == ["1", "2", "10"]


def test_integer_labels_from_csv_are_class_ids_as_in_jsonl(tmp_path, tokenizer):
    """0/1 with data.label_names: JSONL gives integers, CSV the same digits as text; both are class ids."""
    from sft.data.formats import tokenize_record
    from sft.data.validation import iter_records

    rows = [{"text": f"review {i}", "label": i % 2} for i in range(30)]
    write_jsonl(tmp_path / "a.jsonl", rows)
    (tmp_path / "a.csv").write_text("text,label\n" + "".join(f"{r['text']},{r['label']}\n" for r in rows))
    label_ids = {}
    for name in ("a.jsonl", "a.csv"):
        config = make_config(str(tmp_path / name), label_names=["neg", "pos"], eval_fraction=0)
        loaded = load_rows(config, tmp_path)
        assert loaded.label_names == ["neg", "pos"]
        label_ids[name] = [tokenize_record(record, "classification", config.data.fields, tokenizer, loaded.label_names,
                                           64)[0]["labels"] for _, record in iter_records(loaded.train)]
    assert label_ids["a.csv"] == label_ids["a.jsonl"] == [row["label"] for row in rows]


def label_problems(tmp_path, train: list[dict], eval_rows: list[dict] | None = None, **settings) -> str:
    write_jsonl(tmp_path / "train.jsonl", train)
    data = {"eval_fraction": 0, **settings.pop("data", {})}
    if eval_rows is not None:
        data["eval"] = str(write_jsonl(tmp_path / "eval.jsonl", eval_rows))
    config = Config.model_validate({"task": "classification", "model": {"name": "m", **settings},
                                    "data": {"train": str(tmp_path / "train.jsonl"), **data}})
    with pytest.raises(UserError) as error:
        load_rows(config, tmp_path)
    assert "\n" not in str(error.value)
    return str(error.value)


def test_label_mismatches_come_with_counts_and_first_rows(tmp_path):
    train = [{"text": f"t{i}", "label": "pos" if i % 2 else "neg"} for i in range(6)]
    path = tmp_path / "train.jsonl"
    message = label_problems(tmp_path, train, data={"label_names": ["neg", "neutral", "pos"]})
    assert message == ("data.train: no examples of class 'neutral' (declared in data.label_names); the model cannot "
                       "learn a class it never sees: add examples or drop the class")
    message = label_problems(tmp_path, train, [{"text": "e", "label": "pos"}, {"text": "e", "label": "meh"}] * 2)
    assert message == (f"data.eval: labels not seen in data.train: 'meh' ×2 (first {tmp_path / 'eval.jsonl'}:2); "
                       f"the model cannot learn them: add training examples or fix the labels")
    message = label_problems(tmp_path, [{"text": "t", "label": "pos"}] * 3)
    assert message.startswith(f"data.train: only one class ('pos' ×3 (first {path}:1)); classification needs two")
    message = label_problems(tmp_path, train, num_labels=3)
    assert message.startswith(f"model.num_labels: 3, but the labels give 2 classes ('neg' ×3 (first {path}:1), "
                              f"'pos' ×3 (first {path}:2))")
    integer_ids = [{"text": "a", "label": 0}, {"text": "b", "label": 2}, {"text": "c", "label": 2}]
    assert "data.train: no examples of class '1' (integer labels run up to 2)" in label_problems(tmp_path, integer_ids)


def test_label_problems_are_reported_together_with_bad_rows(tmp_path):
    train = [{"text": "a", "label": "neg"}, {"text": "b"}, {"text": "c", "label": "pos"}, {"text": "d", "label": "meh"}]
    message = label_problems(tmp_path, train, data={"label_names": ["neg", "pos"]})
    path = tmp_path / "train.jsonl"
    assert message == (f"data.train: 1 bad example(s): {path}:2: missing field 'label'; data.train: labels outside "
                       f"data.label_names: 'meh' ×1 (first {path}:4); fix the data or data.label_names")


def test_eval_fraction_split_is_deterministic_by_seed(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", ROWS)
    rows = read_source(str(tmp_path / "a.jsonl"), "data.train", tmp_path)
    first_train, first_eval = split_eval(rows, 0.2, seed=42)
    again_train, again_eval = split_eval(rows, 0.2, seed=42)
    _, other_eval = split_eval(rows, 0.2, seed=7)
    texts = {name: rows.dataset["text"] for name, rows in
             (("first", first_eval), ("again", again_eval), ("other", other_eval), ("train", first_train))}
    assert texts["first"] == texts["again"] and len(texts["first"]) == 6
    assert len(texts["train"]) == 24 and texts["other"] != texts["first"]
    assert not set(texts["first"]) & set(texts["train"])


# Token ids and labels, token by token

def test_prompt_completion_masks_exactly_the_prompt(tokenizer):
    prompt_ids = tokenizer("add 2 and 3 :")["input_ids"]
    answer_ids = tokenizer(" five", add_special_tokens=False)["input_ids"]
    example = tokenize_prompt_completion(tokenizer, "add 2 and 3 :", " five", max_length=64)
    assert example["input_ids"] == prompt_ids + answer_ids + [tokenizer.eos_token_id]
    assert example["labels"] == [IGNORE_INDEX] * len(prompt_ids) + answer_ids + [tokenizer.eos_token_id]
    assert prompt_ids[0] == tokenizer.bos_token_id


def test_text_trains_on_every_token(tokenizer):
    example = tokenize_text(tokenizer, "the quick brown fox", max_length=64)
    assert example["labels"] == example["input_ids"] and example["input_ids"][-1] == tokenizer.eos_token_id


def test_chat_loss_covers_assistant_turns_and_their_end_tokens_only(tokenizer):
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "add 2 and 3"},
                {"role": "assistant", "content": "five"}, {"role": "user", "content": "and 4 ?"},
                {"role": "assistant", "content": "seven"}]
    example = tokenize_messages(tokenizer, messages, max_length=256)
    learned = tokenizer.decode([t for t, label in zip(example["input_ids"], example["labels"]) if label != IGNORE_INDEX])
    assert learned == "five<|im_end|>\nseven<|im_end|>\n"
    assert example["input_ids"] == tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"]
    for token, label in zip(example["input_ids"], example["labels"]):
        assert label in (IGNORE_INDEX, token)


def test_answer_boundaries_match_a_bisect_over_every_offset(tokenizer):
    """The Rust lookups that find where an answer starts and ends agree with the plain bisect over the token offsets
    at every character: inside tokens, at multi-byte characters split over several tokens, at the text's end."""
    from bisect import bisect_left

    from sft.data.formats import _first_token_from

    for text in ["add 2 and 3<|im_end|>\nfive", "héllo  wörld 日本語 é\n\n z", "x", "  lead and trail  "]:
        encoding = tokenizer.backend_tokenizer.encode(text, add_special_tokens=False)
        for char in range(len(text) + 1):
            assert _first_token_from(encoding, char, len(text)) == bisect_left(encoding.offsets, (char,)), (text, char)


def test_chat_masking_ignores_truncation_set_in_the_tokenizer_file(tmp_path):
    """Masking reads the Rust tokenizer directly unless it truncates or pads (as a tokenizer.json may say), where
    tokenizer(...) would switch that off: the ids stay those of apply_chat_template either way."""
    tokenizer = build_tiny_tokenizer(tmp_path)
    messages = [{"role": "user", "content": "add 2 and 3 " * 4}, {"role": "assistant", "content": "five"}]
    plain = tokenize_messages(tokenizer, messages, max_length=None)
    tokenizer.backend_tokenizer.enable_truncation(8)
    truncating = tokenize_messages(tokenizer, messages, max_length=None)
    assert truncating == plain and len(plain["input_ids"]) > 8
    assert plain["input_ids"] == tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"]


def test_chat_rendering_equals_apply_chat_template_on_rows_read_from_arrow(tmp_path):
    """render_chats skips apply_chat_template's message copy; a null field read from Arrow is None, and the template
    must see it as undefined, as apply_chat_template shows it."""
    template = CHAT_TEMPLATE.replace("{{ m['role'] }}", "{{ m['role'] }}{% if m.name is defined %} ({{ m.name }}){% endif %}")
    tokenizer = build_tiny_tokenizer(tmp_path, chat_template=template)
    turns = [("system", "be brief", None), ("user", "add 2 and 3", "ann"), ("assistant", "five", None),
             ("user", "and 4 ?", None), ("assistant", "seven", None), ("user", "and 5 ?", "bo")]
    messages = [{"role": role, "content": content, "name": name} for role, content, name in turns]
    rows = [{"messages": messages[1:3]}, {"messages": messages}]
    write_jsonl(tmp_path / "a.jsonl", rows)
    config = make_config(str(tmp_path / "a.jsonl"), task="causal_lm", eval_fraction=0)
    conversations = load_rows(config, tmp_path).train.dataset[:]["messages"]  # a batch, as the map gets it
    assert conversations[0][1]["name"] is None
    for generation_prompt in (False, True):
        rendered = render_chats(tokenizer, conversations, generation_prompt)
        assert rendered == tokenizer.apply_chat_template(conversations, tokenize=False,
                                                         add_generation_prompt=generation_prompt)
        assert "user (ann)" in rendered[0] and "None" not in "".join(rendered)


def test_chat_templates_with_generation_markers_use_the_assistant_mask(tmp_path):
    marked = CHAT_TEMPLATE.replace("{{ m['content'] }}<|im_end|>\n",
                                   "{% if m['role'] == 'assistant' %}{% generation %}{{ m['content'] }}<|im_end|>\n"
                                   "{% endgeneration %}{% else %}{{ m['content'] }}<|im_end|>\n{% endif %}")
    tokenizer = build_tiny_tokenizer(tmp_path, chat_template=marked)
    messages = [{"role": "user", "content": "add 2 and 3"}, {"role": "assistant", "content": "five"}]
    example = tokenize_messages(tokenizer, messages, max_length=256)
    learned = tokenizer.decode([t for t, label in zip(example["input_ids"], example["labels"]) if label != IGNORE_INDEX])
    assert learned == "five<|im_end|>\n"


def test_instruction_uses_the_chat_template_when_there_is_one_else_alpaca(tokenizer, tmp_path):
    chat = tokenize_instruction(tokenizer, "add", "2 and 3", "five", max_length=256)
    expected = tokenize_messages(tokenizer, [{"role": "user", "content": "add\n\n2 and 3"},
                                             {"role": "assistant", "content": "five"}], max_length=256)
    assert chat == expected

    base = build_tiny_tokenizer(tmp_path, chat_template=None)
    alpaca = tokenize_instruction(base, "add", "", "five", max_length=256)
    prompt_length = len(base("### Instruction:\nadd\n\n### Response:\n")["input_ids"])
    assert alpaca["labels"][:prompt_length] == [IGNORE_INDEX] * prompt_length
    assert base.decode(alpaca["labels"][prompt_length:]) == "five</s>"


def test_classification_encodes_pairs_and_label_ids(tokenizer):
    """The second text's tokens follow the separator (this tokenizer's pair template: <s> A <s> B), also when
    truncation has to shorten the pair."""
    premise, hypothesis = (tokenizer(text, add_special_tokens=False)["input_ids"] for text in ("premise here",
                                                                                             "hypothesis"))
    bos = tokenizer.bos_token_id
    example = tokenize_classification(tokenizer, "premise here", "hypothesis", 1, max_length=64)
    assert example["labels"] == 1 and example["input_ids"] == [bos, *premise, bos, *hypothesis]
    truncated = tokenize_classification(tokenizer, "premise here", "hypothesis", 1, max_length=5)["input_ids"]
    separator = truncated.index(bos, 1)
    assert len(truncated) == 5 and truncated[1:separator] == premise[:separator - 1]
    assert truncated[separator + 1:] == hypothesis[:len(truncated) - separator - 1] and separator < 4


def test_examples_whose_answer_is_truncated_away_are_reported_and_skipped(tokenizer, tmp_path, caplog):
    long_prompt = "the quick brown fox jumps over the lazy dog " * 10
    rows = [{"prompt": long_prompt, "completion": "five"}, {"prompt": "add 2 and 3", "completion": "five"}]
    write_jsonl(tmp_path / "a.jsonl", rows)
    config = make_config(str(tmp_path / "a.jsonl"), task="causal_lm", max_length=16, eval_fraction=0)
    loaded = load_rows(config, tmp_path)
    examples, summary = tokenize_rows(loaded.train, "prompt_completion", config, tokenizer, None, "data.train", tmp_path)
    assert len(examples) == 1 and summary["dropped"] == {"no answer tokens left after truncation": 1}
    assert f"{tmp_path / 'a.jsonl'}:1" in caplog.text and "raise data.max_length" in caplog.text
    with pytest.raises(UserError, match="no answer tokens left after truncation"):
        tokenize_rows(loaded.train.select([0]), "prompt_completion", config, tokenizer, None, "data.train", tmp_path)


def test_format_is_detected_from_columns(tmp_path):
    cases = {"messages": {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]},
             "prompt_completion": {"prompt": "q", "completion": "a"},
             "instruction": {"instruction": "q", "input": "", "output": "a"}, "text": {"text": "plain"}}
    for expected, row in cases.items():
        write_jsonl(tmp_path / "a.jsonl", [row] * 3)
        assert load_rows(make_config(str(tmp_path / "a.jsonl"), task="causal_lm", eval_fraction=0), tmp_path).data_format == expected
    write_jsonl(tmp_path / "a.jsonl", [{"question": "q"}])
    with pytest.raises(UserError, match=r"cannot tell the format from columns \['question'\]"):
        load_rows(make_config(str(tmp_path / "a.jsonl"), task="causal_lm", eval_fraction=0), tmp_path)


def test_chat_rows_without_an_assistant_turn_are_rejected(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", [{"messages": [{"role": "user", "content": "q"}]}])
    with pytest.raises(UserError, match=r"a.jsonl:1: no assistant message to learn from"):
        load_rows(make_config(str(tmp_path / "a.jsonl"), task="causal_lm", eval_fraction=0), tmp_path)


def test_group_by_tokens_respects_the_budget_and_keeps_every_example():
    lengths = [5, 60, 33, 12, 64, 1, 30, 31, 2, 40]
    batches = group_by_tokens(lengths, 64)
    assert sorted(i for batch in batches for i in batch) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in batch) <= 64 for batch in batches)
    assert len(batches) == 5  # 278 tokens need at least 5 batches of 64


# Several sources in one run

def test_mixed_sources_map_fields_pick_rows_and_keep_their_locations(tmp_path):
    from datasets import Dataset

    write_jsonl(tmp_path / "a.jsonl", [{"q": f"jsonl {i}", "a": f"answer {i}"} for i in range(20)])
    db = tmp_path / "pairs.db"
    with sqlite3.connect(db) as connection:
        connection.execute("CREATE TABLE pairs (prompt TEXT, completion TEXT)")
        connection.executemany("INSERT INTO pairs VALUES (?, ?)", [(f"sql {i}", "" if i == 7 else f"ok {i}")
                                                                   for i in range(10)])
    Dataset.from_list([{"prompt": f"saved {i}", "completion": "x", "extra": i} for i in range(8)]).save_to_disk(
        str(tmp_path / "saved"))
    train = [{"path": str(tmp_path / "a.jsonl"), "fields": {"prompt": "q", "completion": "a"}, "max_rows": 5},
             {"database": f"sqlite:///{db}", "query": "SELECT * FROM pairs WHERE completion != '' ORDER BY rowid",
              "fraction": 0.5},
             str(tmp_path / "saved")]
    config = make_config(train, task="causal_lm", eval_fraction=0)
    loaded = load_rows(config, tmp_path)
    prompts = loaded.train.dataset["prompt"]
    assert len(loaded.train) == 5 + 4 + 8 and loaded.data_format == "prompt_completion"
    assert loaded.train.dataset.column_names == ["prompt", "completion"]
    assert sum(p.startswith("jsonl") for p in prompts) == 5 and sum(p.startswith("sql") for p in prompts) == 4
    assert loaded.dropped["not picked (max_rows/fraction)"] == 15 + 5
    # A picked row still points at its own line / query row.
    first_jsonl = int(prompts[0].split()[1])
    assert loaded.train.where(0) == f"{tmp_path / 'a.jsonl'}:{first_jsonl + 1}"
    assert loaded.train.where(16) == f"{tmp_path / 'saved'}: row 8"
    assert load_rows(config, tmp_path).train.dataset["prompt"] == prompts  # the pick is seeded
    other_seed = Config.model_validate({**config.model_dump(), "training": {"seed": 1}})
    assert load_rows(other_seed, tmp_path).train.dataset["prompt"] != prompts

    train[1]["query"] = "SELECT * FROM pairs ORDER BY rowid"
    train[1].pop("fraction")
    with pytest.raises(UserError, match=rf"data.train: 1 bad example\(s\): {db}: query row 8: missing field 'completion'"):
        load_rows(make_config(train, task="causal_lm", eval_fraction=0), tmp_path)
    train[0]["fields"] = {"prompt": "question", "completion": "a"}
    with pytest.raises(UserError, match=r"data.train.fields.prompt: no column 'question' in .*a.jsonl \(columns: q, a\)"):
        load_rows(make_config(train, task="causal_lm", eval_fraction=0), tmp_path)


def test_dedupe_removes_exact_duplicates_before_the_eval_split(tmp_path):
    rows = ROWS + ROWS[:10] + [{"text": "review 0", "label": "pos"}]  # the last differs in its label: kept
    write_jsonl(tmp_path / "a.jsonl", rows)
    loaded = load_rows(make_config(str(tmp_path / "a.jsonl"), dedupe=True, eval_fraction=0.2), tmp_path)
    assert loaded.dropped["exact duplicates"] == 10 and len(loaded.train) + len(loaded.eval) == 31
    kept = loaded.train.dataset.to_list() + loaded.eval.dataset.to_list()
    assert len({(r["text"], r["label"]) for r in kept}) == 31
