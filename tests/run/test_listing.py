"""sft runs: one line per run directory with the status a user needs (a live owner of run.lock is running, a
"running" manifest without one was killed), steps, best evaluation, age and Slurm job."""
import json
import re
import signal
from datetime import datetime, timedelta
from pathlib import Path

from sft.cli import main
from sft.files import write_json_atomic


def make_run(output: Path, name: str, status: str, hours_ago: float, job: str | None = None,
             metrics: list[dict] = (), restarts: list[dict] = (), sessions: list[dict] = ()) -> Path:
    path = output / name
    path.mkdir(parents=True)
    # Ages from the moment of writing: the listing follows within seconds, whenever the test itself runs.
    started = (datetime.now().astimezone() - timedelta(hours=hours_ago)).isoformat(timespec="seconds")
    write_json_atomic(path / "manifest.json", {"status": status, "name": name, "started": started, "slurm_job": job,
                                               "restarts": list(restarts), "sessions": list(sessions)})
    (path / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in metrics))
    (path / "run.lock").touch()
    return path


def listed(capsys, output: Path) -> dict[str, dict[str, str]]:
    return listed_with_flags(capsys, output)[0]


def listed_with_flags(capsys, output: Path) -> tuple[dict[str, dict[str, str]], list[str]]:
    """The table's rows by run name, and the lines flagging odd runs (stderr)."""
    assert main(["runs", str(output)]) == 0
    captured = capsys.readouterr()
    lines = captured.out.splitlines()
    header = re.split(r"\s{2,}", lines[0])
    assert header == ["RUN", "STATUS", "STEPS", "BEST", "AGE", "SLURM_JOB", "ENDED", "SAVE"]
    rows = [dict(zip(header, re.split(r"\s{2,}", line))) for line in lines[1:]]
    return {row["RUN"]: row for row in rows}, captured.err.splitlines()


def test_each_state_is_told_apart(tmp_path, run_owner, capsys):
    output = tmp_path / "runs"
    evaluations = [{"step": 10, "loss": 0.9}, {"step": 10, "eval_loss": 0.8, "eval_accuracy": 0.7},
                   {"step": 20, "loss": 0.5}, {"step": 20, "eval_loss": 0.6, "eval_accuracy": 0.9},
                   {"step": 30, "loss": 0.2}, {"step": 30, "eval_loss": 0.7, "eval_accuracy": 0.85}]
    make_run(output, "done", "finished", 50, job="4242", metrics=evaluations + [{"step": 30, "train_runtime": 9.1}],
             sessions=[{"ended_by": "wall-time guard", "checkpoint_saves_s": [3.5, 41.25]},
                       {"ended_by": "SIGUSR1", "checkpoint_saves_s": [12.0]},
                       {"ended_by": "finished", "checkpoint_saves_s": [], "final_save_s": 2.0}])
    # Resumed in a new job after a preemption: the job that ran last is shown.
    make_run(output, "preempted", "preempted", 5, job="100", metrics=[{"step": 3, "loss": 2.0}, {"step": 3,
                                                                                                  "eval_loss": 1.9}],
             restarts=[{"slurm_job": "101"}])
    make_run(output, "failed", "failed", 29.6 / 60, metrics=[{"step": 1, "loss": 3.0}])  # "30m" for a minute
    make_run(output, "ctrl-c", "interrupted", 0.2)
    live = make_run(output, "live", "running", 2, metrics=[{"step": 7, "loss": 1.0}])
    run_owner(live)
    preparing = make_run(output, "preparing", "starting", 0.01)
    run_owner(preparing)
    killed = make_run(output, "killed", "running", 1, metrics=[{"step": 4, "loss": 1.5}])
    owner = run_owner(killed)
    owner.send_signal(signal.SIGKILL)  # the flock goes with the process; run.lock still names it
    owner.wait()
    (output / "not-a-run").mkdir()
    (output / "broken").mkdir()
    (output / "broken" / "manifest.json").write_text("{")

    runs = listed(capsys, output)
    assert list(runs) == ["done", "preempted", "live", "killed", "failed", "ctrl-c", "preparing", "broken"]
    assert {name: row["STATUS"] for name, row in runs.items()} == {
        "done": "finished", "preempted": "preempted", "failed": "failed", "ctrl-c": "interrupted",
        "live": "running", "preparing": "running", "killed": "killed", "broken": "unreadable manifest"}
    assert runs["done"] == {"RUN": "done", "STATUS": "finished", "STEPS": "30", "BEST": "eval_accuracy 0.9 @ 20",
                            "AGE": "2d", "SLURM_JOB": "4242", "ENDED": "guard,SIGUSR1,finished", "SAVE": "41.2s"}
    assert (runs["preempted"]["STEPS"], runs["preempted"]["BEST"], runs["preempted"]["SLURM_JOB"]) == \
        ("3", "eval_loss 1.9 @ 3", "101")
    assert (runs["live"]["STEPS"], runs["live"]["BEST"], runs["live"]["AGE"]) == ("7", "-", "2h")
    assert (runs["preparing"]["STEPS"], runs["preparing"]["SLURM_JOB"], runs["preparing"]["ENDED"],
            runs["preparing"]["SAVE"]) == ("-", "-", "-", "-")
    assert runs["failed"]["AGE"] == "30m" and runs["killed"]["STEPS"] == "4"
    # Listing only reads: the killed run's lock still names its dead owner, and nothing new was written.
    assert json.loads((killed / "run.lock").read_text())["pid"] and not list(output.glob("*/.run.lock*"))


def test_missing_output_dir_is_one_line(tmp_path, capsys):
    assert main(["runs", str(tmp_path / "nowhere")]) == 2
    assert capsys.readouterr().err.strip() == f"sft: error: {tmp_path / 'nowhere'}: no such directory; pass your " \
                                              f"config's output.dir (default: runs)"
    (tmp_path / "empty").mkdir()
    assert main(["runs", str(tmp_path / "empty")]) == 0
    assert capsys.readouterr().out.strip() == f"sft: no runs in {tmp_path / 'empty'}"


def set_manifest(run_dir: Path, **fields) -> None:
    write_json_atomic(run_dir / "manifest.json", {**json.loads((run_dir / "manifest.json").read_text()), **fields})


def test_a_start_time_that_is_not_text_is_flagged_and_the_other_runs_listed(tmp_path, capsys):
    output = tmp_path / "runs"
    make_run(output, "good", "finished", 3, job="7", metrics=[{"step": 5, "eval_loss": 0.5}])
    set_manifest(make_run(output, "odd", "finished", 1), started=1733500000)
    runs, flags = listed_with_flags(capsys, output)
    assert list(runs) == ["good", "odd"]  # oldest first; the run without a time last
    assert runs["good"] == {"RUN": "good", "STATUS": "finished", "STEPS": "5", "BEST": "eval_loss 0.5 @ 5",
                            "AGE": "3h", "SLURM_JOB": "7", "ENDED": "-", "SAVE": "-"}
    assert (runs["odd"]["STATUS"], runs["odd"]["AGE"]) == ("finished", "?")
    assert flags == ["sft: odd: manifest.json: started 1733500000 is not an ISO time"]


def test_a_null_metrics_line_is_flagged_and_the_rest_of_the_file_read(tmp_path, capsys):
    output = tmp_path / "runs"
    make_run(output, "good", "finished", 3, metrics=[{"step": 5, "loss": 1.0}])
    odd = make_run(output, "odd", "finished", 1)
    (odd / "metrics.jsonl").write_text('{"step": 2, "eval_loss": 0.9}\nnull\n{"step": 4, "loss": 0.5}\n')
    runs, flags = listed_with_flags(capsys, output)
    assert runs["good"]["STEPS"] == "5"
    assert (runs["odd"]["STEPS"], runs["odd"]["BEST"]) == ("4", "eval_loss 0.9 @ 2")
    assert flags == ["sft: odd: metrics.jsonl:2: null is not a record; left out"]


def test_a_time_without_time_zone_beside_aware_ones_is_taken_as_local_time(tmp_path, capsys):
    output = tmp_path / "runs"
    make_run(output, "aware", "finished", 3)
    naive = (datetime.now() - timedelta(hours=5)).isoformat(timespec="seconds")
    set_manifest(make_run(output, "naive", "finished", 0), started=naive)
    runs, flags = listed_with_flags(capsys, output)
    assert list(runs) == ["naive", "aware"] and runs["naive"]["AGE"] == "5h"
    assert flags == [f"sft: naive: manifest.json: started {naive} has no time zone; taken as local time"]


def test_a_manifest_of_another_shape_is_flagged_and_the_other_runs_listed(tmp_path, capsys):
    output = tmp_path / "runs"
    make_run(output, "good", "finished", 3)
    set_manifest(make_run(output, "odd", "finished", 1), restarts=[3])
    runs, flags = listed_with_flags(capsys, output)
    assert runs["good"]["STATUS"] == "finished" and runs["odd"]["STATUS"] == "unreadable manifest"
    assert len(flags) == 1 and flags[0].startswith("sft: odd: manifest.json has an unexpected shape (AttributeError")
