"""Provenance: what ran, on what, with which data — `sft info` and every run's manifest.json."""
import json
import os
import platform
import socket
import subprocess
from dataclasses import asdict
from datetime import datetime
from importlib import metadata
from pathlib import Path
from typing import Any

from sft.files import read_json, write_json_atomic
from sft.model.hub import hub_home
from sft.secrets import mask_values
from sft.version import __version__

MANIFEST = "manifest.json"

PACKAGES = ("torch", "transformers", "peft", "accelerate", "datasets", "tokenizers", "safetensors", "pydantic")
DEFAULT_PROVENANCE_FILE = "/opt/sft/provenance.json"
SLURM_VARIABLES = ("SLURM_JOB_ID", "SLURM_JOB_NAME", "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID", "SLURM_RESTART_COUNT",
                   "SLURM_JOB_NODELIST", "SLURM_NNODES", "SLURM_JOB_PARTITION", "SLURM_CLUSTER_NAME")


def package_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {"python": platform.python_version(), "sft": __version__}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def accelerator_info() -> dict[str, Any]:
    """CUDA build/runtime and the GPUs this process sees (imports torch: not for fast paths)."""
    import torch

    info: dict[str, Any] = {"cuda_build": torch.version.cuda, "cuda_available": torch.cuda.is_available(),
                            "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
                            "gpus": []}
    if torch.cuda.is_available():
        for index in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(index)
            info["gpus"].append({"name": props.name, "memory_gib": round(props.total_memory / 2**30, 1),
                                 "capability": f"{props.major}.{props.minor}"})
    return info


def image_provenance() -> dict[str, Any] | None:
    """The build record baked into the container image (absent when running from a venv)."""
    path = Path(os.environ.get("SFT_PROVENANCE_FILE", DEFAULT_PROVENANCE_FILE))
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def git_commit(directory: Path) -> dict[str, Any] | None:
    """Commit (and whether the tree is dirty) of the repository holding the config, when it is one."""
    try:
        commit = subprocess.run(["git", "-C", str(directory), "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(directory), "status", "--porcelain"], capture_output=True, text=True,
                               timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return {"commit": commit, "dirty": bool(dirty)}


def slurm_environment() -> dict[str, str]:
    return {name: os.environ[name] for name in SLURM_VARIABLES if name in os.environ}


def slurm_job_key() -> str | None:
    """Identifies this Slurm job across requeues (array tasks each get their own)."""
    array_job, task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    if array_job and task:
        return f"{array_job}_{task}"
    return os.environ.get("SLURM_JOB_ID")


def _now() -> str:
    return datetime.now().astimezone().isoformat(timespec="seconds")


def read_manifest(run_dir: Path) -> dict | None:
    """The run's manifest.json, or None when the directory has none."""
    path = run_dir / MANIFEST
    return read_json(path) if path.is_file() else None


def claim_run_dir(run_dir: Path, name_template: str) -> None:
    """The first manifest of a new run directory, written the moment the directory is created: a job killed at
    any later point (even before training started) finds the directory again as its own."""
    write_manifest(run_dir, {"status": "starting", "name": run_dir.name, "name_template": name_template,
                             "slurm_job": slurm_job_key(), "started": _now()})


def this_start() -> dict:
    """Where and with what this process runs: recorded for the first start and again for every restart, since a
    requeue may land on another node, other GPUs or a rebuilt image."""
    return {"time": _now(), "host": socket.gethostname(), "slurm_job": slurm_job_key(),
            "slurm_restart_count": os.environ.get("SLURM_RESTART_COUNT"), "slurm": slurm_environment(),
            "platform": platform.platform(), "versions": package_versions(), "accelerator": accelerator_info(),
            "image": image_provenance(), "hf_home": hub_home()}


def start_manifest(run_dir: Path, config, resume_step: int | None, changed_settings: dict | None = None) -> dict:
    """Fill in manifest.json for a run's first start, or record a restart (with how the previous attempt ended and
    the settings it changed, {key: {"from": old, "to": new}})."""
    manifest = read_manifest(run_dir) or {}
    start = this_start()
    if "restarts" in manifest:  # a full manifest from an earlier start (not just the claim of the directory)
        previous = {"status": manifest["status"], "stopped": manifest.pop("stopped", None),
                    "error": manifest.pop("error", None)}
        manifest["restarts"].append({**start, "resumed_from_step": resume_step,
                                     "previous": {k: v for k, v in previous.items() if v is not None},
                                     **({"changed_settings": changed_settings} if changed_settings else {})})
        manifest["status"] = "running"
    else:
        manifest = {"sft_version": __version__, "name": run_dir.name, "name_template": config.output.name,
                    "config_file": str(config.config_path), "status": "running", "started": start["time"],
                    "finished": None, "seed": config.training.seed, "slurm_job": start["slurm_job"],
                    "slurm": start["slurm"], "host": start["host"], "platform": start["platform"],
                    "versions": start["versions"], "accelerator": start["accelerator"], "image": start["image"],
                    "hf_home": start["hf_home"],
                    "git": git_commit(config.config_path.parent) if config.config_path else None,
                    "data": {}, "restarts": [], "results": {}}
    write_manifest(run_dir, manifest)
    return manifest


def record_chosen_checkpoint(run_dir: Path, manifest: dict, checkpoint: str, moved_aside: Path | None,
                             changed: dict) -> None:
    """This restart went back to an earlier checkpoint (--from-checkpoint), perhaps with changed settings: from here
    on the run is no longer the one an uninterrupted run of its config.yaml would train (`exact`)."""
    manifest["restarts"][-1].update({"from_checkpoint": checkpoint,
                                     "moved_aside": moved_aside.name if moved_aside else None,
                                     "changed": changed,
                                     "exact": not changed})
    write_manifest(run_dir, manifest)


def record_data(manifest: dict, prepared, resumed: bool, allow_change: bool) -> list[str]:
    """Format, labels, example counts, content hashes of every source (SQL: of the rows read), the data summary,
    the cache key and folder (`sft clean` may run where HF_HOME points elsewhere): in the run's own record when
    training starts from step 0, in this restart's entry when it resumes from a checkpoint (the run's record keeps
    the data it started on). Returns the sources whose content differs from what the run trained on so far ([] when
    none); `allow_change` marks such a restart as allowed."""
    record = {"format": prepared.data_format, "label_names": prepared.label_names,
              **_counts("train", prepared.train), **_counts("eval", prepared.eval),
              "files": [asdict(f) for f in prepared.files], "summary": prepared.summary,
              "cache_key": prepared.cache_key, "cache_folder": str(Path(prepared.cache_folder).absolute())}
    if manifest.get("restarts"):
        manifest["restarts"][-1]["data"] = record
    if not resumed or not manifest.get("data"):
        manifest["data"] = record
        return []
    # What the trajectory so far was trained on: the newest data a restart was allowed to change to, else the first.
    trained_on = next((restart["data"] for restart in reversed(manifest["restarts"])
                       if restart.get("data_change_allowed")), manifest["data"])
    changed = _changed_sources(trained_on["files"], record["files"])
    if changed and allow_change:
        manifest["restarts"][-1]["data_change_allowed"] = True
    return changed


def _changed_sources(before: list[dict], now: list[dict]) -> list[str]:
    if len(before) != len(now):
        return [f"the sources ({len(before)} then, {len(now)} now)"]
    return [f"{new['source']} (sha256 {old['sha256'][:12]} then, {new['sha256'][:12]} now)"
            for old, new in zip(before, now) if old["sha256"] != new["sha256"]]


def _counts(split: str, dataset) -> dict[str, int]:
    """Examples, not dataset rows: with training.max_tokens_per_batch each item is a batch of examples."""
    if dataset is None:
        return {f"{split}_examples": 0}
    examples = getattr(dataset, "examples", None)  # sft.data.TokenBudgetBatches
    if examples is None:
        return {f"{split}_examples": len(dataset)}
    return {f"{split}_examples": len(examples), f"{split}_batches": len(dataset)}


def write_manifest(run_dir: Path, manifest: dict) -> None:
    # Every string through mask(): database URLs and tokens must not land in a file that gets shared with the
    # model. Masked before JSON encoding, which would escape a secret's quotes or non-ASCII letters past mask().
    write_json_atomic(run_dir / MANIFEST, mask_values(json.loads(json.dumps(manifest, default=str))))


def finish_manifest(run_dir: Path, manifest: dict, status: str, results: dict | None = None) -> None:
    manifest["status"] = status
    manifest["finished" if status == "finished" else "stopped"] = _now()
    if results:
        manifest["results"] = results
    write_manifest(run_dir, manifest)


def record_session(manifest: dict, ended_by: str, checkpoint_saves_s: list[float], final_save_s: float | None = None,
                   seconds_left: float | None = None) -> None:
    """How this session (this start of the run) ended: finished, wall-time guard, or the signal (SIGUSR1, SIGTERM),
    with the seconds each checkpoint save and the final save took and the seconds left before the allocation's
    end, when known: what to size --signal and save_steps by (docs/slurm.md)."""
    session = {"ended": _now(), "ended_by": ended_by, "checkpoint_saves_s": [round(s, 2) for s in checkpoint_saves_s]}
    if final_save_s is not None:
        session["final_save_s"] = round(final_save_s, 2)
    if seconds_left is not None:
        session["seconds_left"] = seconds_left
    manifest.setdefault("sessions", []).append(session)


def record_failure(run_dir: Path, manifest: dict, error: BaseException) -> None:
    """A run that ended by an exception: `failed` with the error's first line, or `interrupted` for Ctrl-C."""
    manifest["status"] = "interrupted" if isinstance(error, KeyboardInterrupt) else "failed"
    manifest["stopped"] = _now()
    lines = str(error).strip().splitlines()
    manifest["error"] = f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__
    try:
        write_manifest(run_dir, manifest)
    except OSError:  # e.g. the disk that just filled up: the error itself still reaches the user
        pass
