"""`sft reproduce RUN_DIR [--name NEW]`: train again from what a run recorded, next to it, then compare the two
with `sft diff`. On CPU, and on GPUs with training.deterministic, a reproduction in the same image is bit-identical.

    sft reproduce runs/baseline                  # → runs/baseline-reproduce, then the diff and its verdict
    sft reproduce /shared/alice/runs/baseline --name baseline-bob --env-file .env
"""
import copy
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

import yaml

from sft.errors import UserError
from sft.results.diff import environment_of, read_run_record, source_keys
from sft.secrets import MASK, URL_PASSWORD

log = logging.getLogger("sft")


def reproduce(run_dir: str | Path, name: str | None = None, env_file: str | None = None) -> tuple[str, bool]:
    """Train the reproduction and return the diff against the original (text) and whether they are identical."""
    from sft.results.diff import diff
    from sft.training.trainer import run_training

    original = read_run_record(run_dir)
    name = name or f"{original.path.name}-reproduce"
    # The copy stays on disk while the run trains, as any config `sft train` reads does.
    with tempfile.TemporaryDirectory(prefix="sft-reproduce-") as folder:
        config = recorded_config(original, name, env_file, Path(folder) / f"{original.path.name}.yaml")
        check_data_unchanged(original, config)
        for line in environment_changes(original.manifest):
            log.warning("environment differs from the recorded run: %s", line)
        run_training(config, env_file=env_file)
    return diff(original.path, original.path.parent / name)


def recorded_config(original, name: str, env_file: str | None, path: Path):
    """The run's config.yaml, written to PATH and loaded as `sft train` loads a config, for a run in RUN_DIR's folder
    named NAME: every value as it ran, except the ${VARIABLE} references config.yaml keeps for values taken from
    secret variables, which are resolved again from the environment and .env (env_file from this command)."""
    from sft.config import VARIABLE, load_config, load_env_file
    from sft.run.manifest import read_manifest

    target = original.path.parent / name
    if target.resolve() == original.path.resolve():
        raise UserError(f"--name {name}: that is the run being reproduced; choose a new name")
    existing = read_manifest(target) if target.is_dir() else None
    if existing and existing.get("status") == "finished":
        raise UserError(f"{target} holds a finished run already; pass --name NEW to reproduce into a new directory")
    recorded = original.path / "config.yaml"
    load_env_file(env_file)
    for key, value in _strings(original.config):
        unset = next((m for m in VARIABLE.finditer(value) if m["default"] is None and m["name"] not in os.environ),
                     None)
        if unset:
            raise UserError(f"{recorded}: {key} comes from the secret variable {unset['name']}, which is not set "
                            f"here; export it or add it to .env (or pass --env-file), then retry")
        password = URL_PASSWORD.search(value)
        if password and password["password"] == MASK:
            raise UserError(f"{recorded}: {key} holds a database password typed into the config (masked), so it "
                            f"cannot be read again; write it as ${{NAME}} in the config and train anew, or reproduce "
                            f"from the original config with `sft train`")
    raw = copy.deepcopy(original.config)
    raw["env_file"] = None
    pinned = name.replace("{", "{{").replace("}", "}}")  # a literal name, not a template
    raw["output"] = {**raw.get("output", {}), "dir": str(original.path.parent), "name": pinned}
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return load_config(path, env_file=env_file)


def _strings(node: Any, key: str = ""):
    if isinstance(node, dict):
        for name, child in node.items():
            yield from _strings(child, f"{key}.{name}" if key else str(name))
    elif isinstance(node, list):
        for index, child in enumerate(node):
            yield from _strings(child, f"{key}[{index}]")
    elif isinstance(node, str):
        yield key, node


def check_data_unchanged(original, config) -> None:
    """Every data source must hash as recorded: a reproduction on other data answers a different question."""
    from sft.data import open_sources

    recorded = (original.manifest.get("data") or {}).get("files") or []
    keys = source_keys(original.config)
    with tempfile.TemporaryDirectory(prefix="sft-reproduce-") as work_dir:
        opened = open_sources(config, Path(work_dir))
    now = [item.fingerprint for items in opened.values() for item in items]
    if len(now) != len(recorded):
        raise UserError(f"{original.path}/manifest.json: the run recorded {len(recorded)} data sources, its config "
                        f"names {len(now)}; the run stopped before reading its data, so there is nothing to reproduce")
    for key, was, fingerprint in zip(keys, recorded, now):
        if fingerprint.sha256 != was.get("sha256"):
            raise UserError(f"{key}: {fingerprint.source} has changed since the run (sha256 "
                            f"{fingerprint.sha256[:12]}, recorded {str(was.get('sha256'))[:12]} from {was.get('source')})"
                            f"; put the original data back at that path (in the container: bind a copy of it there)")


def environment_changes(manifest: dict) -> list[str]:
    """Where this machine's image, packages, CUDA and GPUs differ from what the run recorded."""
    from sft.run.manifest import accelerator_info, image_provenance, package_versions

    here = environment_of({"versions": package_versions(), "accelerator": accelerator_info(),
                           "image": image_provenance()})
    recorded = environment_of(manifest)
    return [f"{key}: recorded {recorded.get(key)}, now {value}" for key, value in here.items()
            if recorded.get(key) != value]
