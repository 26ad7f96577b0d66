"""The training records of a run directory: metrics.jsonl, eval_metrics.json and samples.json, read back for
report.md, `sft diff` and notebooks."""
import json
from pathlib import Path

from sft.files import read_json, write_json_atomic

EVAL_METRICS = "eval_metrics.json"


def write_eval_metrics(run_dir: Path, record: dict) -> None:
    write_json_atomic(run_dir / EVAL_METRICS, record)


def read_eval_metrics(run_dir: Path) -> dict | None:
    path = run_dir / EVAL_METRICS
    return read_json(path) if path.is_file() else None


SAMPLES = "samples.json"


def read_samples(run_dir: Path) -> dict | None:
    path = run_dir / SAMPLES
    return read_json(path) if path.is_file() else None


def read_metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    # A run killed mid-write can leave a partial last line: report what is readable.
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:
            continue
    return records
