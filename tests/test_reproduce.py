"""sft reproduce: a run trained again from its run directory comes out bit-identical on CPU (losses, metrics, final
weights), with secrets read again from the environment; changed data is refused before anything trains."""
import shutil

import pytest
import yaml

from conftest import CHAT_ROWS, tiny_lm_config, write_jsonl
from sft.cli import main
from sft.diff import weights_digest


@pytest.mark.parametrize("task, method", [("classification", "full"), ("causal_lm", "lora")])
def test_a_copied_run_reproduces_bit_identically(finished_runs, tmp_path, capsys, task, method):
    # Copied as from another machine: the reproduction lands next to the copy.
    original = shutil.copytree(finished_runs[task, method], tmp_path / "runs" / "original")
    assert main(["reproduce", str(original), "--name", "again"]) == 0
    out = capsys.readouterr().out
    assert out.strip().splitlines()[-1] == "verdict: identical"
    again = tmp_path / "runs" / "again"
    assert weights_digest(again) == weights_digest(original) is not None
    assert (again / "metrics.jsonl").read_text().count('"loss"') == 6


def train_with_secret_data_folder(tmp_path, model, monkeypatch):
    """A finished run whose data path comes from a secret-named variable (masked in config.yaml and manifest)."""
    from sft.config import load_config
    from sft.training import run_training

    data_folder = tmp_path / "private-data"
    data_folder.mkdir()
    write_jsonl(data_folder / "chat.jsonl", CHAT_ROWS[:12])
    monkeypatch.setenv("DATA_SECRET_DIR", str(data_folder))
    config = tiny_lm_config(model, "${DATA_SECRET_DIR}/chat.jsonl", tmp_path / "runs", max_steps=3)
    path = tmp_path / "secret.yaml"
    path.write_text(yaml.safe_dump(config))
    run = run_training(load_config(path)).run_dir
    assert "***/chat.jsonl" in (run / "config.yaml").read_text()  # the copy cannot be trained from as it is
    return run, data_folder


def test_secrets_are_read_again_from_the_environment_not_from_the_masked_copy(tiny_causal_lm, tmp_path, capsys,
                                                                            monkeypatch):
    run, _ = train_with_secret_data_folder(tmp_path, tiny_causal_lm, monkeypatch)
    assert main(["reproduce", str(run)]) == 0
    assert capsys.readouterr().out.strip().endswith("verdict: identical")
    assert (tmp_path / "runs" / "tiny-reproduce" / "final").is_dir()

    monkeypatch.delenv("DATA_SECRET_DIR")
    assert main(["reproduce", str(run), "--name", "without-variable"]) == 2
    assert "environment variable DATA_SECRET_DIR is not set" in capsys.readouterr().err


def test_reproduction_on_changed_data_is_refused_naming_the_source(tiny_causal_lm, tmp_path, capsys, monkeypatch):
    run, data_folder = train_with_secret_data_folder(tmp_path, tiny_causal_lm, monkeypatch)
    write_jsonl(data_folder / "chat.jsonl", CHAT_ROWS[:11])
    assert main(["reproduce", str(run)]) == 2
    error = capsys.readouterr().err.splitlines()[-1]  # after the first training's summary
    assert error.startswith("sft: error: data.train: ") and "has changed since the run" in error
    assert not (tmp_path / "runs" / "tiny-reproduce").exists()


def test_a_finished_reproduction_is_never_overwritten(finished_runs, tmp_path, capsys):
    original = shutil.copytree(finished_runs["causal_lm", "lora"], tmp_path / "runs" / "original")
    shutil.copytree(original, tmp_path / "runs" / "taken")
    assert main(["reproduce", str(original), "--name", "taken"]) == 2
    assert "holds a finished run already; pass --name NEW" in capsys.readouterr().err
