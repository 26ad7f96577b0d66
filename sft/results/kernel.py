"""`sft kernel install [--image sft.sif]`: a Jupyter kernelspec whose Python is the training environment — the
image's (`apptainer exec --nv` with the binds of the sbatch scripts, slurm/common.sh) or this venv's — so notebooks
in JupyterLab on the cluster (Open OnDemand, slurm/jupyter.sbatch) run on exactly the stack `sft train` uses.

    sft kernel install --image /shared/sft.sif     # from the project directory: ./data, ./.env, ./runs, ./.cache
    sft kernel install                             # this venv's Python (needs ipykernel: container/jupyter.lock)
"""
import importlib.util
import os
import shutil
import sys
from pathlib import Path

from sft.errors import UserError
from sft.files import write_json_atomic

# ipykernel's entry point; Jupyter fills in {connection_file} (a file under the user's runtime dir, in $HOME,
# which apptainer binds by default).
KERNEL_COMMAND = ["-m", "ipykernel_launcher", "-f", "{connection_file}"]


def kernels_folder(prefix: str | None) -> Path:
    """Where Jupyter looks for the user's kernels (jupyter_core's data dir), or PREFIX/share/jupyter/kernels."""
    if prefix:
        return Path(prefix).expanduser().resolve() / "share" / "jupyter" / "kernels"
    data = os.environ.get("JUPYTER_DATA_DIR") or Path(
        os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share") / "jupyter"
    return Path(data).expanduser() / "kernels"


def install(image: str | None, name: str | None = None, display_name: str | None = None,
            prefix: str | None = None) -> tuple[Path, list[str]]:
    """Write NAME/kernel.json; returns its folder and the kernel's command line."""
    if image:
        argv, label = image_command(image) + ["python", *KERNEL_COMMAND], f"sft (image {Path(image).name})"
    else:
        if importlib.util.find_spec("ipykernel") is None:
            raise UserError(f"{sys.executable}: ipykernel is not installed in this environment; install it "
                            f"(pip install -r container/jupyter.lock) or pass --image sft.sif")
        argv, label = [sys.executable, *KERNEL_COMMAND], f"sft ({sys.prefix})"
    name = name or ("sft-image" if image else "sft")
    if not name.replace("-", "").replace("_", "").replace(".", "").isalnum():
        raise UserError(f"--name {name}: kernel names are letters, digits, '-', '_' and '.'; choose another")
    folder = kernels_folder(prefix) / name
    folder.mkdir(parents=True, exist_ok=True)
    write_json_atomic(folder / "kernel.json", {"argv": argv, "display_name": display_name or label,
                                               "language": "python", "metadata": {"debugger": True}})
    return folder, argv


def image_command(image: str) -> list[str]:
    """`apptainer exec --nv` with the bind contract exactly as slurm/common.sh sets it up (same settings, same
    defaults relative to the current directory), with absolute paths: the kernel starts from the notebook's folder."""
    image_path = Path(image).expanduser().resolve()
    if not image_path.is_file():
        raise UserError(f"--image {image}: file not found; build it (make build, docs/container.md) or give its path")
    container = _container_runtime()
    here = Path.cwd()
    setting = lambda variable, default: Path(os.environ.get(variable) or here / default).expanduser().resolve()
    data, env_file = setting("SFT_DATA_DIR", "data"), setting("SFT_ENV_FILE", ".env")
    output, cache = setting("SFT_OUTPUT_DIR", "runs"), setting("SFT_CACHE_DIR", ".cache")
    (cache / "huggingface").mkdir(parents=True, exist_ok=True)  # as sft_setup: bind sources must exist
    output.mkdir(parents=True, exist_ok=True)
    binds = ["--bind", f"{output}:/outputs", "--bind", f"{cache}:/cache"]
    if data.is_dir():
        binds += ["--bind", f"{data}:/data:ro", "--bind", f"{data}:{data}:ro"]
    if env_file.is_file():
        binds += ["--bind", f"{env_file}:/secrets/.env:ro"]
    if os.environ.get("SFT_BINDS"):
        binds += ["--bind", os.environ["SFT_BINDS"]]
    return [container, "exec", "--nv", *binds, str(image_path)]


def _container_runtime() -> str:
    runtime = os.environ.get("SFT_RUNTIME") or "auto"
    names = {"auto": ("apptainer", "singularity"), "apptainer": ("apptainer",), "singularity": ("singularity",)}
    if runtime not in names:
        raise UserError(f"SFT_RUNTIME={runtime}: use auto, apptainer or singularity with --image (or drop --image "
                        f"for this venv's kernel)")
    found = next((path for path in map(shutil.which, names[runtime]) if path), None)
    if not found:
        raise UserError(f"--image: {' or '.join(names[runtime])} is not on PATH; load its module (e.g. module load "
                        f"apptainer) and install the kernel again")
    return found
