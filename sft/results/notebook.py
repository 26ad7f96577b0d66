"""Run directories as Python objects for notebooks: `sft.load_run(path)` (config, manifest, metrics as a pandas
DataFrame) and `sft.load_runs(dir)` (one row per run, with the config keys that differ between them as columns).

    runs = sft.load_runs("runs")
    runs[["status", "steps", "eval_loss", *runs.attrs["differing"]]]
    sft.load_run("runs/baseline").metrics.plot(x="step", y=["loss", "eval_loss"])
"""
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sft.config import flatten
from sft.errors import UserError
from sft.results.diff import read_run_record

# Where a run wrote says nothing about how it differs from the others.
NOT_COMPARED = ("output.dir", "output.name", "env_file")


@dataclass
class Run:
    path: Path
    name: str
    status: str
    config: dict  # config.yaml: the settings the run trained with (secrets masked)
    manifest: dict  # manifest.json: versions, data hashes, image, results
    metrics: Any  # pandas.DataFrame, one row per logged step: loss, learning_rate, eval_* ...
    eval_metrics: dict | None  # eval_metrics.json: the latest evaluation in full (per class, confusion matrix)

    def __repr__(self) -> str:
        return f"Run({self.name!r}, status={self.status!r}, steps={len(self.metrics)}, path={str(self.path)!r})"


def load_run(path: str | Path) -> Run:
    from sft.run.listing import status
    from sft.run.records import read_eval_metrics

    record = read_run_record(path)
    return Run(record.path, record.path.name, status(record.path, record.manifest), record.config, record.manifest,
               metrics_frame(record.metrics), read_eval_metrics(record.path))


def metrics_frame(records: list[dict]):
    """metrics.jsonl as a DataFrame with one row per step: training and evaluation records of a step merged."""
    import pandas as pd

    frame = pd.DataFrame([record for record in records if "step" in record])
    if frame.empty:
        return pd.DataFrame({"step": pd.Series(dtype="int64")})
    return frame.groupby("step", as_index=False).last()


def load_runs(output_dir: str | Path = "runs"):
    """One row per run directory under OUTPUT_DIR (oldest first): status, steps, final results, Slurm job, and each
    config key whose value differs between the runs (listed in `.attrs["differing"]`); indexed by run name."""
    import pandas as pd

    from sft.run.listing import list_runs

    folder = Path(output_dir)
    runs, rows = [], []
    for info in list_runs(folder):
        try:
            runs.append(load_run(folder / info.name))
        except UserError:  # started but never wrote its config: nothing to compare
            continue
    differing = differing_config_keys([run.config for run in runs])
    for run in runs:
        settings = flatten(run.config)
        results = {k: v for k, v in (run.manifest.get("results") or {}).items() if not isinstance(v, (dict, list))}
        rows.append({"run": run.name, "status": run.status,
                     "steps": int(run.metrics["step"].max()) if len(run.metrics) else None,
                     "started": run.manifest.get("started"), "slurm_job": run.manifest.get("slurm_job"),
                     **results, **{key: settings.get(key) for key in differing}})
    table = pd.DataFrame(rows).set_index("run") if rows else pd.DataFrame()
    table.attrs["differing"] = differing
    return table


def differing_config_keys(configs: list[dict]) -> list[str]:
    """Config keys (flat, e.g. training.learning_rate) whose value is not the same in every run: a sweep's axes."""
    flat = [flatten(config) for config in configs]
    keys = dict.fromkeys(key for settings in flat for key in settings)
    return [key for key in keys if key not in NOT_COMPARED
            and len({repr(settings.get(key)) for settings in flat}) > 1]
