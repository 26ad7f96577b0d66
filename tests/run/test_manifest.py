"""Provenance: the manifest records versions, data hashes, git state, Slurm and image provenance per start, how a
run ended (failures included), examples rather than batches; no secrets."""
import json
import subprocess

import pytest

from sft.config import Config
from sft.data import DataFile, PreparedData
from sft.run.manifest import (finish_manifest, git_commit, image_provenance, read_manifest, record_data, record_failure,
                              start_manifest, write_manifest)
from sft.secrets import register_secret


def make_config(tmp_path) -> Config:
    config = Config.model_validate({"task": "classification", "model": {"name": "m"}, "data": {"train": "a"}})
    config.config_path = tmp_path / "c.yaml"
    return config


def test_manifest_records_versions_seed_slurm_and_restarts(tmp_path, monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "123")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "0")
    monkeypatch.delenv("SLURM_ARRAY_JOB_ID", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "project" / ".cache" / "huggingface"))
    config = make_config(tmp_path)
    manifest = start_manifest(tmp_path, config, resume_step=None)
    assert manifest["versions"]["torch"] and manifest["seed"] == 42 and manifest["slurm_job"] == "123"
    assert manifest["hf_home"] == str(tmp_path / "project" / ".cache" / "huggingface")  # where models came from
    assert manifest["slurm"]["SLURM_RESTART_COUNT"] == "0"

    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    start_manifest(tmp_path, config, resume_step=40)
    restarted = read_manifest(tmp_path)
    assert restarted["restarts"] == [{**restarted["restarts"][0], "slurm_job": "123", "slurm_restart_count": "1",
                                      "resumed_from_step": 40, "previous": {"status": "running"}}]
    finish_manifest(tmp_path, restarted, "finished", {"eval_accuracy": 0.9})
    done = read_manifest(tmp_path)
    assert done["status"] == "finished" and done["finished"] and done["results"] == {"eval_accuracy": 0.9}


def test_a_restart_on_other_hardware_records_its_own_host_gpus_versions_and_image(tmp_path, monkeypatch):
    config = make_config(tmp_path)
    (tmp_path / "image-a.json").write_text('{"git_commit": "aaa"}')
    monkeypatch.setenv("SFT_PROVENANCE_FILE", str(tmp_path / "image-a.json"))
    first = start_manifest(tmp_path, config, resume_step=None)
    finish_manifest(tmp_path, first, "preempted")

    # The requeue lands on another node with another GPU, from a rebuilt image with a newer transformers.
    (tmp_path / "image-b.json").write_text('{"git_commit": "bbb"}')
    monkeypatch.setenv("SFT_PROVENANCE_FILE", str(tmp_path / "image-b.json"))
    monkeypatch.setattr("sft.run.manifest.socket.gethostname", lambda: "gpu-node-2")
    h100 = {"cuda_build": "12.8", "cuda_available": True, "cudnn": 91000,
            "gpus": [{"name": "NVIDIA H100 80GB HBM3", "memory_gib": 79.2, "capability": "9.0"}]}
    monkeypatch.setattr("sft.run.manifest.accelerator_info", lambda: h100)
    real_versions = first["versions"]
    monkeypatch.setattr("sft.run.manifest.package_versions", lambda: {**real_versions, "transformers": "99.0"})
    start_manifest(tmp_path, config, resume_step=6)

    manifest = read_manifest(tmp_path)
    restart = manifest["restarts"][0]
    assert (manifest["host"], manifest["image"], manifest["accelerator"]) == (first["host"], {"git_commit": "aaa"},
                                                                             first["accelerator"])
    assert restart["host"] == "gpu-node-2" and restart["image"] == {"git_commit": "bbb"}
    assert restart["accelerator"] == h100 and restart["versions"]["transformers"] == "99.0"
    assert restart["previous"]["status"] == "preempted" and restart["previous"]["stopped"]
    assert manifest["status"] == "running" and "stopped" not in manifest


def test_a_failed_run_records_failed_with_its_error_in_one_masked_line(tmp_path):
    register_secret("hunter2-secret")
    manifest = start_manifest(tmp_path, make_config(tmp_path), resume_step=None)
    try:
        raise RuntimeError("CUDA out of memory while reading postgresql://ann:pw123@db/x with hunter2-secret\n"
                           "Tried to allocate 2.00 GiB")
    except RuntimeError as error:
        record_failure(tmp_path, manifest, error)
    failed = read_manifest(tmp_path)
    assert failed["status"] == "failed" and failed["stopped"]
    assert failed["error"] == "RuntimeError: CUDA out of memory while reading postgresql://ann:***@db/x with ***"

    start_manifest(tmp_path, make_config(tmp_path), resume_step=None)
    record_failure(tmp_path, read_manifest(tmp_path), KeyboardInterrupt())
    interrupted = read_manifest(tmp_path)
    assert interrupted["status"] == "interrupted" and interrupted["error"] == "KeyboardInterrupt"
    assert interrupted["restarts"][0]["previous"]["error"] == failed["error"]


def test_token_budget_batches_count_as_examples(tmp_path):
    from datasets import Dataset

    from sft.data import in_token_budget_batches

    train = [{"input_ids": [1, 2], "labels": [1, 2]}, {"input_ids": [3], "labels": [3]},
             {"input_ids": [4, 5, 6], "labels": [4, 5, 6]}]
    examples = [{"input_ids": [1, 2], "labels": [1, 2]}, {"input_ids": [3], "labels": [3]}]
    files = [DataFile("a.jsonl", "abc", 4)]
    prepared = PreparedData(Dataset.from_list(train), Dataset.from_list(examples), "text", None, files, {}, "key",
                            tmp_path, None)
    manifest = {}
    record_data(manifest, in_token_budget_batches(prepared, max_tokens=3), resumed=False,  # [4, 5, 6] | [1, 2] + [3]
                allow_change=False)
    assert manifest["data"]["eval_batches"] == 1
    assert manifest["data"]["train_examples"] == 3 and manifest["data"]["train_batches"] == 2
    assert manifest["data"]["eval_examples"] == 2 and manifest["data"]["cache_key"] == "key"


def test_each_start_records_its_data_and_a_resume_compares_with_what_the_run_trained_on(tmp_path):
    def prepared(sha256: str) -> PreparedData:
        return PreparedData([1, 2], None, "text", None, [DataFile("train.jsonl", sha256, 2)], {}, f"key-{sha256}",
                            tmp_path, None)

    manifest = start_manifest(tmp_path, make_config(tmp_path), resume_step=None)
    assert record_data(manifest, prepared("aaa"), resumed=False, allow_change=False) == []
    start_manifest(tmp_path, make_config(tmp_path), resume_step=None)  # a restart before any checkpoint
    manifest = read_manifest(tmp_path)
    assert record_data(manifest, prepared("aaa"), resumed=False, allow_change=False) == []

    def resume(sha256: str, allow_change: bool = False) -> list[str]:
        write_manifest(tmp_path, manifest)
        start_manifest(tmp_path, make_config(tmp_path), resume_step=3)
        manifest.clear()
        manifest.update(read_manifest(tmp_path))
        return record_data(manifest, prepared(sha256), resumed=True, allow_change=allow_change)

    assert resume("bbb") == ["train.jsonl (sha256 aaa then, bbb now)"]  # refused by sft train
    assert resume("bbb", allow_change=True) == ["train.jsonl (sha256 aaa then, bbb now)"]
    assert resume("bbb") == []  # the run trains on bbb since the allowed change
    assert resume("aaa") == ["train.jsonl (sha256 bbb then, aaa now)"]
    assert manifest["data"]["files"][0]["sha256"] == "aaa" and manifest["data"]["cache_key"] == "key-aaa"
    assert [(r.get("data", {}).get("cache_key"), r.get("data_change_allowed")) for r in manifest["restarts"]] \
        == [("key-aaa", None), ("key-bbb", None), ("key-bbb", True), ("key-bbb", None), ("key-aaa", None)]


@pytest.mark.parametrize("secret", ["tok_supersecret", 'pässwörd"1\\'])
def test_secrets_never_reach_the_manifest(tmp_path, secret):
    register_secret(secret)
    manifest = start_manifest(tmp_path, make_config(tmp_path), resume_step=None)
    manifest["data"] = {"files": [{"source": f"postgresql://ann:pw123@db/x :: SELECT 1 -- {secret}"}]}
    finish_manifest(tmp_path, manifest, "finished")
    text = (tmp_path / "manifest.json").read_text()
    assert "pw123" not in text and secret not in json.loads(text)["data"]["files"][0]["source"]
    assert "ann:***@db" in text and "-- ***" in text


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
