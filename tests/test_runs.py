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
    assert main(["runs", str(output)]) == 0
    lines = capsys.readouterr().out.splitlines()
    header = re.split(r"\s{2,}", lines[0])
    assert header == ["RUN", "STATUS", "STEPS", "BEST", "AGE", "SLURM_JOB", "ENDED", "SAVE"]
    rows = [dict(zip(header, re.split(r"\s{2,}", line))) for line in lines[1:]]
    return {row["RUN"]: row for row in rows}


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
