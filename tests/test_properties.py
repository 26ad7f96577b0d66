"""Property-based tests (hypothesis): random and mutated configs, overrides and data files never end in a traceback,
only in a valid result or a UserError. Derandomized (the same examples every run) and few enough to take seconds."""
import codecs
import json
import os
import re
import tempfile
from pathlib import Path
from unittest import mock

import pytest
import yaml
from conftest import REPO
from hypothesis import HealthCheck, event, given, settings, strategies as st

from sft.check.preflight import settings_problems
from sft.config import Config, load_config
from sft.errors import UserError

SETTINGS = settings(derandomize=True, database=None, deadline=None, suppress_health_check=[HealthCheck.too_slow])
SECTION_KEYS = {name: list(field.annotation.model_fields) for name, field in Config.model_fields.items()
                if isinstance(field.annotation, type) and hasattr(field.annotation, "model_fields")}
SHIPPED = [path.read_text() for path in sorted((REPO / "configs").glob("*.yaml"))]
ROWS = [{"text": f"review {i}", "label": "pos" if i % 2 else "neg"} for i in range(8)]

scalars = st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**6), st.floats(), st.text(max_size=12),
                    st.sampled_from(["no", "off", "yes", "1e-3", "${HOME}", "${NOPE}", "{config}-{date}", "auto",
                                     "lora", "full", "epoch", "steps", "cosine", "full_shard auto_wrap"]))
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
    st.text(max_size=6), inner, max_size=3), max_leaves=6)


@st.composite
def raw_configs(draw) -> dict:
    """A valid minimal config (or nothing) with keys mostly from the schema set to anything: deep validation and
    the settings checks are reached."""
    raw = {"task": "causal_lm", "model": {"name": "m"}, "data": {"train": "a.jsonl"}} if draw(st.booleans()) else {}
    for key in draw(st.lists(st.sampled_from([*Config.model_fields, "trainig", "extra"]), max_size=4, unique=True)):
        if key in SECTION_KEYS and draw(st.integers(0, 3)):
            names = st.sampled_from([*SECTION_KEYS[key], "typo"])
            raw[key] = {**(raw.get(key) or {}), **draw(st.dictionaries(names, values, max_size=3))}
        else:
            raw[key] = draw(values)
    return raw


def loads_or_user_error(text: str, overrides: list[str] = ()) -> Config | None:
    """load_config on `text`; any exception but UserError fails the test. Valid configs go on to the settings
    checks, which must not raise either."""
    saved = dict(os.environ)
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "c.yaml"
        path.write_text(text)
        cwd = os.getcwd()
        os.chdir(folder)  # no .env of the developer's is read
        try:
            config = load_config(path, list(overrides))
        except UserError:
            event("user error")
            return None
        finally:
            os.chdir(cwd)
            os.environ.clear()
            os.environ.update(saved)
    assert isinstance(settings_problems(config), list)
    event("valid config")
    return config


@SETTINGS
@given(raw_configs())
def test_random_configs_load_or_raise_a_user_error(raw):
    loads_or_user_error(yaml.safe_dump(raw, allow_unicode=True))


@st.composite
def mutated(draw, text: str) -> str:
    """A few edits of the kinds people make: delete, insert, duplicate or swap a stretch of text."""
    for _ in range(draw(st.integers(1, 4))):
        start = draw(st.integers(0, len(text)))
        end = draw(st.integers(start, min(len(text), start + 12)))
        edit = draw(st.sampled_from(["delete", "insert", "duplicate", "swap"]))
        if edit == "delete":
            text = text[:start] + text[end:]
        elif edit == "insert":
            text = text[:start] + draw(st.sampled_from([":", " ", "\t", "\n", "-", "[", "{", "'", '"', "#", "${",
                                                        "no", "10", "é", "\x00"]) | st.text(max_size=4)) + text[start:]
        elif edit == "duplicate":
            text = text[:end] + text[start:end] + text[end:]
        else:
            text = text[:start] + text[end:end + (end - start)] + text[start:end] + text[end + (end - start):]
    return text


@SETTINGS
@given(st.sampled_from(range(len(SHIPPED))).flatmap(lambda i: mutated(SHIPPED[i])))
def test_mutated_shipped_configs_load_or_raise_a_user_error(text):
    os.environ.setdefault("DATA_PATH", "/project/data")  # what the shipped configs expect from .env
    loads_or_user_error(text)


override_keys = st.sampled_from([f"{section}.{key}" for section, keys in SECTION_KEYS.items() for key in keys]
                                + ["task", "training", "training.epochs.x", "data.fields.label", "", ".", "a..b"])


@SETTINGS
@given(st.lists(st.tuples(override_keys | st.text(max_size=8), st.sampled_from(["=", "", "=="]),
                          st.text(max_size=10) | st.sampled_from(["[1, 2]", "{a: 1}", "no", "-1", "1e400", "null",
                                                                  "'", "[", "${X}"])),
                max_size=4))
def test_random_overrides_apply_or_raise_a_user_error(parts):
    overrides = [key + sep + value for key, sep, value in parts]
    loads_or_user_error(SHIPPED[0], overrides)


def saved(text: str, encoding: str, line_end: str) -> bytes:
    text = text.replace("\n", line_end)
    return codecs.BOM_UTF8 + text.encode() if encoding == "utf-8-sig" else text.encode(encoding, "replace")


@settings(SETTINGS, max_examples=40)
@given(kind=st.sampled_from(["jsonl", "csv", "json"]), encoding=st.sampled_from(["utf-8", "utf-8-sig", "utf-16",
                                                                                  "cp1252"]),
       line_end=st.sampled_from(["\n", "\r\n", "\r"]), data=st.data())
def test_mutated_data_files_read_or_raise_a_user_error(kind, encoding, line_end, data):
    from sft.data import load_rows

    good = {"jsonl": "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in ROWS),
            "csv": "text,label\n" + "".join(f"{row['text']},{row['label']}\n" for row in ROWS),
            "json": json.dumps(ROWS, indent=1) + "\n"}[kind]
    text = data.draw(mutated(good.replace("review 3", "café 3")))
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / f"train.{kind}"
        path.write_bytes(saved(text, encoding, line_end))
        config = Config.model_validate({"task": "classification", "model": {"name": "m"},
                                        "data": {"train": str(path), "eval_fraction": 0.25}})
        try:
            loaded = load_rows(config, Path(folder))
        except UserError:
            event("user error")
            return
    assert len(loaded.train) and loaded.label_names
    event("read")


@settings(SETTINGS, max_examples=15)
@given(content=st.binary(max_size=200), kind=st.sampled_from(["jsonl", "csv", "json", "parquet"]))
def test_random_bytes_as_a_data_file_raise_a_user_error(content, kind):
    from sft.data import load_rows

    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / f"train.{kind}"
        path.write_bytes(content)
        config = Config.model_validate({"task": "causal_lm", "model": {"name": "m"}, "data": {"train": str(path)}})
        with pytest.raises(UserError):
            load_rows(config, Path(folder))


# `sft check` agrees with `sft train`: configs over the settings that reach Trainer, the model loader and the data
# stage. Whenever check (on CPU, as `sft check` without a GPU) accepts one, train on the tiny CPU model gets through
# Trainer's construction and its first optimizer step; whenever check refuses, the message is one line naming the
# key. Not varied: training.fsdp (whether it shards depends on the number of processes, which check cannot know;
# train refuses it on one process) and training.compile (tens of seconds per example).
# transformers' scheduler names (cosine_with_min_lr and warmup_stable_decay need arguments sft does not pass), and one
# that is not a scheduler.
SCHEDULERS = ["linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup",
              "inverse_sqrt", "reduce_lr_on_plateau", "cosine_with_min_lr", "warmup_stable_decay", "greedy",
              "cosine_annealing"]
NAMES_A_KEY = re.compile(r"(^|: |; )(task|(model|data|method|training|output)\.[a-z_][a-z_0-9.]*): ")
optional_steps = st.none() | st.integers(1, 4)


def mostly(usual, *others):
    """`usual` three times in four, else one of `others`: each example changes a few settings, so that both sides
    of the property (trained, refused) are reached."""
    return st.sampled_from([usual] * 3 * len(others) + list(others))


@st.composite
def run_configs(draw, model: Path, chat_data: Path, label_data: Path, output: Path) -> dict:
    task = draw(st.sampled_from(["causal_lm", "classification"]))
    training = {
        "max_steps": 1, "logging_steps": draw(st.sampled_from([1, 2, 10])),
        "batch_size": draw(st.integers(1, 4)), "gradient_accumulation_steps": draw(st.integers(1, 3)),
        "max_tokens_per_batch": draw(mostly(None, "auto", 128)),
        "learning_rate": draw(mostly(1e-3, 1e-8)), "warmup_ratio": draw(st.sampled_from([0.0, 0.5])),
        "lr_scheduler": draw(mostly("linear", *SCHEDULERS)),
        "eval_strategy": (evaluate := draw(st.sampled_from(["epoch", "steps", "no"]))),
        "eval_steps": draw(optional_steps),
        "save_strategy": draw(mostly(evaluate, "epoch", "steps", "no")), "save_steps": draw(optional_steps),
        "load_best_model_at_end": draw(mostly(False, True)),
        "early_stopping": draw(mostly(None, {"patience": 1, "metric": "eval_loss"},
                                      {"patience": 1, "metric": "eval_accuracy"},
                                      {"patience": 1, "metric": "eval_token_accuracy"})),
        "gradient_checkpointing": draw(st.booleans()), "chunked_loss": draw(mostly("auto", True, False)),
    }
    return {"task": task, "model": {"name": str(model),
                                    "attn_implementation": draw(mostly("auto", "sdpa", "eager", "flex_attention",
                                                                       "flash_attention_2")),
                                    "dtype": draw(mostly("auto", "float32", "bfloat16", "float16"))},
            "data": {"train": str(chat_data if task == "causal_lm" else label_data),
                     "eval_fraction": draw(st.sampled_from([0.0, 0.25])),
                     "max_length": draw(mostly(64, 16, 300))},  # the tiny Llama has 256 positions
            "method": {"name": draw(mostly("full", "lora", "qlora")), "merge": draw(mostly(False, True))},
            "training": {key: value for key, value in training.items() if value is not None},
            "output": {"dir": str(output), "samples": 0}}


def check_agrees_with_train(data, model: Path, chat_data: Path) -> None:
    from sft.check.preflight import run_checks
    from sft.training.trainer import run_training

    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        raw = data.draw(run_configs(model, chat_data, label_file(folder), folder / "runs"))
        path = folder / "c.yaml"
        path.write_text(yaml.safe_dump(raw))
        try:
            config = load_config(path)
            run_checks(config, folder / "work", gpu=False)
        except UserError as refusal:
            message = str(refusal)
            assert "\n" not in message and NAMES_A_KEY.search(message), message
            event(f"refused: {NAMES_A_KEY.search(message)[2]}")
            return
        # Any exception fails the test: check accepted what train cannot run. report.md and its plots (half of a
        # tiny run's time) are written after training, and are not what this test is about.
        with mock.patch("sft.training.trainer.write_report_of"):
            result = run_training(config)
    assert result.metrics["steps"] == 1, result.metrics
    event("trained one step")


def label_file(folder: Path) -> Path:
    path = folder / "labels.jsonl"
    path.write_text("".join(json.dumps({"text": f"add {a} and {b}", "label": "small" if a + b < 4 else "big"}) + "\n"
                            for a in range(6) for b in range(4)))
    return path


@settings(SETTINGS, max_examples=15)
@given(data=st.data())
def test_what_check_accepts_trains_and_what_it_refuses_names_the_key(tiny_causal_lm, tiny_chat_data, data):
    check_agrees_with_train(data, tiny_causal_lm, tiny_chat_data)


# More of the same: `make test` runs it too (it runs the slow tests); `pytest -m "not slow"` leaves it out.
@pytest.mark.slow
@settings(SETTINGS, max_examples=50)
@given(data=st.data())
def test_what_check_accepts_trains_over_many_configs(tiny_causal_lm, tiny_chat_data, data):
    check_agrees_with_train(data, tiny_causal_lm, tiny_chat_data)
