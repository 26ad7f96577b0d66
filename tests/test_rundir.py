"""Run directories: names resolved once, found again by Slurm job, finished runs protected, checkpoint markers."""
from datetime import datetime

import pytest

from sft.config import Config
from sft.errors import UserError
from sft.files import write_json_atomic
from sft.rundir import (complete_checkpoints, discard_incomplete_checkpoints, mark_complete, open_run_dir,
                        resolve_name)

NOON = datetime(2026, 11, 25, 12, 0, 0)


def make_config(tmp_path, name="sft_v1-{date}") -> Config:
    config = Config.model_validate({"task": "classification", "model": {"name": "m"}, "data": {"train": "a"},
                                    "output": {"dir": str(tmp_path / "runs"), "name": name}})
    config.config_path = tmp_path / "sft_v1.yaml"
    return config


@pytest.fixture(autouse=True)
def no_slurm(monkeypatch):
    for name in ("SLURM_JOB_ID", "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID"):
        monkeypatch.delenv(name, raising=False)


def test_name_placeholders(tmp_path):
    config = make_config(tmp_path)
    assert resolve_name("{config}-{date}-{time}", config, NOON) == "sft_v1-20261125-120000"
    with pytest.raises(UserError, match=r"output.name: .* unknown placeholder 'user'"):
        resolve_name("{user}", config, NOON)
    with pytest.raises(UserError, match="not a valid directory name"):
        resolve_name("a/b", config, NOON)


def test_unfinished_run_is_resumed_and_finished_run_refused(tmp_path):
    config = make_config(tmp_path)
    first = open_run_dir(config, overwrite=False, now=NOON)
    assert first.path == tmp_path / "runs" / "sft_v1-20261125" and not first.resumed
    write_json_atomic(first.path / "manifest.json", {"status": "running", "name_template": config.output.name})
    assert open_run_dir(config, overwrite=False, now=NOON).resumed

    write_json_atomic(first.path / "manifest.json", {"status": "finished"})
    (first.path / "final").mkdir()
    with pytest.raises(UserError, match="holds a finished run; pass --overwrite"):
        open_run_dir(config, overwrite=False, now=NOON)
    assert (first.path / "final").is_dir()
    replaced = open_run_dir(config, overwrite=True, now=NOON)
    assert not replaced.resumed and not (replaced.path / "final").exists()


def test_foreign_directory_is_never_taken_over(tmp_path):
    config = make_config(tmp_path, name="mine")
    (tmp_path / "runs" / "mine").mkdir(parents=True)
    (tmp_path / "runs" / "mine" / "thesis.tex").write_text("do not touch")
    with pytest.raises(UserError, match="exists and is not an sft run directory"):
        open_run_dir(config, overwrite=True, now=NOON)
    assert (tmp_path / "runs" / "mine" / "thesis.tex").read_text() == "do not touch"


def test_requeued_job_finds_its_directory_after_midnight(tmp_path, monkeypatch):
    config = make_config(tmp_path)
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    first = open_run_dir(config, overwrite=False, now=NOON)
    write_json_atomic(first.path / "manifest.json", {"status": "preempted", "slurm_job": "4242",
                                                     "name_template": config.output.name})
    next_day = datetime(2026, 11, 26, 0, 5)
    again = open_run_dir(config, overwrite=False, now=next_day)
    assert again.path == first.path and again.resumed
    monkeypatch.setenv("SLURM_JOB_ID", "4243")  # another job, next day: a new run
    assert open_run_dir(config, overwrite=False, now=next_day).path.name == "sft_v1-20261126"


def test_array_tasks_are_told_apart(tmp_path, monkeypatch):
    config = make_config(tmp_path, name="sweep-{time}")
    monkeypatch.setenv("SLURM_ARRAY_JOB_ID", "77")
    runs = {}
    for task, second in (("0", 1), ("1", 2)):
        monkeypatch.setenv("SLURM_ARRAY_TASK_ID", task)
        run = open_run_dir(config, overwrite=False, now=NOON.replace(second=second))
        write_json_atomic(run.path / "manifest.json", {"status": "running", "slurm_job": f"77_{task}",
                                                       "name_template": config.output.name})
        runs[task] = run.path
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "0")
    assert open_run_dir(config, overwrite=False, now=NOON.replace(second=9)).path == runs["0"] != runs["1"]


def test_only_marked_checkpoints_count_and_unmarked_ones_are_discarded(tmp_path):
    checkpoints = tmp_path / "checkpoints"
    for step in (3, 6, 9, 12):
        (checkpoints / f"checkpoint-{step}").mkdir(parents=True)
    for step in (3, 9):
        mark_complete(checkpoints / f"checkpoint-{step}")
    assert [p.name for p in complete_checkpoints(checkpoints)] == ["checkpoint-3", "checkpoint-9"]
    removed = discard_incomplete_checkpoints(checkpoints)
    assert sorted(p.name for p in removed) == ["checkpoint-12", "checkpoint-6"]
    assert sorted(p.name for p in checkpoints.iterdir()) == ["checkpoint-3", "checkpoint-9"]


def test_a_new_directory_is_claimed_with_a_first_manifest(tmp_path, monkeypatch):
    """A job killed before training started still finds its directory on restart (never 'not an sft run')."""
    monkeypatch.setenv("SLURM_JOB_ID", "99")
    config = make_config(tmp_path)
    run = open_run_dir(config, overwrite=False, now=NOON)
    (run.path / "sft_log_20261125_120000.log").write_text("started\n")
    again = open_run_dir(config, overwrite=False, now=NOON)
    assert again.path == run.path and again.resumed
