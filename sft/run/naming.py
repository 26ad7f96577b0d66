"""Run names: output.name resolved once, and the commands that continue a run under the name it resolved to."""
import os
import shlex
from datetime import datetime

from sft.config import Config
from sft.errors import UserError


def resolve_name(template: str, config: Config, now: datetime) -> str:
    values = {"config": config.config_path.stem if config.config_path else "run",
              "date": now.strftime("%Y%m%d"), "time": now.strftime("%H%M%S")}
    try:
        name = template.format(**values)
    except (KeyError, IndexError, ValueError) as error:
        raise UserError(f"output.name: '{template}' uses an unknown placeholder {error}; "
                        f"use {{config}}, {{date}} or {{time}}") from None
    if not name or "/" in name or name in (".", ".."):
        raise UserError(f"output.name: '{name}' is not a valid directory name; drop slashes")
    return name


def resume_command(config: Config, run_name: str, overrides: list[str], env_file: str | None) -> str:
    """The command that continues this run: the same config and overrides with the name pinned to the resolved
    one ({time} resolves anew in every run, {date} after midnight, and a new Slurm job does not find the old job's
    directory)."""
    words = ["sft", "train", str(config.config_path)]
    if env_file:
        words += ["--env-file", env_file]
    words += [o for o in overrides if o.partition("=")[0].strip() != "output.name"]
    pinned = run_name.replace("{", "{{").replace("}", "}}")  # a literal name, not a template
    return shlex.join([*words, f"output.name={pinned}"])


def resubmit_command(run_name: str) -> str | None:
    """In a job of slurm/'s scripts: the sbatch line that continues this run as a new job (after a plain scancel,
    which is not requeued), from the submission line the script records in SFT_SBATCH_COMMAND, name pinned."""
    submitted = os.environ.get("SFT_SBATCH_COMMAND")
    if not submitted or not os.environ.get("SLURM_JOB_ID"):
        return None
    words = [w for w in shlex.split(submitted) if w.partition("=")[0].strip() != "output.name"]
    pinned = run_name.replace("{", "{{").replace("}", "}}")
    return shlex.join([*words, f"output.name={pinned}"])
