"""Checks before the queue: what `sft check` verifies beyond the config and the data rows, without a GPU and without
loading weights — settings that would fail only inside Trainer (by building Trainer's own arguments as train does),
the model's files and config.json limits, that every example keeps trainable tokens, and that the output directory is
writable with room for the run. Every problem is reported at once."""
import json
import math
import shutil
import sys
import tempfile
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from sft.config import Config
from sft.errors import UserError

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.txt", "vocab.json",
                   "spiece.model")
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
# A checkpoint holds the trained parameters in fp32 (4 bytes) and AdamW's two fp32 moments (8 bytes).
CHECKPOINT_BYTES_PER_PARAMETER = 12
FINAL_BYTES_PER_PARAMETER = 4
GB = 1e9


@dataclass
class ModelFiles:
    """A model found on disk: its folder, config.json and the shape of every weight (from safetensors headers)."""
    folder: Path
    config: dict[str, Any]
    shapes: dict[str, list[int]] = field(default_factory=dict)

    @property
    def parameters(self) -> int:
        if self.shapes:
            return sum(math.prod(shape) for shape in self.shapes.values())
        # Only pickle weights (no header to read): the usual transformer estimate, 12·layers·hidden² + embeddings.
        hidden, layers = self.config.get("hidden_size", 0), self.config.get("num_hidden_layers", 0)
        return 12 * layers * hidden ** 2 + self.config.get("vocab_size", 0) * hidden


def settings_problems(config: Config, gpu: bool | None = None) -> list[str]:
    """Settings that pass the schema but fail only once the model loader or Trainer sees them, by the rules train
    applies: the attention kernel and method for the device (gpu: whether the run trains on a GPU; None: this
    machine's), FSDP, the run's name. Trainer's own arguments: sft.training.arguments.trainer_problems."""
    import torch

    from sft.model.device import attention_problem, method_problem
    from sft.run.naming import resolve_name

    gpu = torch.cuda.is_available() if gpu is None else gpu
    problems = []
    options = config.training.fsdp.split()
    if {"full_shard", "shard_grad_op"} <= set(options):
        problems.append("training.fsdp: full_shard and shard_grad_op are two sharding strategies; keep one")
    if options and config.method.name == "lora" and config.method.merge:
        problems.append("method.merge: under training.fsdp no process holds the whole trained model to merge; set "
                        "method.merge: false and merge the saved adapter afterwards")
    problems += [problem for problem in (attention_problem(config, gpu), method_problem(config, gpu)) if problem]
    try:
        resolve_name(config.output.name, config, datetime.now())
    except UserError as error:
        problems.append(str(error))
    return problems


def model_limit_problems(config: Config, model_config: dict) -> list[str]:
    """Settings beyond what the model's config.json allows: examples longer than its position embeddings (a
    BERT-style model fails at the first step with an index error)."""
    key = next((key for key in ("max_position_embeddings", "n_positions") if model_config.get(key)), None)
    limit = model_config.get(key)
    if limit and config.data.max_length > limit:
        return [f"data.max_length: {config.data.max_length} tokens is more than the model's {limit} positions "
                f"({key} in its config.json); set data.max_length to {limit} or less"]
    return []


def check_settings(config: Config) -> None:
    """For `sft train`: fail in seconds, before the processes start and a run directory exists, instead of inside
    Trainer (sft.training.trainer checks Trainer's own arguments once the processes have started)."""
    from sft.model.estimate import read_model_config

    problems = settings_problems(config)
    try:
        model_config = read_model_config(config)
    except UserError:  # the model is not there: loading it says so
        model_config = None
    if model_config:
        problems += model_limit_problems(config, model_config)
    if problems:
        raise UserError("; ".join(problems))


# The model, without loading it

def find_model(config: Config) -> tuple[ModelFiles | None, list[str]]:
    """The model's folder (a local folder, a `pkg:` package's weights, or a hub id's snapshot in the offline cache)
    with config.json, a tokenizer and weights."""
    from sft.model.hub import resolve_model_path

    name = config.model.name
    try:
        folder = Path(resolve_model_path(name))
    except UserError as error:
        return None, [str(error)]
    if not folder.exists():
        # A hub id is `name` or `org/name`; anything else was meant as a folder.
        if name.startswith(("/", ".", "~")) or name.count("/") > 1:
            return None, [f"model.name: folder {folder} does not exist; check the path"]
        folder, problem = _cached_snapshot(name, config.model.revision)
        if problem:
            return None, [problem]
    if not folder.is_dir():
        return None, [f"model.name: {folder} is a file; point model.name at the folder that holds config.json, the "
                      f"tokenizer and the weights"]
    problems = []
    missing = [what for what, names in (("config.json", ("config.json",)), ("tokenizer", TOKENIZER_FILES),
                                        ("weights", WEIGHT_FILES)) if not any((folder / n).is_file() for n in names)]
    if missing and not (missing == ["weights"] and any(folder.glob("*.safetensors"))):
        problems.append(f"model.name: {folder} has no {', no '.join(missing)} (expected config.json, a tokenizer "
                        f"such as tokenizer.json, and model.safetensors); point model.name at a complete model folder")
    if "config.json" in missing:
        return None, problems
    try:
        model_config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
        shapes = _weight_shapes(folder)
    except (OSError, ValueError, KeyError, TypeError) as error:
        return None, problems + [f"model.name: {folder}: cannot read config.json or the safetensors headers "
                                 f"({error}); download the model again"]
    return ModelFiles(folder, model_config, shapes), problems


def _cached_snapshot(name: str, revision: str | None) -> tuple[Path | None, str | None]:
    from huggingface_hub import constants, snapshot_download

    try:
        return Path(snapshot_download(name, revision=revision, local_files_only=True)), None
    except ValueError:  # not a valid repo id either
        return None, f"model.name: '{name}' is neither a folder nor a hub id (org/name); check the name"
    except OSError:
        return None, (f"model.name: '{name}' is not a local folder and not in the offline hub cache "
                      f"({constants.HF_HUB_CACHE}); download it on a login node with `hf download {name}` into "
                      f"HF_HOME, or point model.name at a folder")


def _weight_shapes(folder: Path) -> dict[str, list[int]]:
    """Name → shape of every weight, from the safetensors headers (8-byte length + JSON): no tensor is read."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        files = [p.name for p in folder.glob("*.safetensors")]
    shapes = {}
    for name in files:
        with (folder / name).open("rb") as f:
            header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
        shapes |= {key: value["shape"] for key, value in header.items() if key != "__metadata__"}
    return shapes


def lora_problems(config: Config, model: ModelFiles) -> list[str]:
    """method.lora.target_modules that name no layer of the model (peft fails on them after the job starts)."""
    targets = config.method.lora.target_modules
    if config.method.name == "full" or isinstance(targets, str) or not model.shapes:
        return []
    layers = {key.removesuffix(".weight") for key, shape in model.shapes.items() if len(shape) == 2}
    unknown = [t for t in targets if not any(layer == t or layer.endswith(f".{t}") for layer in layers)]
    if not unknown:
        return []
    names = sorted({layer.rsplit(".", 1)[-1] for layer in layers if "embed" not in layer})
    return [f"method.lora.target_modules: no layer named {', '.join(map(repr, unknown))} in {model.folder.name} "
            f"(its layers: {', '.join(names)}); use those names or all-linear"]


def chunked_loss_problems(config: Config, model: ModelFiles) -> list[str]:
    """training.chunked_loss: true for a model it would not be exact for (sft train refuses it after data
    preparation), judged from config.json and the config as sft train judges it."""
    from sft.model.loss import off_reason

    if config.training.chunked_loss is not True:
        return []
    reason = off_reason(config, model.config.get("model_type", ""))
    return [f"training.chunked_loss: {reason}; set it to auto or false"] if reason else []


def head_problems(model: ModelFiles, label_names: list[str]) -> list[str]:
    """A model already fine-tuned for classification keeps its head, and transformers refuses to load it for
    another number of classes (a size mismatch, after the job starts)."""
    architectures = model.config.get("architectures") or []
    classes = len(model.config.get("id2label") or {})
    if not any(a.endswith("ForSequenceClassification") for a in architectures) or classes in (0, len(label_names)):
        return []
    return [f"model.name: {model.folder.name} already has a classification head for {classes} classes, and the data "
            f"has {len(label_names)}; start from the base model it was fine-tuned from, or use data with its "
            f"{classes} classes"]


# Room for the run's output

def expected_output_bytes(config: Config, model: ModelFiles, train_examples: int) -> tuple[int, str]:
    """Disk the run will need at its peak: the checkpoints kept (one more while the newest is written) and the final
    model. Returns bytes and how they add up."""
    trained = model.parameters if config.method.name == "full" else _lora_parameters(config, model)
    checkpoints = _checkpoints_kept(config, train_examples)
    checkpoint_bytes = trained * CHECKPOINT_BYTES_PER_PARAMETER
    final_bytes = trained * FINAL_BYTES_PER_PARAMETER
    if config.method.name == "lora" and config.method.merge:
        final_bytes += model.parameters * FINAL_BYTES_PER_PARAMETER
    total = checkpoints * checkpoint_bytes + final_bytes
    return total, (f"{checkpoints} checkpoint(s) of {checkpoint_bytes / GB:.2f} GB for {trained:,} trained "
                   f"parameters + final model {final_bytes / GB:.2f} GB")


def _lora_parameters(config: Config, model: ModelFiles) -> int:
    """r·(in + out) per adapted linear layer; all-linear adapts every 2-D weight but embeddings and the output head."""
    lora = config.method.lora
    vocab = model.config.get("vocab_size")
    total = 0
    for key, shape in model.shapes.items():
        layer = key.removesuffix(".weight")
        if len(shape) != 2 or "embed" in layer or vocab in shape:
            continue
        targets = [lora.target_modules] if isinstance(lora.target_modules, str) else lora.target_modules
        if "all-linear" in targets or any(layer == t or layer.endswith(f".{t}") for t in targets):
            total += lora.r * sum(shape)
    return total


def _checkpoints_kept(config: Config, train_examples: int) -> int:
    t = config.training
    if t.save_strategy == "no":
        return 0
    steps_per_epoch = max(1, math.ceil(train_examples / (t.batch_size * t.gradient_accumulation_steps)))
    total_steps = t.max_steps if t.max_steps > 0 else math.ceil(t.epochs * steps_per_epoch)
    if t.save_strategy == "epoch":
        saves = math.ceil(total_steps / steps_per_epoch)
    else:
        from transformers import TrainingArguments

        saves = max(1, total_steps // (t.save_steps or TrainingArguments.save_steps))  # unset: Trainer's default
    return min(saves, t.save_total_limit + 1) if t.save_total_limit else saves


def output_problems(config: Config, needed: tuple[int, str] | None) -> tuple[list[str], int | None]:
    """output.dir writable (nothing is left behind) with room for `needed` bytes; returns problems and free bytes."""
    output_dir = Path(config.output.dir)
    existing = output_dir
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        return [f"output.dir: {existing} is a file, not a folder; choose another output.dir"], None
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as error:
        return [f"output.dir: cannot write in {existing} ({error.strerror}); choose a writable output.dir (in the "
                f"container, bind it read-write)"], None
    free = shutil.disk_usage(existing).free
    if needed and needed[0] > free:
        return [f"output.dir: {existing} has {free / GB:.1f} GB free, but the run needs about {needed[0] / GB:.1f} GB "
                f"({needed[1]}); free space, lower training.save_total_limit, use method.name lora, or choose "
                f"another output.dir"], free
    return [], free


# Trainable tokens

def untrainable_problems(config: Config, loaded, tokenizer) -> list[str]:
    """causal_lm: examples whose answer tokens all fall beyond data.max_length after prompt masking (sft train would
    skip them), with their rows and the max_length that keeps them."""
    from sft.data.formats import IGNORE_INDEX, chat_format, tokenize_batch
    from sft.data.validation import MAX_PROBLEMS_SHOWN

    max_length = config.data.max_length
    problems = []
    for config_key, rows in (("data.train", loaded.train), ("data.eval", loaded.eval)):
        if rows is None:
            continue
        empty, needed, start = [], 0, 0
        for batch in rows.dataset.iter(batch_size=1000):
            # Untruncated: where the first answer token sits tells how long max_length must be to keep it.
            examples = tokenize_batch(batch, loaded.data_format, config.data.fields, tokenizer, None, sys.maxsize,
                                      chat_format(config))
            for offset, labels in enumerate(examples["labels"]):
                first = next((i for i, label in enumerate(labels) if label != IGNORE_INDEX), len(labels))
                if first >= max_length:
                    empty.append(start + offset)
                    needed = max(needed, first + 1)
            start += len(examples["labels"])
        if empty:
            shown = ", ".join(rows.where(i) for i in empty[:MAX_PROBLEMS_SHOWN])
            more = f" and {len(empty) - MAX_PROBLEMS_SHOWN} more" if len(empty) > MAX_PROBLEMS_SHOWN else ""
            problems.append(f"{config_key}: {len(empty)} example(s) keep no trainable tokens after truncation to "
                            f"data.max_length={max_length} and prompt masking ({shown}{more}); raise data.max_length "
                            f"to {needed} or shorten their prompts (sft train would skip them)")
    return problems


# Everything at once

def run_checks(config: Config, work_dir: Path, gpu: bool = False):
    """`sft check`: settings (for a run on a GPU, or on CPU), model, data rows and labels, trainable tokens, output
    directory. Returns the loaded rows, (name, value) lines for the report and the model's files; raises one
    UserError listing every problem."""
    from sft.data import load_rows
    from sft.training.arguments import trainer_problems

    problems = settings_problems(config, gpu) + trainer_problems(config, gpu)
    model, model_problems = find_model(config)
    problems += model_problems
    if model:
        problems += (model_limit_problems(config, model.config) + lora_problems(config, model)
                     + chunked_loss_problems(config, model))
    try:
        loaded = load_rows(config, work_dir)
    except UserError as error:
        loaded = None
        problems.append(str(error))
    if loaded and model and loaded.label_names:
        problems += head_problems(model, loaded.label_names)
    if loaded and model and config.task == "causal_lm":
        from sft.model.loading import load_tokenizer

        try:
            problems += untrainable_problems(config, loaded, load_tokenizer(config))
        except UserError as error:
            problems.append(str(error))
    needed = expected_output_bytes(config, model, len(loaded.train)) if model and loaded else None
    output, free = output_problems(config, needed)
    problems += output
    if problems:
        raise UserError("; ".join(problems))
    lines = [("model", f"{model.folder} ({model.parameters:,} parameters)")]
    if needed:
        lines.append(("output space", f"about {needed[0] / GB:.2f} GB needed ({needed[1]}), "
                                      f"{free / GB:.1f} GB free in {config.output.dir}"))
    return loaded, lines, model
