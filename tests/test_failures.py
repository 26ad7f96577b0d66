"""Nothing lost: a non-finite loss, gradient or weight and a full disk stop the run with one clear line, keep the last
good checkpoint, and the run resumes (or restarts from a chosen checkpoint); the final model appears whole or not at
all."""
import json
import os
import subprocess
from pathlib import Path

import pytest
from conftest import tiny_lm_config

from sft.errors import EXIT_USER_ERROR


def train_cli(config_path: Path, capsys, *args: str) -> tuple[int, str]:
    """`sft train CONFIG [ARGS]` in this process (the CLI's own error handling), with its exit code and stderr."""
    from sft.cli import main

    code = main(["train", str(config_path), *args])
    stderr = capsys.readouterr().err  # the run's log lines, then any error
    assert "Traceback" not in stderr and stderr.count("sft: error") <= 1, stderr
    return code, stderr


def complete_checkpoints(run_dir: Path) -> list[str]:
    from sft.run import checkpoints

    return [path.name for path in checkpoints.complete_checkpoints(run_dir / "checkpoints")]


def manifest(run_dir: Path) -> dict:
    return json.loads((run_dir / "manifest.json").read_text())


def finite_weights(folder: Path) -> bool:
    import torch
    from safetensors.torch import load_file

    return all(torch.isfinite(t).all() for file in folder.glob("*.safetensors") for t in load_file(file).values())


def test_non_finite_loss_stops_at_the_step_and_the_last_good_checkpoint_resumes(tiny_causal_lm, tiny_chat_data,
                                                                                 tmp_path, write_config, capsys,
                                                                                 monkeypatch):
    """The loss of step 5 is made nan. Step 6 is a checkpoint step but not a logging step (every 4): the run must
    check the loss of steps 5-6 before writing checkpoint-6 (with nan weights), and stop there."""
    from transformers import Trainer

    compute_loss = Trainer.compute_loss

    def nan_at_step_5(self, model, inputs, *args, **kwargs):
        loss = compute_loss(self, model, inputs, *args, **kwargs)
        return loss * float("nan") if self.state.global_step == 4 else loss

    config_path = write_config(tiny_lm_config(tiny_causal_lm, tiny_chat_data, tmp_path / "runs", max_steps=8,
                                              save_steps=3, save_total_limit=5, logging_steps=4))
    run_dir = tmp_path / "runs" / "tiny"
    monkeypatch.setattr(Trainer, "compute_loss", nan_at_step_5)
    code, stderr = train_cli(config_path, capsys)

    assert code == EXIT_USER_ERROR, stderr
    assert ("sft: error: training: the training loss is nan at step 6 (the mean over steps 5-6); stopped "
            "(checkpoint-3 is the last good checkpoint). Restart from it with a lower learning rate: sft train CONFIG "
            "output.name=tiny --from-checkpoint checkpoint-3 training.learning_rate=LOWER") in stderr
    assert [p.name for p in (run_dir / "checkpoints").iterdir()] == ["checkpoint-3"]
    assert complete_checkpoints(run_dir) == ["checkpoint-3"]
    assert finite_weights(run_dir / "checkpoints" / "checkpoint-3")
    assert manifest(run_dir)["status"] == "failed" and "nan at step 6" in manifest(run_dir)["error"]
    assert not (run_dir / "final").exists()

    monkeypatch.setattr(Trainer, "compute_loss", compute_loss)  # a transient fault: resuming goes on from step 3
    code, stderr = train_cli(config_path, capsys)
    assert code == 0, stderr
    assert manifest(run_dir)["status"] == "finished" and manifest(run_dir)["restarts"][0]["resumed_from_step"] == 3
    losses = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in losses if "loss" in r] == [3, 4, 6, 8]  # a log before each checkpoint, too
    assert finite_weights(run_dir / "final")


def poisoned_training_step(step: int, what: str):
    """Trainer.training_step that, in optimizer step STEP, makes one weight's gradient infinite (its loss stays
    finite, its update writes nan) or, after the backward pass, the weight itself nan (loss and gradient norm finite:
    an update that overflowed the weights)."""
    from transformers import Trainer

    training_step = Trainer.training_step

    def poisoned(self, model, inputs, *args, **kwargs):
        loss = training_step(self, model, inputs, *args, **kwargs)
        if self.state.global_step + 1 == step:
            weight = dict(model.named_parameters())["model.layers.1.mlp.down_proj.weight"]
            if what == "gradient":
                weight.grad.mul_(float("inf"))
            else:
                weight.data[0, 0] = float("nan")
        return loss

    return poisoned


@pytest.mark.parametrize("what,message", [
    ("gradient", "training: the gradient norm is inf at step 4; stopped (checkpoint-2 is the last good checkpoint)"),
    ("weight", "training: the weights hold nan or inf after step 4 (model.layers.1.mlp.down_proj.weight); stopped "
               "(checkpoint-2 is the last good checkpoint)"),
])
def test_non_finite_gradient_or_weights_stop_before_a_checkpoint_is_marked_complete(
        tiny_causal_lm, tiny_chat_data, tmp_path, write_config, capsys, monkeypatch, what, message):
    """Step 4 is a checkpoint step whose logged loss is finite. An infinite gradient stops the run at its log; nan
    weights with a finite gradient stop it at the checkpoint's weight check. Either way checkpoint-4 is never marked
    complete, so the rotation (save_total_limit 1) keeps checkpoint-2, the one the message names."""
    from transformers import Trainer

    config_path = write_config(tiny_lm_config(tiny_causal_lm, tiny_chat_data, tmp_path / "runs", max_steps=6,
                                              save_steps=2, save_total_limit=1, logging_steps=4))
    run_dir = tmp_path / "runs" / "tiny"
    monkeypatch.setattr(Trainer, "training_step", poisoned_training_step(4, what))
    code, stderr = train_cli(config_path, capsys)

    assert code == EXIT_USER_ERROR, stderr
    assert f"sft: error: {message}. Restart from it with a lower learning rate" in stderr
    assert [p.name for p in (run_dir / "checkpoints").iterdir()] == ["checkpoint-2"] == complete_checkpoints(run_dir)
    assert finite_weights(run_dir / "checkpoints" / "checkpoint-2")
    assert manifest(run_dir)["status"] == "failed"


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_the_weight_check_names_each_non_finite_trained_parameter(bad):
    """Any nan or inf value is found (the check sums each tensor), large finite weights pass, and a frozen weight is
    not looked at: an update never changes it."""
    import torch

    from sft.training.callbacks import non_finite_parameters

    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4), torch.nn.Linear(4, 4))
    with torch.no_grad():
        model[0].weight.fill_(1e37)
        model[2].weight[0, 0] = bad
        model[2].weight.requires_grad_(False)
    assert non_finite_parameters(model) is None
    with torch.no_grad():
        model[1].bias[2] = bad
        model[1].weight[1, 1] = -bad
    assert non_finite_parameters(model) == ["1.weight", "1.bias"]


def test_a_restart_from_a_chosen_checkpoint_moves_later_ones_aside_and_may_lower_the_learning_rate(
        tiny_causal_lm, tiny_chat_data, tmp_path, write_config, capsys, monkeypatch):
    """A run stopped by a nan loss at step 6 after checkpoints 2 and 4 restarts from checkpoint-2 at half the
    learning rate, in Slurm job 77: checkpoint-4 is moved aside (not deleted), the rate logged from step 3 on is
    half the uninterrupted run's at each step, and the manifest records the restart as no longer exact. Preempted
    in step 5, the requeued job 77 (same arguments) resumes from checkpoint-5, not from checkpoint-2 again."""
    from test_trainer import signal_in_step
    from transformers import Trainer

    from sft.training.trainer import Preempted

    def config(name: str) -> Path:
        settings = tiny_lm_config(tiny_causal_lm, tiny_chat_data, tmp_path / "runs", max_steps=6, save_steps=2,
                                  save_total_limit=5, warmup_ratio=0.0)
        settings["output"]["name"] = name
        return write_config(settings, f"{name}.yaml")

    code, stderr = train_cli(config("reference"), capsys)
    assert code == 0, stderr
    training_step = Trainer.training_step
    monkeypatch.setattr(Trainer, "training_step", poisoned_training_step(5, "gradient"))
    config_path, run_dir = config("tiny"), tmp_path / "runs" / "tiny"
    code, stderr = train_cli(config_path, capsys)
    assert code == EXIT_USER_ERROR and "checkpoint-4 is the last good checkpoint" in stderr, stderr
    four = (run_dir / "checkpoints" / "checkpoint-4" / "model.safetensors").read_bytes()

    monkeypatch.undo()
    code, stderr = train_cli(config_path, capsys, "--from-checkpoint", "checkpoint-2", "--overwrite")
    assert code == EXIT_USER_ERROR and "sft: error: --from-checkpoint restarts a run, --overwrite replaces it" in stderr
    code, stderr = train_cli(config_path, capsys, "--from-checkpoint", "checkpoint-6")
    assert code == EXIT_USER_ERROR
    assert ("sft: error: --from-checkpoint checkpoint-6: " + str(run_dir) + " has no complete checkpoint of that "
            "name (complete ones: checkpoint-2, checkpoint-4); name one of them") in stderr
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    restart = ("--from-checkpoint", "checkpoint-2", "training.learning_rate=5e-4")
    monkeypatch.setattr(Trainer, "training_step", signal_in_step(5))
    code, stderr = train_cli(config_path, capsys, *restart)
    assert code == Preempted.exit_code, stderr
    monkeypatch.setattr(Trainer, "training_step", training_step)
    code, stderr = train_cli(config_path, capsys, *restart)
    assert code == 0, stderr

    [aside] = run_dir.glob("checkpoints.abandoned-*")
    assert (aside / "checkpoint-4" / "model.safetensors").read_bytes() == four
    assert (aside / "checkpoint-4" / ".complete").is_file()
    rates = {name: {r["step"]: r["learning_rate"] for r in map(json.loads, (tmp_path / "runs" / name /
                                                                            "metrics.jsonl").read_text().splitlines())
                    if "learning_rate" in r} for name in ("reference", "tiny")}
    assert sorted(rates["tiny"]) == sorted(rates["reference"]) == [1, 2, 3, 4, 5, 6]
    assert all(rates["tiny"][step] == rates["reference"][step] for step in (1, 2))
    assert all(rates["tiny"][step] == pytest.approx(rates["reference"][step] / 2) for step in (3, 4, 5, 6))
    restart, requeue = manifest(run_dir)["restarts"][-2:]
    assert restart["resumed_from_step"] == 2 and restart["from_checkpoint"] == "checkpoint-2"
    assert restart["moved_aside"] == aside.name and restart["exact"] is False
    assert restart["changed"] == {"training.learning_rate": {"from": 0.001, "to": 0.0005}}
    assert requeue["resumed_from_step"] == 5 and "from_checkpoint" not in requeue
    assert manifest(run_dir)["status"] == "finished" and finite_weights(run_dir / "final")


def test_a_resumed_run_names_the_steps_since_it_resumed(tmp_path):
    """Resumed from checkpoint-3, a nan first logged at step 6 covers steps 4-6, not steps since the first start."""
    from transformers import TrainerControl, TrainerState, TrainingArguments

    from sft.errors import UserError
    from sft.training.callbacks import NonFiniteLossCallback

    callback, args = NonFiniteLossCallback(), TrainingArguments(output_dir=str(tmp_path), report_to="none")
    state, control = TrainerState(global_step=3), TrainerControl()
    callback.on_step_begin(args, state, control)
    state.global_step = 6
    with pytest.raises(UserError, match=r"the training loss is inf at step 6 \(the mean over steps 4-6\); stopped "
                                        r"\(no checkpoint was written yet\)"):
        callback.on_log(args, state, control, logs={"loss": float("inf")})


def truncated_then_disk_full(real_save, where: str):
    """safetensors' save_file as on a disk that fills up under `where`: half the file, then its real error."""
    from safetensors import SafetensorError

    def save(tensors, filename, *args, **kwargs):
        real_save(tensors, filename, *args, **kwargs)
        if where in str(filename):
            with open(filename, "r+b") as f:
                f.truncate(os.path.getsize(filename) // 2)
            raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    return save


@pytest.mark.parametrize("where,what", [("checkpoint-4", "checkpoint-4"), (".final.partial", "the final model")])
def test_disk_full_while_saving_keeps_the_previous_checkpoint_and_resumes(tiny_causal_lm, tiny_chat_data, tmp_path,
                                                                          write_config, capsys, monkeypatch, where,
                                                                          what):
    import transformers.modeling_utils

    real_save = transformers.modeling_utils.safe_save_file
    config_path = write_config(tiny_lm_config(tiny_causal_lm, tiny_chat_data, tmp_path / "runs", max_steps=4,
                                              save_steps=2, save_total_limit=1))
    run_dir = tmp_path / "runs" / "tiny"
    kept = "checkpoint-2" if where == "checkpoint-4" else "checkpoint-4"
    monkeypatch.setattr(transformers.modeling_utils, "safe_save_file", truncated_then_disk_full(real_save, where))
    code, stderr = train_cli(config_path, capsys)

    assert code == EXIT_USER_ERROR, stderr
    assert (f"sft: error: output.dir: disk full or quota exceeded while writing {what} in {run_dir} ({kept} is "
            f"intact); free space there") in stderr
    assert stderr.rstrip().endswith(f"resume with: sft train {config_path} output.name=tiny")
    # The half-written one is gone (its space given back), the complete one untouched.
    assert [p.name for p in (run_dir / "checkpoints").iterdir()] == [kept] == complete_checkpoints(run_dir)
    assert finite_weights(run_dir / "checkpoints" / kept)
    assert not (run_dir / ".final.partial").exists() and not (run_dir / "final").exists()
    assert manifest(run_dir)["status"] == "failed" and "disk full" in manifest(run_dir)["error"]

    monkeypatch.setattr(transformers.modeling_utils, "safe_save_file", real_save)
    code, stderr = train_cli(config_path, capsys)
    assert code == 0, stderr
    assert manifest(run_dir)["status"] == "finished" and (run_dir / "final" / ".complete").is_file()


def test_the_final_model_is_written_aside_marked_complete_then_moved(tiny_causal_lm, tiny_chat_data, tmp_path,
                                                                     write_config, monkeypatch):
    """Watched at the moment it moves: complete in its temporary folder, final/ not there yet; and what a killed
    attempt left (a half-written temporary folder, an older final/) is replaced."""
    from sft.config import load_config
    from sft.run import checkpoints
    from sft.training.trainer import run_training

    run_dir = tmp_path / "runs" / "tiny"
    seen = {}
    publish_final = checkpoints.publish_final

    def watch(partial: Path) -> Path:
        seen.update(partial=partial.name, files=sorted(p.name for p in partial.iterdir()),
                    final_exists=(run_dir / "final").exists())
        return publish_final(partial)

    monkeypatch.setattr("sft.training.trainer.publish_final", watch)
    config_path = write_config(tiny_lm_config(tiny_causal_lm, tiny_chat_data, tmp_path / "runs", max_steps=2))
    run_training(load_config(config_path))
    assert seen["partial"] == ".final.partial" and not seen["final_exists"]
    assert "model.safetensors" in seen["files"] and ".complete" not in seen["files"]
    assert "training_args.bin" not in seen["files"]  # a pickle: the run's config.yaml holds the settings
    assert (run_dir / "final" / ".complete").is_file() and not (run_dir / ".final.partial").exists()

    # A kill after the move but before the manifest said finished, with a half-written retry left behind.
    (run_dir / ".final.partial").mkdir()
    (run_dir / ".final.partial" / "model.safetensors").write_bytes(b"half")
    (run_dir / "final" / "stale").write_text("from the killed attempt")
    status = manifest(run_dir) | {"status": "running"}
    (run_dir / "manifest.json").write_text(json.dumps(status))
    run_training(load_config(config_path))
    assert not (run_dir / "final" / "stale").exists() and not (run_dir / ".final.partial").exists()
    assert finite_weights(run_dir / "final") and (run_dir / "final" / ".complete").is_file()


def disk_usage(folder: Path) -> int:
    return sum(p.stat().st_blocks * 512 for p in [folder, *folder.rglob("*")])


@pytest.fixture
def small_filesystem(tmp_path):
    """Mount a tmpfs that will hold at most the bytes asked for (root only: skipped where mounting is not
    allowed, e.g. CI without privileges); unmounted at the end."""
    mounted = []

    def mount(size: int) -> Path:
        folder = tmp_path / "small-disk"
        folder.mkdir()
        result = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
                                capture_output=True, text=True)
        if result.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {result.stderr.strip()}")
        mounted.append(folder)
        return folder

    if os.geteuid() != 0:
        pytest.skip("mounting a size-limited tmpfs needs root")
    yield mount
    for folder in mounted:
        subprocess.run(["umount", "--lazy", str(folder)], check=True)  # lazy: a log handler may still hold a file


def test_a_really_full_disk_while_checkpointing_keeps_the_previous_checkpoint(tiny_causal_lm, tiny_chat_data,
                                                                              tmp_path, write_config, capsys,
                                                                              small_filesystem):
    """A real full filesystem (no injected error): whichever writer hits it (safetensors, torch.save, json) and
    however it reports it, the run stops with the disk-full line and checkpoint-1 survives."""
    measure = tiny_lm_config(tiny_causal_lm, tiny_chat_data, tmp_path / "measure", max_steps=1, save_steps=1)
    code, stderr = train_cli(write_config(measure, "measure.yaml"), capsys)
    assert code == 0, stderr
    measured = tmp_path / "measure" / "tiny"
    checkpoint = disk_usage(measured / "checkpoints" / "checkpoint-1")
    # Room for the run directory with one checkpoint, and half of the second one.
    disk = small_filesystem(disk_usage(measured) - disk_usage(measured / "final") + checkpoint // 2)

    config_path = write_config(tiny_lm_config(tiny_causal_lm, tiny_chat_data, disk, max_steps=2, save_steps=1,
                                              save_total_limit=1))
    code, stderr = train_cli(config_path, capsys)
    assert code == EXIT_USER_ERROR, stderr
    assert (f"sft: error: output.dir: disk full or quota exceeded while writing checkpoint-2 in {disk / 'tiny'} "
            f"(checkpoint-1 is intact)") in stderr
    assert [p.name for p in (disk / "tiny" / "checkpoints").iterdir()] == ["checkpoint-1"]
    assert complete_checkpoints(disk / "tiny") == ["checkpoint-1"]
    assert finite_weights(disk / "tiny" / "checkpoints" / "checkpoint-1")
