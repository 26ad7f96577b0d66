"""sft reproduce: a run trained again from its run directory comes out bit-identical (losses, metrics, final weights)
on CPU, and with training.deterministic on a GPU where one is visible; secrets are read again from the
environment; changed data is refused before anything trains."""
import shutil

import pytest
import yaml
from conftest import CHAT_ROWS, SIZES, tiny_lm_config, write_jsonl

from sft.cli import main
from sft.files import write_json_atomic
from sft.results.diff import weights_digest


@pytest.fixture
def deterministic_kernels_restored():
    """training.deterministic switches torch's global deterministic mode: switched back after the test."""
    import torch

    yield
    torch.use_deterministic_algorithms(False)
    torch.backends.cudnn.deterministic = False


@pytest.mark.parametrize("task, method", [("classification", "full"), ("causal_lm", "lora")])
def test_a_copied_run_reproduces_bit_identically(tiny_causal_lm, tiny_chat_data, tmp_path, capsys, task, method,
                                                 deterministic_kernels_restored):
    """On CPU, and on a GPU where one is visible (training.deterministic is on)."""
    from sft.config import load_config
    from sft.training.trainer import run_training

    data = tiny_chat_data if task == "causal_lm" else write_jsonl(
        tmp_path / "classes.jsonl", [{"text": f"add {a} and {b}", "label": SIZES[min((a + b) // 3, 2)]}
                                     for a in range(6) for b in range(4)])
    config = tiny_lm_config(tiny_causal_lm, data, tmp_path / "alice", max_steps=4, deterministic=True,
                            learning_rate=2e-2 if method == "lora" else 3e-3)
    config |= {"task": task, "method": {"name": method, "lora": {"r": 8, "alpha": 32}}}
    path = tmp_path / f"{task}.yaml"
    path.write_text(yaml.safe_dump(config))
    trained = run_training(load_config(path)).run_dir
    # Copied as from another machine: the reproduction lands next to the copy.
    original = shutil.copytree(trained, tmp_path / "bob" / "original")
    assert main(["reproduce", str(original), "--name", "again"]) == 0
    out = capsys.readouterr().out
    assert out.strip().splitlines()[-1] == "verdict: identical"
    again = tmp_path / "bob" / "again"
    assert weights_digest(again) == weights_digest(original) is not None
    assert (again / "metrics.jsonl").read_text().count('"loss"') == 4


def train_with_secret_data_folder(tmp_path, model, monkeypatch):
    """A finished run whose data path comes from a secret-named variable (config.yaml keeps the reference)."""
    from sft.config import load_config
    from sft.training.trainer import run_training

    data_folder = tmp_path / "private-data"
    data_folder.mkdir()
    write_jsonl(data_folder / "chat.jsonl", CHAT_ROWS[:12])
    monkeypatch.setenv("DATA_SECRET_DIR", str(data_folder))
    config = tiny_lm_config(model, "${DATA_SECRET_DIR}/chat.jsonl", tmp_path / "runs", max_steps=3)
    path = tmp_path / "secret.yaml"
    path.write_text(yaml.safe_dump(config))
    run = run_training(load_config(path)).run_dir
    recorded = (run / "config.yaml").read_text()
    assert "${DATA_SECRET_DIR}/chat.jsonl" in recorded and str(data_folder) not in recorded
    return run, data_folder


def test_secret_references_in_config_yaml_are_resolved_again_from_the_environment(tiny_causal_lm, tmp_path, capsys,
                                                                            monkeypatch):
    run, _ = train_with_secret_data_folder(tmp_path, tiny_causal_lm, monkeypatch)
    assert main(["reproduce", str(run)]) == 0
    assert capsys.readouterr().out.strip().endswith("verdict: identical")
    again = tmp_path / "runs" / "tiny-reproduce"
    assert (again / "final").is_dir()
    assert (again / "config.yaml").read_text().count("${DATA_SECRET_DIR}/chat.jsonl") == 1

    monkeypatch.delenv("DATA_SECRET_DIR")
    assert main(["reproduce", str(run), "--name", "without-variable"]) == 2
    error = capsys.readouterr().err.strip()
    assert error == (f"sft: error: {run / 'config.yaml'}: data.train comes from the secret variable DATA_SECRET_DIR, "
                     f"which is not set here; export it or add it to .env (or pass --env-file), then retry")
    assert not (tmp_path / "runs" / "without-variable").exists()


def test_reproduction_on_changed_data_is_refused_naming_the_source(tiny_causal_lm, tmp_path, capsys, monkeypatch):
    run, data_folder = train_with_secret_data_folder(tmp_path, tiny_causal_lm, monkeypatch)
    write_jsonl(data_folder / "chat.jsonl", CHAT_ROWS[:11])
    assert main(["reproduce", str(run)]) == 2
    error = capsys.readouterr().err.splitlines()[-1]  # after the first training's summary
    assert error.startswith("sft: error: data.train: ") and "has changed since the run" in error
    assert not (tmp_path / "runs" / "tiny-reproduce").exists()


def test_a_finished_reproduction_is_never_overwritten(tmp_path, capsys):
    for name in ("original", "taken"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.yaml").write_text("task: causal_lm\n")
        write_json_atomic(tmp_path / name / "manifest.json", {"status": "finished"})
    assert main(["reproduce", str(tmp_path / "original"), "--name", "taken"]) == 2
    assert "holds a finished run already; pass --name NEW" in capsys.readouterr().err


def test_a_reproduction_says_where_the_environment_differs_from_the_recorded_one(tiny_causal_lm, tiny_chat_data,
                                                                                 tmp_path, capsys):
    from sft.config import load_config
    from sft.run.manifest import read_manifest, write_manifest
    from sft.training.trainer import run_training

    path = tmp_path / "lm.yaml"
    path.write_text(yaml.safe_dump(tiny_lm_config(tiny_causal_lm, tiny_chat_data, tmp_path / "runs", max_steps=2)))
    run = run_training(load_config(path)).run_dir
    manifest = read_manifest(run)
    manifest["versions"]["transformers"] = "4.0.0"  # as if trained in an older image
    write_manifest(run, manifest)
    capsys.readouterr()
    assert main(["reproduce", str(run)]) == 1
    out, err = capsys.readouterr()
    said = " ".join(err.split())  # the terminal log wraps long lines
    assert "environment differs from the recorded run: versions.transformers: recorded 4.0.0, now " in said
    assert "  versions.transformers: 4.0.0 → " in out
    assert out.strip().splitlines()[-1] == ("verdict: same inputs, different environment (versions.transformers), "
                                            "same outcome")


def test_a_url_password_reference_is_resolved_and_a_typed_one_is_refused(tmp_path, monkeypatch):
    """config.yaml keeps postgresql://me:${PGPASSWORD}@db/x and masks a password typed into the YAML."""
    from sft.errors import UserError
    from sft.results.diff import RunRecord
    from sft.results.reproduce import recorded_config

    monkeypatch.setenv("PGPASSWORD", "s3cret-word")
    config = {"task": "causal_lm", "model": {"name": "m"}, "output": {"dir": "/alice/runs", "name": "x"},
              "data": {"train": [{"database": "postgresql://me:${PGPASSWORD}@db/x", "query": "select 1"}],
                       "eval": "/alice/data/dev.jsonl"}}
    original = RunRecord(tmp_path / "runs" / "x", config, {}, [])
    loaded = recorded_config(original, "x-again", None, tmp_path / "x.yaml")
    assert (loaded.data.train[0].database, loaded.data.eval) == ("postgresql://me:s3cret-word@db/x",
                                                                 "/alice/data/dev.jsonl")
    assert (loaded.output.dir, loaded.output.name) == (str(tmp_path / "runs"), "x-again")

    config["data"]["train"][0]["database"] = "postgresql://me:***@db/x"
    with pytest.raises(UserError, match=r"data\.train\[0\]\.database holds a database password typed into"):
        recorded_config(original, "x-again", None, tmp_path / "x.yaml")
