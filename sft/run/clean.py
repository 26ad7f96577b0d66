"""`sft clean RUN_DIR`: free the space a finished run no longer needs — its checkpoints (resume points of a run that
is done) and its tokenized data cache — keeping final/, config.yaml, manifest.json, metrics, logs and the report.

    sft clean runs/demo-20261125 --dry-run   # say what would go and how much it frees
    sft clean runs/demo-20261125
"""
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from sft.errors import UserError
from sft.run import manifest as manifests
from sft.run.checkpoints import FINAL
from sft.run.directory import take_over
from sft.run.lock import LOCK


@dataclass
class Cleaned:
    removed: dict[str, int] = field(default_factory=dict)  # what → bytes
    kept: list[str] = field(default_factory=list)  # what stays in the run directory
    notes: list[str] = field(default_factory=list)  # caches left in place, and why

    @property
    def freed(self) -> int:
        return sum(self.removed.values())


def clean(run_dir: str | Path, dry_run: bool = False) -> Cleaned:
    path = Path(run_dir)
    if not (path / manifests.MANIFEST).is_file():
        raise UserError(f"{path}: not an sft run directory (no {manifests.MANIFEST}); list runs with `sft runs`")
    # Owning run.lock refuses while a run is live, and keeps a run (e.g. train --overwrite) from starting meanwhile.
    owned = take_over(path)
    try:
        try:
            manifest = manifests.read_manifest(path)
        except ValueError as error:
            raise UserError(f"{path / manifests.MANIFEST}: unreadable ({error}); clean needs it to tell whether the "
                            f"run finished") from None
        status = manifest.get("status")
        if status in ("starting", "running"):  # no live owner (we own it now): killed outright, as `sft runs` says
            status = "killed"
        if status != "finished":
            raise UserError(f"{path}: the run is {status}, not finished; its checkpoints are where it resumes, so "
                            f"clean leaves them: resume the run to finish it, or delete the folder if you give it up")
        result = Cleaned()
        checkpoints = path / "checkpoints"
        if checkpoints.exists() and not (path / FINAL).is_dir():
            raise UserError(f"{path}: final/ is missing, so its checkpoints are the only trained model left and clean "
                            f"leaves them; put the model back in final/, or delete the folder if you give the run up")
        if checkpoints.exists():
            result.removed[f"{checkpoints}/"] = size_of(checkpoints)
            if not dry_run:
                shutil.rmtree(checkpoints)
        cache_folder, note = _data_cache(path, manifest)
        if cache_folder:
            size = size_of(cache_folder)
            if dry_run or _remove_cache(cache_folder):
                result.removed[f"tokenized data cache {cache_folder}/"] = size
            else:
                note = f"kept the tokenized data cache {cache_folder}: another process is building it right now"
        if note:
            result.notes.append(note)
        result.kept = sorted(p.name + ("/" if p.is_dir() else "") for p in path.iterdir()
                             if p.name != LOCK and p != checkpoints)
        return result
    finally:
        owned.release()


def size_of(path: Path) -> int:
    """Bytes in the files under PATH (links not followed)."""
    if not path.is_dir():
        return path.lstat().st_size
    return sum((Path(folder) / name).lstat().st_size for folder, _, files in os.walk(path) for name in files)


def _data_cache(path: Path, manifest: dict) -> tuple[Path | None, str | None]:
    """The run's tokenized data in the cache, unless an unfinished run beside it uses the same data (its torchrun
    processes may be about to read it). Any other run that needs it again tokenizes it again: nothing is lost.

    The folder the run recorded, else the same key under this environment's cache: a run trained in the container
    recorded /cache/..., which the host sees where SFT_CACHE_DIR (and so HF_HOME) points."""
    from sft.data import cache
    from sft.run.directory import run_config

    data = manifest.get("data") or {}
    key, recorded = data.get("cache_key"), data.get("cache_folder")
    if not key:
        return None, None
    here = cache.cache_root(run_config(path)) / "tokenized" / key
    folder = next((f for f in (Path(recorded) if recorded else None, here) if f and f.is_dir()), None)
    if folder is None:
        if recorded and Path(recorded) != here:
            return None, (f"no tokenized data cache at {recorded} (recorded by the run) or {here}: removed already, "
                          f"or it is where the run trained (the container's /cache): clean there or set HF_HOME")
        return None, None
    users = [sibling.name for sibling in path.parent.iterdir() if sibling != path and _unfinished_user(sibling, key)]
    if users:
        return None, f"kept the tokenized data cache {folder}: unfinished run(s) {', '.join(users)} use it"
    return folder, None


def _unfinished_user(run_dir: Path, key: str) -> bool:
    try:
        manifest = manifests.read_manifest(run_dir) if run_dir.is_dir() else None
    except (OSError, ValueError):
        return False
    return bool(manifest) and manifest.get("status") != "finished" and \
        (manifest.get("data") or {}).get("cache_key") == key


def _remove_cache(folder: Path) -> bool:
    """Under the cache's build lock, so a process building the same key is never cut short; False when one is."""
    from filelock import Timeout

    from sft.data import cache

    try:
        with cache.build_lock(folder, wait_minutes=0):
            shutil.rmtree(folder)
    except Timeout:
        return False
    return True
