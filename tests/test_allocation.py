"""When a session's allocation ends: durations, times and epoch seconds; SFT_JOB_END, training.stop_at and squeue,
the earliest winning; a bad training.stop_at refused at load with its key."""
from datetime import datetime

import pytest

from sft.allocation import allocation_end, parse_end
from sft.config import Config
from sft.errors import UserError

NOW = 1_800_000_000.0


@pytest.mark.parametrize("text, end", [("3h30m", NOW + 12600), ("90m", NOW + 5400), ("45s", NOW + 45),
                                       ("1d2h", NOW + 93600), ("2026-12-07T18:00:00+00:00", 1796666400.0)])
def test_durations_count_from_now_and_times_are_absolute(text, end):
    assert parse_end(text, NOW) == end


def test_a_time_without_zone_is_local_and_epoch_seconds_only_where_allowed():
    assert parse_end("2026-12-07T18:00", NOW) == datetime(2026, 12, 7, 18).timestamp()
    assert parse_end("1796666400", NOW, epoch_allowed=True) == 1796666400.0
    for text in ("1796666400", "", "soon", "3h30", "m"):
        with pytest.raises(ValueError, match="neither a duration"):
            parse_end(text, NOW)


@pytest.fixture
def no_slurm(monkeypatch):
    for name in ("SFT_JOB_END", "SLURM_JOB_ID"):
        monkeypatch.delenv(name, raising=False)


def test_the_earliest_end_wins(no_slurm, monkeypatch):
    assert allocation_end(None, NOW) is None
    assert allocation_end("1h", NOW) == (NOW + 3600, "training.stop_at")
    monkeypatch.setenv("SFT_JOB_END", str(int(NOW + 600)))  # what the sbatch scripts pass
    assert allocation_end("1h", NOW) == (NOW + 600, "SFT_JOB_END")
    assert allocation_end("5m", NOW) == (NOW + 300, "training.stop_at")
    monkeypatch.setenv("SFT_JOB_END", "whenever")  # warned about and ignored, not fatal to a running job
    assert allocation_end("5m", NOW) == (NOW + 300, "training.stop_at")


def test_in_a_slurm_job_without_the_scripts_squeue_answers(no_slurm, monkeypatch, tmp_path):
    squeue = tmp_path / "squeue"
    squeue.write_text('#!/bin/sh\n[ "$*" = "-h -j 4242 -o %e" ] && echo 2026-12-07T18:00:00\n')
    squeue.chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    assert allocation_end(None, NOW) == (datetime(2026, 12, 7, 18).timestamp(), "squeue")
    monkeypatch.setenv("SLURM_JOB_ID", "4243")  # squeue prints nothing: no known end
    assert allocation_end(None, NOW) is None


def test_stop_at_is_checked_at_load_and_an_unquoted_yaml_time_is_kept(tmp_path):
    import yaml

    from sft.config import load_config

    settings = {"task": "causal_lm", "model": {"name": "m"}, "data": {"train": "a"}}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(settings) + "training:\n  stop_at: 2026-12-07T18:00:00\n")
    assert load_config(path).training.stop_at == "2026-12-07T18:00:00"
    with pytest.raises(UserError, match=r"training.stop_at: .*'3 hours' is neither a duration \(3h30m"):
        load_config(path, ["training.stop_at=3 hours"])
    assert Config.model_validate({**settings, "training": {"stop_at": "3h30m"}}).training.stop_at == "3h30m"
