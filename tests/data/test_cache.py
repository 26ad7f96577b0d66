"""Tokenized-data cache: a miss for every setting that changes tokens, a hit for everything else, token ids and
masks identical to the pure per-format functions (through the parallel map), one build under torchrun."""
import json
import os
import subprocess
import sys

import pytest
from conftest import CHAT_ROWS, REPO, build_tiny_tokenizer, tiny_lm_config, write_jsonl

from sft import data as sft_data
from sft.config import Config
from sft.data import (IGNORE_INDEX, tokenize_classification, tokenize_instruction, tokenize_messages,
                      tokenize_prompt_completion, tokenize_text)

PAIRS = [{"prompt": f"add {a} and {b} :", "completion": f" the answer is {a + b}"} for a in range(6) for b in range(5)]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return build_tiny_tokenizer(tmp_path_factory.mktemp("tok"))


def config_for(tmp_path, train, task="causal_lm", training=None, **data) -> Config:
    return Config.model_validate({"task": task, "model": {"name": "unused"}, "training": training or {},
                                  "data": {"train": train, "cache_dir": str(tmp_path / "cache"), **data}})


def with_model(config: Config, folder: str) -> Config:
    return config.model_copy(update={"model": config.model.model_copy(update={"name": folder})})


def prepare(config: Config, tokenizer):
    """sft's prepare, with model.name the folder the tokenizer was saved in (the cache key hashes its files)."""
    return sft_data.prepare(with_model(config, tokenizer.name_or_path), lambda: tokenizer)


def cached_folders(tmp_path) -> list[str]:
    return sorted(p.name for p in (tmp_path / "cache" / "tokenized").iterdir() if p.is_dir())


def test_second_prepare_is_a_cache_hit_and_memory_maps_the_same_data(tmp_path, tokenizer):
    data = write_jsonl(tmp_path / "a.jsonl", PAIRS)
    first = prepare(config_for(tmp_path, str(data)), tokenizer)
    # A hit is found from the files alone: the tokenizer is not loaded.
    second = sft_data.prepare(with_model(config_for(tmp_path, str(data)), tokenizer.name_or_path),
                              lambda: pytest.fail("loaded the tokenizer for a cache hit"))
    assert first.build_seconds is not None and second.build_seconds is None
    assert second.cache_key == first.cache_key and cached_folders(tmp_path) == [first.cache_key]
    assert second.train["input_ids"] == first.train["input_ids"] and second.summary == first.summary
    # Memory-mapped from the cache folder, not copied into memory.
    assert all(str(first.cache_folder) in f["filename"] for f in second.train.cache_files)
    assert not list((tmp_path / "cache").glob(".work-*")) and not list((tmp_path / "cache" / "tokenized").glob(".*"))


@pytest.mark.parametrize("change", [
    {"data": {"max_length": 12}},
    {"data": {"format": "text", "fields": {"text": "prompt"}}},
    {"data": {"eval_fraction": 0.2}},
    {"data": {"dedupe": True}},
    {"training": {"seed": 7}},  # picks the eval rows
    {"source": {"max_rows": 10}},
    {"source": {"fraction": 0.5}},
    {"rows": PAIRS[:-1]},
    {"chat_template": "{{ bos_token }}{% for m in messages %}{{ m['content'] }}{% endfor %}"},
    {"move": True},
    {"training": {"learning_rate": 0.1, "batch_size": 2, "max_tokens_per_batch": 1024}},
    {"data": {"num_proc": 2, "wait_minutes": 5}},
])
def test_cache_misses_exactly_when_the_tokens_would_change(tmp_path, tokenizer, change):
    data = write_jsonl(tmp_path / "a.jsonl", PAIRS)
    base = prepare(config_for(tmp_path, str(data), eval_fraction=0.1), tokenizer)
    if "rows" in change:
        write_jsonl(data, change["rows"])
    if "move" in change:
        data = data.rename(tmp_path / "moved.jsonl")
    train = {"path": str(data), **change.get("source", {})}
    settings = {"eval_fraction": 0.1, **change.get("data", {})}
    changed_tokenizer = build_tiny_tokenizer(tmp_path / "tok2", change["chat_template"]) \
        if "chat_template" in change else tokenizer
    again = prepare(config_for(tmp_path, train, training=change.get("training"), **settings), changed_tokenizer)
    tokens_change = not ({"move"} & change.keys() or change.get("training", {}).get("learning_rate")
                         or "num_proc" in change.get("data", {}))
    assert (again.cache_key != base.cache_key) == tokens_change
    assert (again.build_seconds is not None) == tokens_change
    assert len(cached_folders(tmp_path)) == 1 + tokens_change
    if "move" in change:
        assert again.files[0].source == str(data)  # the manifest names the data where it is now


def test_the_key_follows_the_tokenizer_files_but_not_weights_added_beside_them(tmp_path, tokenizer):
    import shutil

    folder = tmp_path / "model"
    shutil.copytree(tokenizer.name_or_path, folder)
    data = write_jsonl(tmp_path / "a.jsonl", PAIRS)
    copy = tokenizer.__class__.from_pretrained(folder)
    base = prepare(config_for(tmp_path, str(data)), copy)
    # What `sft fetch` or a download adds after the tokenizer: weights, their index, generation settings, docs.
    for name in ("model.safetensors", "model.safetensors.index.json", "generation_config.json", "README.md",
                 ".cache/huggingface/download/model.safetensors.metadata"):
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text("{}")
    assert prepare(config_for(tmp_path, str(data)), copy).cache_key == base.cache_key
    settings = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**settings, "bos_token": "<pad>"}))
    assert prepare(config_for(tmp_path, str(data)), copy).cache_key != base.cache_key


def test_token_ids_and_masks_equal_the_per_format_functions_for_every_format(tmp_path, tokenizer):
    """Parallel map (num_proc=2) + cache round trip vs the pure functions, row by row, with truncation."""
    cases = {
        "messages": (CHAT_ROWS, lambda r, n: tokenize_messages(tokenizer, r["messages"], n)),
        "prompt_completion": (PAIRS, lambda r, n: tokenize_prompt_completion(tokenizer, r["prompt"], r["completion"], n)),
        "instruction": ([{"instruction": p["prompt"], "input": "now" if i % 2 else "", "output": p["completion"]}
                         for i, p in enumerate(PAIRS)],
                        lambda r, n: tokenize_instruction(tokenizer, r["instruction"], r["input"], r["output"], n)),
        "text": ([{"text": p["prompt"] + p["completion"]} for p in PAIRS], lambda r, n: tokenize_text(tokenizer, r["text"], n)),
    }
    for data_format, (rows, reference) in cases.items():
        data = write_jsonl(tmp_path / f"{data_format}.jsonl", rows)
        max_length = max(len(reference(r, None)["input_ids"]) for r in rows) - 2  # the longest rows get truncated
        prepared = prepare(config_for(tmp_path, str(data), eval_fraction=0, max_length=max_length, num_proc=2),
                           tokenizer)
        assert prepared.data_format == data_format
        expected = [reference(r, max_length) for r in rows]
        expected = [e for e in expected if any(label != IGNORE_INDEX for label in e["labels"])]
        assert prepared.train["input_ids"] == [e["input_ids"] for e in expected], data_format
        assert prepared.train["labels"] == [e["labels"] for e in expected], data_format
        assert prepared.summary["truncated"] > 0, data_format

    rows = [{"text": f"review number {i} " * (i % 4 + 1), "label": "pos" if i % 3 else "neg"} for i in range(30)]
    data = write_jsonl(tmp_path / "classes.jsonl", rows)
    prepared = prepare(config_for(tmp_path, str(data), task="classification", eval_fraction=0, max_length=10,
                                  num_proc=2), tokenizer)
    expected = [tokenize_classification(tokenizer, r["text"], None, ["neg", "pos"].index(r["label"]), 10) for r in rows]
    assert prepared.train["input_ids"] == [e["input_ids"] for e in expected]
    assert prepared.train["labels"] == [e["labels"] for e in expected]
    assert prepared.summary["labels"] == {"neg": 10, "pos": 20}


def test_summary_counts_lengths_truncation_and_trainable_share(tmp_path, tokenizer):
    data = write_jsonl(tmp_path / "a.jsonl", PAIRS + PAIRS[:5])
    prepared = prepare(config_for(tmp_path, str(data), eval_fraction=0, max_length=12, dedupe=True), tokenizer)
    examples = [tokenize_prompt_completion(tokenizer, r["prompt"], r["completion"], None) for r in PAIRS]
    lengths = sorted(len(e["input_ids"]) for e in examples)
    summary = prepared.summary
    assert summary["dropped"]["exact duplicates"] == 5 and summary["train_examples"] == len(PAIRS)
    assert summary["token_lengths"]["max"] == lengths[-1]
    assert summary["truncated"] == sum(n > 12 for n in lengths)
    kept = [e["labels"][:12] for e in examples]
    share = sum(label != IGNORE_INDEX for labels in kept for label in labels) / sum(len(labels) for labels in kept)
    assert summary["trainable_token_share"] == pytest.approx(share, abs=1e-4)


@pytest.mark.slow
def test_torchrun_with_two_processes_builds_the_cache_once(tiny_causal_lm, tiny_chat_data, tmp_path, write_config):
    config = tiny_lm_config(tiny_causal_lm, tiny_chat_data, tmp_path / "runs", max_steps=2)
    config["data"]["cache_dir"] = str(tmp_path / "cache")
    path = write_config(config)
    result = subprocess.run([str(REPO / ".venv" / "bin" / "torchrun"), "--nproc-per-node", "2",
                             str(REPO / "entrypoint.py"), "train", str(path), "training.ddp_backend=gloo"],
                            capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    folders = cached_folders(tmp_path)
    assert len(folders) == 1
    info = json.loads((tmp_path / "cache" / "tokenized" / folders[0] / "info.json").read_text())
    assert info["built_by"]["rank"] == "0"
    log = next((tmp_path / "runs" / "tiny").glob("sft_log_*.log")).read_text()
    assert log.count("tokenized data built in") == 1 and f"into cache {folders[0]}" in log
    assert "tokenized data from cache" not in log  # rank 1 memory-mapped rank 0's build; it logs warnings only
    assert "tokenized" not in {p.name for p in (tmp_path / "runs" / "tiny").iterdir()}
    manifest = json.loads((tmp_path / "runs" / "tiny" / "manifest.json").read_text())
    assert manifest["data"]["cache_key"] == folders[0] and manifest["data"]["summary"]["train_examples"] == 24
    assert "data: example lengths: p50" in log


def test_tokenizer_processes_follow_the_slurm_allocation(tmp_path, monkeypatch):
    import os

    from sft.data import num_proc

    config = config_for(tmp_path, "a.jsonl")
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "6")
    assert num_proc(config, 1_000_000) == 6 and num_proc(config, 12_000) == 2 and num_proc(config, 100) == 1
    monkeypatch.delenv("SLURM_CPUS_PER_TASK")
    assert num_proc(config, 1_000_000) == len(os.sched_getaffinity(0))
    assert num_proc(config_for(tmp_path, "a.jsonl", num_proc=3), 10) == 3


def test_sft_prepare_needs_only_the_tokenizer_and_the_second_run_hits_the_cache(tiny_chat_data, tmp_path, write_config):
    tokenizer_only = tmp_path / "tokenizer-only"  # no config.json, no weights: a model could not load from here
    build_tiny_tokenizer(tokenizer_only)
    path = write_config({"task": "causal_lm", "model": {"name": str(tokenizer_only)},
                         "data": {"train": str(tiny_chat_data), "cache_dir": str(tmp_path / "cache")}})
    command = [sys.executable, str(REPO / "entrypoint.py"), "prepare", str(path)]
    first = subprocess.run(command, capture_output=True, text=True, timeout=300, env={**os.environ, "COLUMNS": "200"})
    assert first.returncode == 0, first.stderr
    key = cached_folders(tmp_path)[0]
    assert f"cache key         │ {key}" in first.stdout and "tokenized data built in" in first.stdout
    assert "training examples │ 22" in first.stdout and "trainable tokens" in first.stdout
    second = subprocess.run(command, capture_output=True, text=True, timeout=300, env={**os.environ, "COLUMNS": "200"})
    assert second.returncode == 0 and "tokenized data already in the cache" in second.stdout
    assert f"tokenized data from cache {key}" in second.stderr + second.stdout and cached_folders(tmp_path) == [key]
