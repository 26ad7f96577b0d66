"""Cache of tokenized data: keyed by the content of every source, the tokenizer and every setting that changes
tokens; built once into a temp folder and renamed into place, then memory-mapped by every later run, requeued
job and torchrun process.

Layout under the cache root ($HF_HOME/sft, ~/.cache/huggingface/sft, or data.cache_dir):
    tokenized/KEY/{train,eval}/   datasets.save_to_disk folders
    tokenized/KEY/info.json       format, label names, sources, data summary; written last: marks the folder complete
    tokenized/KEY.lock            held while one process builds KEY
    handoff/RUN.json              under torchrun: which KEY the first process prepared for the run directory RUN
"""
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import asdict
from importlib import metadata
from pathlib import Path

from sft.config import Config
from sft.data.sources import DataFile
from sft.errors import UserError
from sft.files import follow_umask, write_text_atomic
from sft.version import __version__

log = logging.getLogger("sft")
INFO = "info.json"
# Settings that only say how or where to prepare, not what the tokens are.
NOT_IN_KEY = ("cache_dir", "num_proc", "wait_minutes")
WEIGHT_SUFFIXES = {".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf", ".onnx", ".ot"}


def cache_root(config: Config) -> Path:
    if config.data.cache_dir:
        return Path(config.data.cache_dir).expanduser()
    hf_home = os.environ.get("HF_HOME") or Path.home() / ".cache" / "huggingface"
    return Path(hf_home) / "sft"


def cache_key(config: Config, sources: dict[str, list[DataFile]], tokenizer_folder: Path | None) -> str | None:
    """Hash of what decides the tokens: source contents (not paths: moved data still hits), the tokenizer's files
    and the libraries that apply them, data settings, the label count, the seed where it picks rows, and the sft
    version. None while the tokenizer's files are not on this machine yet (a hub model not downloaded)."""
    if tokenizer_folder is None:
        return None
    data = config.data.model_dump(mode="json", exclude=set(NOT_IN_KEY))
    for config_key, files in sources.items():
        section = config_key.split(".")[1]
        items = data[section] if isinstance(data[section], list) else [data[section]]
        data[section] = [_item_settings(item) | {"content": file.sha256} for item, file in zip(items, files)]
    picks_rows = (config.data.eval is None and config.data.eval_fraction > 0) or any(
        isinstance(item, dict) and (item.get("max_rows") or item.get("fraction"))
        for section in ("train", "eval") for item in data.get(section) or [])
    libraries = {name: metadata.version(name) for name in ("transformers", "tokenizers")}
    settings = {"sft": __version__, "task": config.task, "num_labels": config.model.num_labels, "data": data,
                "seed": config.training.seed if picks_rows else None, "libraries": libraries,
                "tokenizer": tokenizer_digest(tokenizer_folder)}
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:24]


def _item_settings(item) -> dict:
    if isinstance(item, str):
        return {}
    # Where the data is and how long a query may take do not change tokens (the query text is in the content hash).
    return {k: v for k, v in item.items() if k not in ("path", "database", "timeout") and v is not None}


def tokenizer_digest(folder: Path) -> str:
    """Hash of the model folder's files other than weights and docs: the tokenizer's vocabulary, merges, special
    tokens, chat template and configs, whatever their names. Read from disk, so a cache hit needs no tokenizer
    loaded (importing transformers alone takes 2 s). A changed file that does not matter costs a rebuild, never
    stale tokens."""
    digest = hashlib.sha256()
    for file in sorted(p for p in folder.rglob("*") if p.is_file() and not _not_tokens(p.relative_to(folder))):
        digest.update(str(file.relative_to(folder)).encode() + b"\0" + file.read_bytes())
    return digest.hexdigest()


def _not_tokens(file: Path) -> bool:
    """Weights, their indexes, generation settings, docs and hidden files (e.g. a download's .cache/): files a
    tokenizer never reads. `sft fetch` adds weights to a hub snapshot after the tokenizer's files: no new key."""
    name = file.name
    return file.suffix in WEIGHT_SUFFIXES or name.endswith(".index.json") or name == "generation_config.json" \
        or file.suffix == ".md" or any(part.startswith(".") for part in file.parts)


def is_complete(folder: Path) -> bool:
    return (folder / INFO).is_file()


def build_lock(folder: Path, wait_minutes: float):
    from filelock import FileLock

    return FileLock(str(folder) + ".lock", timeout=wait_minutes * 60)


def save(folder: Path, train, eval_set, info: dict) -> None:
    """Write into a temp folder beside the target and rename it into place: a reader never sees half a cache."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    building = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}.build-"))
    follow_umask(building)  # mkdtemp makes it 0700: the cache may be shared (data.cache_dir)
    try:
        train.save_to_disk(str(building / "train"))
        if eval_set is not None:
            eval_set.save_to_disk(str(building / "eval"))
        info = {**info, "built_by": {"host": os.uname().nodename, "pid": os.getpid(), "rank": os.environ.get("RANK")}}
        write_text_atomic(building / INFO, json.dumps(info, indent=2, default=str))
        try:
            os.rename(building, folder)
        except OSError:
            # Another node built the same key at the same time (file locks do not reach across every shared
            # filesystem): the content is the same, so keep theirs.
            if not is_complete(folder):
                raise
            shutil.rmtree(building, ignore_errors=True)
    except BaseException:
        shutil.rmtree(building, ignore_errors=True)
        raise


def load(folder: Path) -> tuple:
    """(train, eval or None, info) memory-mapped from a complete cache folder."""
    from datasets import load_from_disk

    info = json.loads((folder / INFO).read_text())
    eval_set = load_from_disk(str(folder / "eval")) if (folder / "eval").is_dir() else None
    return load_from_disk(str(folder / "train")), eval_set, info


def files_from(info: dict) -> list[DataFile]:
    return [DataFile(**f) for f in info["files"]]


def files_to(files: list[DataFile]) -> list[dict]:
    return [asdict(f) for f in files]


# torchrun: the first process prepares, the others wait on a note instead of inside a collective

def handoff_path(config: Config, run_dir: Path) -> Path:
    return cache_root(config) / "handoff" / (hashlib.sha256(str(run_dir.resolve()).encode()).hexdigest()[:24] + ".json")


def write_handoff(note: Path, folder: Path) -> None:
    write_text_atomic(note, json.dumps({"folder": str(folder)}))


def wait_for_handoff(note: Path, wait_minutes: float) -> Path:
    """The folder the first process prepared, once it is complete; polling a file keeps these processes out of a
    collective, whose timeout (10 minutes with NCCL) a large dataset would exceed."""
    deadline = time.monotonic() + wait_minutes * 60
    while time.monotonic() < deadline:
        if note.is_file():
            folder = Path(json.loads(note.read_text())["folder"])
            if is_complete(folder):
                return folder
        time.sleep(1)
    raise UserError(f"data.wait_minutes: the first process did not finish preparing the data within {wait_minutes:g} "
                    f"minutes; run `sft prepare` before the job, or raise data.wait_minutes")
