"""`sft diff RUN_A RUN_B`: what differs between two run directories, grouped by how much it can explain — inputs
(config, data hashes, seed), environment (image, versions, hardware, determinism), outcome (losses, final metrics)
— and one verdict line. Paths do not count (a run copied from another cluster has other paths): hashes decide.

    sft diff runs/baseline runs/baseline-reproduce     # exit code 0 only when identical
"""
import hashlib
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from sft.config import flatten
from sft.errors import UserError

# Where a run writes and which .env it read say nothing about what it computed; data paths are compared by the
# content hash the manifest recorded instead, and the seed is reported once, as `seed`.
NOT_INPUTS = re.compile(r"^(output\.dir|output\.name|env_file|training\.seed"
                        r"|data\.(train|eval)(\[\d+\])?(\.path|\.database)?)$")
# Timings differ on every run, even a bit-identical one.
TIMING = re.compile(r"(runtime|_per_s|_per_second|_seconds|_s)$")
COMPARED_PER_STEP = ("loss", "grad_norm", "learning_rate")


@dataclass
class Difference:
    key: str
    a: Any
    b: Any


@dataclass
class RunDiff:
    inputs: list[Difference] = field(default_factory=list)
    environment: list[Difference] = field(default_factory=list)
    outcome: list[Difference] = field(default_factory=list)
    first_step: int | None = None  # the first logged step whose values differ
    largest: tuple[str, float] | None = None  # (value name, largest absolute difference) over the common steps
    deterministic: bool = False  # both runs had training.deterministic on

    @property
    def identical(self) -> bool:
        return not (self.inputs or self.environment or self.outcome or self.first_step is not None)

    def verdict(self) -> str:
        if self.identical:
            return "identical"
        if self.inputs:
            return f"different inputs: {', '.join(_names(self.inputs))}"
        if self.environment:
            outcome = "different outcome" if self.outcome or self.first_step is not None else "same outcome"
            return f"same inputs, different environment ({', '.join(_names(self.environment))}), {outcome}"
        ended = [d for d in self.outcome if d.key in ("status", "last logged step")]
        if self.first_step is None and ended:  # e.g. a preempted run against its finished reproduction
            return (f"same inputs and environment, same values on the steps both logged, ended differently ("
                    f"{'; '.join(f'{d.key} {_show(d.a)} → {_show(d.b)}' for d in ended)})")
        why = [f"values first differ at step {self.first_step}"] if self.first_step is not None else []
        if self.largest:
            why.append(f"largest difference {self.largest[1]:.3g} in {self.largest[0]}")
        why.append("training.deterministic was on" if self.deterministic else
                   "training.deterministic was off")
        return f"same inputs and environment, different outcome (nondeterminism: {'; '.join(why)})"


def _names(differences: list[Difference]) -> list[str]:
    return list(dict.fromkeys(d.key.split("[")[0] if d.key.startswith("data.") else d.key for d in differences))


@dataclass
class RunRecord:
    """What a run directory recorded, as diff reads it."""
    path: Path
    config: dict
    manifest: dict
    metrics: list[dict]


def read_run_record(path: str | Path) -> RunRecord:
    from sft.run.manifest import read_manifest
    from sft.run.records import read_metrics

    path = Path(path)
    try:
        manifest = read_manifest(path) if path.is_dir() else None
    except (OSError, ValueError) as error:
        raise UserError(f"{path}/manifest.json: unreadable ({error}); is the copy complete?") from None
    if not manifest:
        raise UserError(f"{path}: not an sft run directory (no manifest.json); pass a folder under output.dir, "
                        f"e.g. runs/NAME")
    config_file = path / "config.yaml"
    config = yaml.safe_load(config_file.read_text()) if config_file.is_file() else None
    if not isinstance(config, dict):
        raise UserError(f"{config_file}: missing or not a config; the run stopped before it started training, "
                        f"so there is nothing to compare")
    return RunRecord(path, config, manifest, read_metrics(path))


def diff_runs(a: RunRecord, b: RunRecord) -> RunDiff:
    result = RunDiff()
    result.inputs = _input_differences(a, b)
    result.environment = _environment_differences(a.manifest, b.manifest)
    _outcome(a, b, result)
    result.deterministic = all((run.manifest.get("determinism") or {}).get("deterministic") for run in (a, b))
    return result


def _compare(a: dict, b: dict, skip=lambda key: False) -> list[Difference]:
    return [Difference(key, a.get(key), b.get(key)) for key in dict.fromkeys([*a, *b])
            if not skip(key) and a.get(key) != b.get(key)]


# Inputs

def _input_differences(a: RunRecord, b: RunRecord) -> list[Difference]:
    differences = _compare(flatten(a.config), flatten(b.config), lambda key: bool(NOT_INPUTS.match(key)))
    if a.manifest.get("seed") != b.manifest.get("seed"):
        differences.append(Difference("seed", a.manifest.get("seed"), b.manifest.get("seed")))
    data_a, data_b = a.manifest.get("data") or {}, b.manifest.get("data") or {}
    differences += _source_differences(a, b)
    for key in ("train_examples", "eval_examples", "format", "label_names", "cache_key"):
        if data_a.get(key) != data_b.get(key):
            differences.append(Difference(f"data.{key}", data_a.get(key), data_b.get(key)))
    # The cache key hashes the data, its settings, the seed where it picks rows, the tokenizer's files and the
    # tokenizing libraries: it tells something new only when the tokenizer is all that can explain it.
    explained = any(d.key in ("seed", "task", "model.num_labels") or d.key.startswith("data.") and
                    d.key != "data.cache_key" for d in differences)
    if explained or not _same_tokenizing_libraries(a.manifest, b.manifest):
        differences = [d for d in differences if d.key != "data.cache_key"]
    return differences


def _same_tokenizing_libraries(a: dict, b: dict) -> bool:
    versions_a, versions_b = a.get("versions") or {}, b.get("versions") or {}
    return all(versions_a.get(name) == versions_b.get(name) for name in ("sft", "transformers", "tokenizers"))


def source_keys(config: dict) -> list[str]:
    """The config key of each data source, in the order the manifest records their hashes (train, then eval)."""
    keys = []
    for section in ("train", "eval"):
        items = (config.get("data") or {}).get(section)
        if isinstance(items, list):
            keys += [f"data.{section}[{index}]" for index in range(len(items))]
        elif items is not None:
            keys.append(f"data.{section}")
    return keys


def _source_differences(a: RunRecord, b: RunRecord) -> list[Difference]:
    """Content hash and row count of each source: where the data lies does not matter, what it holds does."""
    files_a = (a.manifest.get("data") or {}).get("files") or []
    files_b = (b.manifest.get("data") or {}).get("files") or []
    keys = source_keys(a.config)
    differences = []
    for index in range(max(len(files_a), len(files_b))):
        key = keys[index] if index < len(keys) else f"data.files[{index}]"
        one = files_a[index] if index < len(files_a) else {}
        other = files_b[index] if index < len(files_b) else {}
        if (one.get("sha256"), one.get("rows")) != (other.get("sha256"), other.get("rows")):
            differences.append(Difference(key, _describe_source(one), _describe_source(other)))
    return differences


def _describe_source(record: dict) -> str | None:
    if not record:
        return None
    rows = f", {record['rows']} rows" if (record.get("rows") or -1) >= 0 else ""
    return f"sha256 {str(record.get('sha256'))[:12]}{rows} ({record.get('source')})"


# Environment

def environment_of(manifest: dict) -> dict[str, Any]:
    """The recorded environment as flat keys: image, package versions, CUDA, GPUs, determinism, attention."""
    accelerator = manifest.get("accelerator") or {}
    gpus = [gpu.get("name") for gpu in accelerator.get("gpus") or []]
    determinism = {k: v for k, v in (manifest.get("determinism") or {}).items() if k != "seed"}
    image = manifest.get("image") or {}
    return {**flatten({"image": {k: v for k, v in image.items() if k != "build_date"}} if image else {}),
            **{f"versions.{k}": v for k, v in (manifest.get("versions") or {}).items()},
            "cuda": accelerator.get("cuda_build"), "cudnn": accelerator.get("cudnn"),
            "gpus": f"{len(gpus)} × {gpus[0]}" if gpus and len(set(gpus)) == 1 else ", ".join(gpus) or "none",
            **{f"determinism.{k}": v for k, v in determinism.items()},
            **{f"performance.{k}": v for k, v in (manifest.get("performance") or {}).items()}}


def _environment_differences(a: dict, b: dict) -> list[Difference]:
    return _compare(environment_of(a), environment_of(b)) + _compare(restart_changes(a), restart_changes(b))


def restart_changes(manifest: dict) -> dict[str, Any]:
    """Where a restart (a requeue, a resume) ran on something else than the first start: other GPUs, another
    image, other versions. Keys as `restart 1: gpus`."""
    first, changes = environment_of(manifest), {}
    for number, restart in enumerate(manifest.get("restarts") or [], start=1):
        here = environment_of({**manifest, **{key: restart.get(key) for key in ("versions", "accelerator", "image")}})
        changes |= {f"restart {number}: {key}": value for key, value in here.items() if first.get(key) != value}
    return changes


# Outcome

def per_step(metrics: list[dict]) -> dict[int, dict[str, float]]:
    """Training and evaluation values by step (later records for a step win: a resumed run rewrote them)."""
    steps: dict[int, dict[str, float]] = {}
    for record in metrics:
        values = {k: v for k, v in record.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
                  and (k in COMPARED_PER_STEP or (k.startswith("eval_") and not TIMING.search(k)))}
        if "step" in record and values:
            steps.setdefault(record["step"], {}).update(values)
    return steps


def _outcome(a: RunRecord, b: RunRecord, result: RunDiff) -> None:
    if a.manifest.get("status") != b.manifest.get("status"):
        result.outcome.append(Difference("status", a.manifest.get("status"), b.manifest.get("status")))
    steps_a, steps_b = per_step(a.metrics), per_step(b.metrics)
    last_a, last_b = max(steps_a, default=None), max(steps_b, default=None)
    if last_a != last_b:
        result.outcome.append(Difference("last logged step", last_a, last_b))
    largest: dict[str, float] = {}
    for step in sorted(set(steps_a) & set(steps_b)):
        for name, value in steps_a[step].items():
            other = steps_b[step].get(name)
            if other is not None and other != value:
                result.first_step = step if result.first_step is None else result.first_step
                largest[name] = max(largest.get(name, 0.0), abs(value - other))
    if result.first_step is not None:
        name = max(largest, key=largest.get)
        result.largest = (name, largest[name])
    results_a, results_b = a.manifest.get("results") or {}, b.manifest.get("results") or {}
    result.outcome += _compare(results_a, results_b, lambda key: bool(TIMING.search(key)))
    weights_a, weights_b = weights_digest(a.path), weights_digest(b.path)
    if weights_a and weights_b and weights_a != weights_b:
        result.outcome.append(Difference("final weights (sha256)", weights_a[:12], weights_b[:12]))


def weights_digest(run_dir: Path) -> str | None:
    """Hash of final/'s weight files (model or adapter), None without a final model: equal only when bit-identical."""
    files = sorted((run_dir / "final").glob("*.safetensors"))
    if not files:
        return None
    digest = hashlib.sha256()
    for file in files:
        digest.update(file.name.encode() + b"\0")
        with file.open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


# Output

def format_diff(a: RunRecord, b: RunRecord, result: RunDiff) -> str:
    lines = [f"A: {a.path}", f"B: {b.path}"]
    for group, differences in (("inputs", result.inputs), ("environment", result.environment),
                               ("outcome", result.outcome)):
        same = not differences and (group != "outcome" or result.first_step is None)
        lines.append(f"{group}: {'same' if same else 'differs'}")
        if group == "outcome" and result.first_step is not None:
            lines.append(f"  logged values first differ at step {result.first_step}; largest difference "
                         f"{result.largest[1]:.3g} ({result.largest[0]})")
        lines += [f"  {d.key}: {_show(d.a)} → {_show(d.b)}" for d in differences]
    lines.append(f"final metrics: {_final_metrics(a.manifest)} | {_final_metrics(b.manifest)}")
    lines.append(f"verdict: {result.verdict()}")
    return "\n".join(lines)


def _show(value: Any) -> str:
    return "(none)" if value is None else (f"{value:.6g}" if isinstance(value, float) else str(value))


def _final_metrics(manifest: dict) -> str:
    results = {k: v for k, v in (manifest.get("results") or {}).items()
               if (k.endswith("loss") or k.startswith("eval_")) and isinstance(v, (int, float))}
    return ", ".join(f"{k} {v:.6g}" for k, v in results.items()) or "(none)"


def diff(run_a: str | Path, run_b: str | Path) -> tuple[str, bool]:
    """The printed comparison and whether the runs are identical."""
    a, b = read_run_record(run_a), read_run_record(run_b)
    result = diff_runs(a, b)
    return format_diff(a, b, result), result.identical
