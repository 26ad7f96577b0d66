"""sft diff: differences grouped into inputs, environment and outcome, one verdict line, exit code 0 only when the
runs are identical; paths never count (a copy from another cluster has other paths), recorded hashes do."""
import copy
import json
from pathlib import Path

import yaml

from sft.cli import main
from sft.files import write_json_atomic

CONFIG = {"task": "causal_lm", "model": {"name": "/models/tiny"},
          "data": {"train": "/data/chat.jsonl", "eval": None, "max_length": 64},
          "training": {"seed": 42, "learning_rate": 0.001}, "output": {"dir": "/scratch/alice/runs", "name": "base"},
          "env_file": None}
MANIFEST = {"status": "finished", "seed": 42, "host": "node1",
            "versions": {"python": "3.11.7", "torch": "2.5.1", "transformers": "4.46.0"},
            "accelerator": {"cuda_build": "12.4", "cudnn": 90100, "gpus": [{"name": "NVIDIA H100"}] * 2},
            "image": {"git_commit": "abc123", "lock_sha256": "0f" * 32, "build_date": "2026-11-01"},
            "determinism": {"seed": 42, "deterministic": True},
            "data": {"files": [{"source": "/data/chat.jsonl", "sha256": "aa" * 32, "rows": 24}], "train_examples": 24,
                     "eval_examples": 0, "cache_key": "k1"},
            "results": {"train_loss": 1.5, "train_runtime_s": 10.0, "steps": 3}}
METRICS = [{"step": 1, "loss": 2.0, "grad_norm": 1.0, "real_tokens_per_s": 100.0},
           {"step": 2, "loss": 1.5, "grad_norm": 0.9, "real_tokens_per_s": 120.0},
           {"step": 3, "loss": 1.0, "grad_norm": 0.8}, {"step": 3, "eval_loss": 1.2, "eval_runtime": 0.5}]


def make_run(path: Path, config: dict = CONFIG, manifest: dict = MANIFEST, metrics: list[dict] = METRICS) -> Path:
    path.mkdir(parents=True)
    (path / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    write_json_atomic(path / "manifest.json", manifest)
    (path / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in metrics))
    return path


def changed(document: dict, **changes) -> dict:
    """A deep copy with changes given as keyword arguments, nested keys joined by `__` (data__train=...)."""
    document = copy.deepcopy(document)
    for key, value in changes.items():
        *parents, leaf = key.split("__")
        node = document
        for part in parents:
            node = node[part]
        node[leaf] = value
    return document


def run_diff(capsys, a: Path, b: Path) -> tuple[int, str]:
    code = main(["diff", str(a), str(b)])
    out = capsys.readouterr().out
    return code, out


def verdict(out: str) -> str:
    return out.strip().splitlines()[-1]


def test_a_copy_on_another_cluster_with_other_paths_and_timings_is_identical(tmp_path, capsys):
    original = make_run(tmp_path / "alice")
    config = changed(CONFIG, data__train="/home/bob/data/chat.jsonl", output__dir="/home/bob/runs",
                     output__name="base-bob", env_file="/secrets/.env")
    manifest = changed(MANIFEST, host="other", results={**MANIFEST["results"], "train_runtime_s": 12.5})
    manifest["data"]["files"][0]["source"] = "/home/bob/data/chat.jsonl"
    metrics = [{**record, "real_tokens_per_s": 90.0} if "real_tokens_per_s" in record else record
               for record in METRICS]
    bobs_copy = make_run(tmp_path / "bob", config, manifest, metrics)
    code, out = run_diff(capsys, original, bobs_copy)
    assert verdict(out) == "verdict: identical"
    assert code == 0


def test_different_seed_and_data_are_named_as_inputs(tmp_path, capsys):
    a = make_run(tmp_path / "a")
    manifest = changed(MANIFEST, seed=7)
    manifest["data"]["files"][0]["sha256"] = "bb" * 32
    b = make_run(tmp_path / "b", changed(CONFIG, training__seed=7), manifest)
    code, out = run_diff(capsys, a, b)
    assert code == 1
    assert verdict(out) == "verdict: different inputs: seed, data.train"
    assert "  seed: 42 → 7" in out
    assert "  data.train: sha256 aaaaaaaaaaaa, 24 rows (/data/chat.jsonl) → sha256 bbbbbbbbbbbb" in out


def test_a_changed_config_key_is_an_input(tmp_path, capsys):
    a = make_run(tmp_path / "a")
    b = make_run(tmp_path / "b", changed(CONFIG, training__learning_rate=0.002))
    code, out = run_diff(capsys, a, b)
    assert (code, verdict(out)) == (1, "verdict: different inputs: training.learning_rate")


def test_secret_references_are_compared_as_recorded(tmp_path, capsys, monkeypatch):
    """config.yaml keeps ${VAR} for a value taken from a secret variable: the same reference on both sides is the same
    input; against a value written out it is a difference, even when this shell's variable would resolve to it (the
    runs may have read other values, and diff compares records, not this environment)."""
    monkeypatch.setenv("MODEL_SECRET_DIR", "/models")
    referenced = changed(CONFIG, model__name="${MODEL_SECRET_DIR}/tiny")
    a = make_run(tmp_path / "a", referenced)
    code, out = run_diff(capsys, a, make_run(tmp_path / "copy", referenced))
    assert (code, verdict(out)) == (0, "verdict: identical")
    code, out = run_diff(capsys, a, make_run(tmp_path / "written", CONFIG))
    assert (code, verdict(out)) == (1, "verdict: different inputs: model.name")
    assert "  model.name: ${MODEL_SECRET_DIR}/tiny → /models/tiny" in out


def test_same_inputs_and_environment_with_other_losses_is_nondeterminism(tmp_path, capsys):
    a = make_run(tmp_path / "a")
    metrics = copy.deepcopy(METRICS)
    metrics[2]["loss"] = 1.0 + 3e-7
    metrics[3]["eval_loss"] = 1.2 + 1e-6
    b = make_run(tmp_path / "b", metrics=metrics)
    code, out = run_diff(capsys, a, b)
    assert code == 1
    assert "inputs: same\nenvironment: same\noutcome: differs" in out
    assert verdict(out) == ("verdict: same inputs and environment, different outcome (nondeterminism: values first "
                            "differ at step 3; largest difference 1e-06 in eval_loss; training.deterministic was on)")


def test_an_other_image_and_gpus_are_the_environment(tmp_path, capsys):
    a = make_run(tmp_path / "a")
    manifest = changed(MANIFEST, image={**MANIFEST["image"], "git_commit": "def456", "build_date": "2026-12-01"},
                       accelerator={**MANIFEST["accelerator"], "gpus": [{"name": "NVIDIA A100"}]})
    b = make_run(tmp_path / "b", manifest=manifest)
    code, out = run_diff(capsys, a, b)
    assert code == 1
    assert "  image.git_commit: abc123 → def456" in out and "  gpus: 2 × NVIDIA H100 → 1 × NVIDIA A100" in out
    assert "build_date" not in out  # the same image rebuilt on another day is the same environment
    assert verdict(out) == "verdict: same inputs, different environment (image.git_commit, gpus), same outcome"


def test_a_restart_on_other_gpus_is_an_environment_difference(tmp_path, capsys):
    """A preempted run requeued onto other hardware trained partly there: not the same environment."""
    restart = {key: MANIFEST[key] for key in ("versions", "accelerator", "image")}
    a = make_run(tmp_path / "a", manifest=changed(MANIFEST, restarts=[restart]))
    b = make_run(tmp_path / "b", manifest=changed(MANIFEST, restarts=[
        {**restart, "accelerator": {**MANIFEST["accelerator"], "gpus": [{"name": "NVIDIA A100"}] * 2}}]))
    code, out = run_diff(capsys, a, b)
    assert code == 1 and "  restart 1: gpus: (none) → 2 × NVIDIA A100" in out
    assert verdict(out) == "verdict: same inputs, different environment (restart 1: gpus), same outcome"


def test_a_cache_key_that_differs_with_the_transformers_version_is_not_an_input(tmp_path, capsys):
    """The cache key hashes the tokenizer files, the tokenizing libraries' versions, the data and the seed: it is
    named only when nothing else explains it (then the tokenizer's files differ)."""
    a = make_run(tmp_path / "a")
    manifest = changed(MANIFEST, versions={**MANIFEST["versions"], "transformers": "4.47.0"})
    manifest["data"]["cache_key"] = "k2"
    b = make_run(tmp_path / "b", manifest=manifest)
    assert verdict(run_diff(capsys, a, b)[1]) == ("verdict: same inputs, different environment "
                                                  "(versions.transformers), same outcome")
    manifest["versions"]["transformers"] = MANIFEST["versions"]["transformers"]
    c = make_run(tmp_path / "c", manifest=manifest)
    assert verdict(run_diff(capsys, a, c)[1]) == "verdict: different inputs: data.cache_key"  # the tokenizer's files
    # Another seed picks other eval rows, which changes the key too: the seed says it all.
    d = make_run(tmp_path / "d", changed(CONFIG, training__seed=7), changed(manifest, seed=7))
    assert verdict(run_diff(capsys, a, d)[1]) == "verdict: different inputs: seed"


def test_a_preempted_run_compares_on_the_steps_it_logged(tmp_path, capsys):
    finished = make_run(tmp_path / "finished")
    preempted = make_run(tmp_path / "preempted", manifest=changed(MANIFEST, status="preempted", results={}),
                         metrics=METRICS[:2])
    code, out = run_diff(capsys, finished, preempted)
    assert code == 1
    assert "  status: finished → preempted" in out and "  last logged step: 3 → 2" in out
    assert "values first differ" not in out  # steps 1 and 2 agree
    assert "train_loss 1.5 | (none)" in out
    assert verdict(out) == ("verdict: same inputs and environment, same values on the steps both logged, ended "
                            "differently (status finished → preempted; last logged step 3 → 2)")


def test_final_weights_that_differ_make_runs_different(tmp_path, capsys):
    a, b = make_run(tmp_path / "a"), make_run(tmp_path / "b")
    for run, content in ((a, b"weights"), (b, b"weightz")):
        (run / "final").mkdir()
        (run / "final" / "model.safetensors").write_bytes(content)
    code, out = run_diff(capsys, a, b)
    assert code == 1 and "  final weights (sha256): " in out
    (b / "final" / "model.safetensors").write_bytes(b"weights")
    assert run_diff(capsys, a, b)[0] == 0


def test_a_folder_without_a_manifest_is_one_line_and_exit_code_2(tmp_path, capsys):
    a = make_run(tmp_path / "a")
    (tmp_path / "empty").mkdir()
    assert main(["diff", str(a), str(tmp_path / "empty")]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "not an sft run directory" in error
