"""Resuming: which checkpoint a run continues from, and which settings may change when it does (config.yaml)."""
import json
import logging
import re
from pathlib import Path

from sft.config import Config, flatten, resolved_yaml
from sft.errors import UserError
from sft.files import write_text_atomic
from sft.run.checkpoints import checkpoint_step, complete_checkpoints, discard_incomplete_checkpoints, restart_from
from sft.run.directory import RunDir

log = logging.getLogger("sft")


# Settings that say how long to wait, where to cache, how many processes tokenize, how often to log, how large an
# eval batch is and how many checkpoints to keep: none changes what is trained, so a resume may change them (sft's
# own errors ask to raise some). output.name may differ too: the printed resume command pins a template ({time})
# to the name it resolved to; and training.stop_at, when this session's allocation ends, may differ each session.
CHANGEABLE_ON_RESUME = ("output.name", "training.stop_at", "training.ddp_timeout", "training.logging_steps",
                        "training.eval_batch_size", "training.save_total_limit", "data.wait_minutes", "data.num_proc",
                        "data.cache_dir")


# A SQL source's timeout (data.train.timeout, data.eval[1].timeout): how long a query may take, not what it reads.
SQL_TIMEOUT = re.compile(r"data\.(train|eval)(\[\d+\])?\.timeout")


def _changeable_on_resume(key: str) -> bool:
    return key in CHANGEABLE_ON_RESUME or bool(SQL_TIMEOUT.fullmatch(key))


def may_change_on_restart(config: Config) -> tuple[str, ...]:
    """What a restart from a chosen checkpoint (--from-checkpoint) may change beyond what any resume may: the
    learning rate, the usual cure for a nan. Schedulers that adapt the rate themselves (reduce_lr_on_plateau,
    greedy) keep no base rate to change."""
    return () if config.training.lr_scheduler in ("reduce_lr_on_plateau", "greedy") else ("training.learning_rate",)


def write_run_config(run_dir: Path, config: Config, must_match: bool, may_change: tuple[str, ...] = ()) -> dict:
    """config.yaml; a run resumed from a checkpoint must keep the settings that decide its trajectory (a run that
    never reached one may change any), except those in `may_change`. Returns the settings a resume changed,
    {key: {"from": old, "to": new}}."""
    path, text = run_dir / "config.yaml", resolved_yaml(config)
    changes = {}
    if must_match and path.is_file() and path.read_text() != text:
        changes = changed_settings(path.read_text(), text)
        refused = [key for key in changes if not _changeable_on_resume(key) and key not in may_change]
        if refused:
            raise UserError(f"output: {run_dir} was started with a different config ({', '.join(refused)} changed); "
                            f"resume with the same settings, or choose a new output.name")
        changes.pop("output.name", None)
        if not changes:
            return {}
    write_text_atomic(path, text)
    return changes


def changed_settings(old_yaml: str, new_yaml: str) -> dict:
    import yaml

    old, new = flatten(yaml.safe_load(old_yaml)), flatten(yaml.safe_load(new_yaml))
    return {k: {"from": old.get(k), "to": new.get(k)} for k in sorted(old.keys() | new.keys())
            if old.get(k) != new.get(k)}


def go_back_to(run: RunDir, checkpoint: str) -> tuple[str | None, Path | None]:
    """--from-checkpoint: (the checkpoint to resume from, the folder the later ones were moved to). A requeue of the
    Slurm job that already went back to it resumes from its newest checkpoint instead (None): the requeued job has
    the same arguments, and going back again would throw away what it trained since."""
    from sft.run import manifest as manifests

    job = manifests.slurm_job_key()
    restarts = (manifests.read_manifest(run.path) or {}).get("restarts", [])
    if job and any(r.get("from_checkpoint") == checkpoint and r.get("slurm_job") == job for r in restarts):
        log.info("this Slurm job restarted from %s before: resuming from its newest checkpoint", checkpoint)
        return None, None
    return checkpoint, restart_from(run, checkpoint)


def resume_checkpoint(run: RunDir, is_main: bool, from_checkpoint: str | None) -> Path | None:
    if not run.resumed:
        return None
    complete = complete_checkpoints(run.checkpoints)
    # The chosen one by its name: rank 0 may be moving the later ones aside while the other ranks look.
    newest = run.checkpoints / from_checkpoint if from_checkpoint else complete[-1] if complete else None
    if is_main:
        for path in discard_incomplete_checkpoints(run.checkpoints):
            log.warning("removed incomplete checkpoint %s (interrupted while saving)", path.name)
        _drop_metrics_after(run.path, checkpoint_step(newest) if newest else 0)
    return newest


def _drop_metrics_after(run_dir: Path, step: int) -> None:
    """Lines logged after the checkpoint we resume from are recomputed (identically), so drop the old copies,
    and the interrupted session's closing summary (train_runtime), which the resumed session writes anew."""
    path = run_dir / "metrics.jsonl"
    if path.is_file():
        records = [json.loads(line) for line in path.read_text().splitlines() if line]
        kept = [r for r in records if r.get("step", 0) <= step and "train_runtime" not in r]
        write_text_atomic(path, "".join(json.dumps(r) + "\n" for r in kept))
