"""sft — supervised fine-tuning on HPC clusters: one YAML config in, one inspectable run directory out."""
from typing import Any

from sft.version import __version__

__all__ = ["__version__", "train", "load_run", "load_runs"]


def train(config_path: str, **overrides: Any) -> "object":
    """Train from a YAML config, for notebooks: `train("configs/x.yaml", **{"training.epochs": 1})`.

    Nested dicts work too (`training={"epochs": 1}`). Returns the finished run's summary
    (`sft.training.trainer.RunResult`).
    """
    from sft.config import load_config
    from sft.training.trainer import run_training

    flat = _flatten(overrides)
    return run_training(load_config(config_path, overrides=flat), overrides=flat)


def load_run(path: str) -> "object":
    """A run directory for a notebook: `.config`, `.manifest`, `.metrics` (pandas DataFrame, one row per step)."""
    from sft.results.notebook import load_run as load

    return load(path)


def load_runs(output_dir: str = "runs") -> "object":
    """A pandas DataFrame with one row per run under OUTPUT_DIR: status, steps, results, differing config keys."""
    from sft.results.notebook import load_runs as load

    return load(output_dir)


def _flatten(overrides: dict[str, Any], prefix: str = "") -> list[str]:
    import yaml

    flat = []
    for key, value in overrides.items():
        if isinstance(value, dict):
            flat += _flatten(value, f"{prefix}{key}.")
        else:
            flat.append(f"{prefix}{key}={yaml.safe_dump(value, default_flow_style=True).strip().removesuffix('...').strip()}")
    return flat
