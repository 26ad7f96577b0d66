"""Hub downloads and where a model's files are: `sft fetch` fills the cache on a login node with network, since runs
are offline (compute nodes rarely reach the internet, and a hub lookup there hangs until a timeout)."""
import importlib
import os
from pathlib import Path

from sft.config import Config
from sft.errors import UserError

# What a run reads: config, tokenizer (*.model: sentencepiece) and generation files, safetensors weights (sharded
# ones with their index).
# Never pickles (*.bin, *.pt, *.ckpt), nor other frameworks' weights, nor the model's own Python code.
FETCH_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.tiktoken", "vocab.txt", "merges.txt", "*.jinja"]


def offline_hint(name: str, revision: str | None) -> str:
    """How to get a hub model into the cache, for the message of a run that did not find it there."""
    command = f"sft fetch {name}" + (f" --revision {revision}" if revision else "")
    return (f"download it on a login node with `{command}` (into HF_HOME={hub_home()}, which the job must see), or "
            f"point model.name at a folder")


def hub_home() -> str:
    return os.environ.get("HF_HOME") or os.path.expanduser("~/.cache/huggingface")


# The cache the slurm/ scripts give their jobs (SFT_CACHE_DIR, default ./.cache), relative to the project directory.
PROJECT_CACHE = os.path.join(".cache", "huggingface")


def use_project_cache() -> None:
    """Without HF_HOME, a project directory's .cache/huggingface is the cache: the one slurm/'s jobs use, so sft
    fetch, check, prepare, train and clean run from the project directory all see what a job sees. Before
    huggingface_hub is imported: it reads HF_HOME once."""
    if "HF_HOME" not in os.environ and os.path.isdir(PROJECT_CACHE):
        os.environ["HF_HOME"] = os.path.abspath(PROJECT_CACHE)


def fetch(name: str, revision: str | None = None) -> str:
    """Download model NAME (and its tokenizer) into the hub cache; return the local folder."""
    # The CLI keeps runs offline; a fetch is the one command that must go online. Set before huggingface_hub is
    # imported: it reads the variable once, at import.
    os.environ["HF_HUB_OFFLINE"] = "0"
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (GatedRepoError, HfHubHTTPError, HFValidationError, LocalEntryNotFoundError,
                                        RepositoryNotFoundError, RevisionNotFoundError)

    try:
        return snapshot_download(name, revision=revision, allow_patterns=FETCH_PATTERNS)
    except HFValidationError:
        raise UserError(f"sft fetch {name}: not a hub id; give it as namespace/name, e.g. Qwen/Qwen2.5-0.5B (a local "
                        f"folder needs no fetch: point model.name at it)") from None
    except GatedRepoError:
        raise UserError(f"sft fetch {name}: the model is gated; accept its terms on the hub, then put your token "
                        f"in .env as HF_TOKEN=...") from None
    except RepositoryNotFoundError:
        raise UserError(f"sft fetch {name}: no such model on the hub (or it is private: put your token in .env as "
                        f"HF_TOKEN=...); check the name") from None
    except RevisionNotFoundError:
        raise UserError(f"sft fetch {name}: no revision '{revision}'; use a branch, tag or commit of the "
                        f"model") from None
    except LocalEntryNotFoundError:  # what snapshot_download raises when it cannot connect at all
        from huggingface_hub import constants

        raise UserError(f"sft fetch {name}: cannot reach the hub at {constants.ENDPOINT}; run it on a login node "
                        f"with internet access (compute nodes usually have none), or set HTTPS_PROXY") from None
    except HfHubHTTPError as error:
        raise UserError(f"sft fetch {name}: the hub answered {str(error).splitlines()[0]}; retry later") from None


def resolve_model_path(name: str) -> str:
    """`pkg:MODULE` → the weights a Python package ships; a local folder → itself; anything else → a hub id."""
    if name.startswith("pkg:"):
        module_name = name.removeprefix("pkg:")
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            raise UserError(f"model.name: Python package {module_name} is not installed; pip install it "
                            f"(its PyPI name may use dashes)") from None
        if not hasattr(module, "get_model_path"):
            raise UserError(f"model.name: package {module_name} has no get_model_path(); point model.name at a folder")
        return str(module.get_model_path())
    return name


def local_model_folder(config: Config) -> Path | None:
    """Where the model's files are on this machine: its folder, a `pkg:` package's weights, or a hub id's snapshot
    in the hub cache; None while a hub model is not downloaded."""
    folder = Path(resolve_model_path(config.model.name))
    if folder.is_dir():
        return folder
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(config.model.name, revision=config.model.revision, local_files_only=True))
    except (ValueError, OSError):  # not in the cache, or not a hub id either
        return None
