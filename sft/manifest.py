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

import sft
from sft.files import read_json, write_json_atomic
from sft.rundir import MANIFEST, slurm_job_key
from sft.secrets import mask

PACKAGES = ("torch", "transformers", "peft", "accelerate", "datasets", "tokenizers", "safetensors", "pydantic")
DEFAULT_PROVENANCE_FILE = "/opt/sft/provenance.json"
SLURM_VARIABLES = ("SLURM_JOB_ID", "SLURM_JOB_NAME", "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID", "SLURM_RESTART_COUNT",
                   "SLURM_JOB_NODELIST", "SLURM_NNODES", "SLURM_JOB_PARTITION", "SLURM_CLUSTER_NAME")


def package_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {"python": platform.python_version(), "sft": sft.__version__}
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


def start_manifest(run_dir: Path, config, resumed: bool, resume_step: int | None) -> dict:
    """Create manifest.json for a new run, or record a restart in an existing one."""
    now = datetime.now().astimezone().isoformat(timespec="seconds")
    manifest = read_json(run_dir / MANIFEST) if resumed else {}
    if "restarts" in manifest:  # a full manifest from an earlier start (not just the claim of the directory)
        manifest["restarts"].append({"time": now, "slurm_job": slurm_job_key(),
                                     "slurm_restart_count": os.environ.get("SLURM_RESTART_COUNT"),
                                     "resumed_from_step": resume_step, "host": socket.gethostname()})
        manifest["status"] = "running"
    else:
        manifest = {"sft_version": sft.__version__, "name": run_dir.name, "name_template": config.output.name,
                    "config_file": str(config.config_path), "status": "running", "started": now, "finished": None,
                    "seed": config.training.seed, "slurm_job": slurm_job_key(), "slurm": slurm_environment(),
                    "host": socket.gethostname(), "platform": platform.platform(), "versions": package_versions(),
                    "accelerator": accelerator_info(), "image": image_provenance(),
                    "git": git_commit(config.config_path.parent) if config.config_path else None,
                    "data": {}, "restarts": [], "results": {}}
    write_manifest(run_dir, manifest)
    return manifest


def record_data(manifest: dict, prepared) -> None:
    """Format, labels, content hashes of every source (SQL: of the rows read), the data summary and cache key."""
    manifest["data"] = {"format": prepared.data_format, "label_names": prepared.label_names,
                        "train_examples": len(prepared.train), "eval_examples": len(prepared.eval or []),
                        "files": [asdict(f) for f in prepared.files], "summary": prepared.summary,
                        "cache_key": prepared.cache_key}


def write_manifest(run_dir: Path, manifest: dict) -> None:
    # Through mask(): database URLs and tokens must not land in a file that gets shared with the model.
    write_json_atomic(run_dir / MANIFEST, json.loads(mask(json.dumps(manifest, default=str))))


def finish_manifest(run_dir: Path, manifest: dict, status: str, results: dict | None = None) -> None:
    manifest["status"] = status
    manifest["finished" if status == "finished" else "stopped"] = datetime.now().astimezone().isoformat(timespec="seconds")
    if results:
        manifest["results"] = results
    write_manifest(run_dir, manifest)
