"""`sft reproduce RUN_DIR [--name NEW]`: train again from what a run recorded, next to it, then compare the two
with `sft diff`. On CPU, and on GPUs with training.deterministic, a reproduction in the same image is bit-identical.

    sft reproduce runs/baseline                  # → runs/baseline-reproduce, then the diff and its verdict
    sft reproduce /shared/alice/runs/baseline --name baseline-bob --env-file .env
"""
import copy
import logging
import re
import tempfile
from pathlib import Path
from typing import Any

import yaml

from sft.diff import environment_of, read_run_record, source_keys
from sft.errors import UserError
from sft.secrets import MASK

log = logging.getLogger("sft")
STEP = re.compile(r"[^.\[\]]+")


def reproduce(run_dir: str | Path, name: str | None = None, env_file: str | None = None) -> tuple[str, bool]:
    """Train the reproduction and return the diff against the original (text) and whether they are identical."""
    from sft.diff import diff
    from sft.training import run_training

    original = read_run_record(run_dir)
    name = name or f"{original.path.name}-reproduce"
    # The config lives while the run trains: the new manifest records its ${VARIABLES} as the original's did.
    with tempfile.TemporaryDirectory(prefix="sft-reproduce-") as folder:
        config = recorded_config(original, name, env_file, Path(folder) / f"{original.path.name}.yaml")
        check_data_unchanged(original, config)
        for line in environment_changes(original.manifest):
            log.warning("environment differs from the recorded run: %s", line)
        run_training(config, env_file=env_file)
    return diff(original.path, original.path.parent / name)


def recorded_config(original, name: str, env_file: str | None, path: Path):
    """The run's config.yaml, written to PATH and loaded, for a run in RUN_DIR's folder named NAME: values written
    with ${VARIABLES} substituted again from the environment/.env (the copy holds secrets masked), env_file from
    this command."""
    from sft.config import load_config
    from sft.manifest import read_manifest

    target = original.path.parent / name
    if target.resolve() == original.path.resolve():
        raise UserError(f"--name {name}: that is the run being reproduced; choose a new name")
    existing = read_manifest(target) if target.is_dir() else None
    if existing and existing.get("status") == "finished":
        raise UserError(f"{target} holds a finished run already; pass --name NEW to reproduce into a new directory")
    raw = copy.deepcopy(original.config)
    for key, parts in (original.manifest.get("config_variables") or {}).items():
        _restore(raw, key, parts)
    masked = next((key for key, value in _strings(raw) if MASK in value), None)
    if masked:
        raise UserError(f"{original.path / 'config.yaml'}: {masked} holds a masked secret that the config did not "
                        f"take from a ${{VARIABLE}}, so it cannot be read again; write it as ${{NAME}} in the config "
                        f"and train anew, or reproduce from the original config with `sft train`")
    raw["env_file"] = None
    pinned = name.replace("{", "{{").replace("}", "}}")  # a literal name, not a template
    raw["output"] = {**raw.get("output", {}), "dir": str(original.path.parent), "name": pinned}
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return load_config(path, env_file=env_file)


def _reference(part: dict) -> str:
    default = part.get("default")
    return f"${{{part['variable']}{'' if default is None else ':-' + default}}}"


def _restore(raw: dict, key: str, parts: list) -> None:
    """Put the ${VARIABLE} template back at a flat key such as data.train[0].path, where the recorded value is one
    it produced (an override on the command line may have replaced it; then the recorded value stands)."""
    *parents, leaf = [int(step) if step.isdigit() else step for step in STEP.findall(key)]
    produced = re.compile("".join(re.escape(part) if isinstance(part, str) else ".*" for part in parts), re.S)
    node: Any = raw
    try:
        for step in parents:
            node = node[step]
        if isinstance(node[leaf], str) and produced.fullmatch(node[leaf]):
            node[leaf] = "".join(part if isinstance(part, str) else _reference(part) for part in parts)
    except (KeyError, IndexError, TypeError):  # the section was replaced by an override
        pass


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
                            f"; restore the original data or point the config's variables (e.g. DATA_PATH) at a copy "
                            f"of it")


def environment_changes(manifest: dict) -> list[str]:
    """Where this machine's image, packages, CUDA and GPUs differ from what the run recorded."""
    from sft.manifest import accelerator_info, image_provenance, package_versions

    here = environment_of({"versions": package_versions(), "accelerator": accelerator_info(),
                           "image": image_provenance()})
    recorded = environment_of(manifest)
    return [f"{key}: recorded {recorded.get(key)}, now {value}" for key, value in here.items()
            if recorded.get(key) != value]
