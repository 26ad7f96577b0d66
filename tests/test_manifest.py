"""Provenance: the manifest records versions, data hashes, git state, Slurm and image provenance; no secrets."""
import json
import subprocess

from sft.config import Config
from sft.manifest import finish_manifest, git_commit, image_provenance, start_manifest
from sft.secrets import register_secret


def make_config(tmp_path) -> Config:
    config = Config.model_validate({"task": "classification", "model": {"name": "m"}, "data": {"train": "a"}})
    config.config_path = tmp_path / "c.yaml"
    return config


def test_manifest_records_versions_seed_slurm_and_restarts(tmp_path, monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "123")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "0")
    monkeypatch.delenv("SLURM_ARRAY_JOB_ID", raising=False)
    config = make_config(tmp_path)
    manifest = start_manifest(tmp_path, config, resumed=False, resume_step=None)
    assert manifest["versions"]["torch"] and manifest["seed"] == 42 and manifest["slurm_job"] == "123"
    assert manifest["slurm"]["SLURM_RESTART_COUNT"] == "0"

    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    start_manifest(tmp_path, config, resumed=True, resume_step=40)
    restarted = json.loads((tmp_path / "manifest.json").read_text())
    assert restarted["restarts"] == [{**restarted["restarts"][0], "slurm_job": "123", "slurm_restart_count": "1",
                                      "resumed_from_step": 40}]
    finish_manifest(tmp_path, restarted, "finished", {"eval_accuracy": 0.9})
    done = json.loads((tmp_path / "manifest.json").read_text())
    assert done["status"] == "finished" and done["finished"] and done["results"] == {"eval_accuracy": 0.9}


def test_secrets_never_reach_the_manifest(tmp_path):
    register_secret("tok_supersecret")
    manifest = start_manifest(tmp_path, make_config(tmp_path), resumed=False, resume_step=None)
    manifest["data"] = {"files": [{"source": "postgresql://ann:pw123@db/x :: SELECT 1 -- tok_supersecret"}]}
    finish_manifest(tmp_path, manifest, "finished")
    text = (tmp_path / "manifest.json").read_text()
    assert "pw123" not in text and "tok_supersecret" not in text and "ann:***@db" in text


def test_git_commit_of_the_config_repository(tmp_path):
    assert git_commit(tmp_path) is None
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    (tmp_path / "c.yaml").write_text("x")
    subprocess.run(["git", "-C", str(tmp_path), "add", "."], check=True)
    subprocess.run(["git", "-C", str(tmp_path), "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "x"],
                   check=True)
    record = git_commit(tmp_path)
    assert len(record["commit"]) == 40 and record["dirty"] is False


def test_image_provenance_is_read_from_the_baked_file(tmp_path, monkeypatch):
    monkeypatch.setenv("SFT_PROVENANCE_FILE", str(tmp_path / "missing.json"))
    assert image_provenance() is None
    (tmp_path / "p.json").write_text('{"git_commit": "abc", "lock_sha256": "123"}')
    monkeypatch.setenv("SFT_PROVENANCE_FILE", str(tmp_path / "p.json"))
    assert image_provenance() == {"git_commit": "abc", "lock_sha256": "123"}
