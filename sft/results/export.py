"""`sft export RUN_DIR`: a finished run as one standalone model folder (safetensors weights, config with the label
names, tokenizer with its chat template) that `from_pretrained` and vLLM-style loaders read without sft or peft.

    sft export runs/demo-20261125 --to models/reviews-classifier
    sft export runs/chat-lora-20261125 --merge          # LoRA adapter merged into the base weights
"""
import logging
import os
import shutil
import tempfile
from pathlib import Path

from sft.errors import UserError
from sft.files import follow_umask
from sft.results.finished_run import load_model, load_tokenizer, open_trained_run

log = logging.getLogger("sft")
DEFAULT_FOLDER = "export"  # inside the run directory, beside final/


def export(run_dir: str, merge: bool, to: str | None) -> Path:
    """Write the standalone model into TO (default RUN_DIR/export) and return that folder."""
    run = open_trained_run(run_dir)
    target = Path(to) if to else run.path / DEFAULT_FOLDER
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise UserError(f"--to {target}: already exists and is not empty; choose a new folder (export never "
                        f"overwrites)")
    lora = run.config.method.name != "full"  # lora or qlora: an adapter over the base
    if lora and not merge:
        raise UserError(f"{run.path}: a LoRA run, whose final/ holds only the adapter; pass --merge to merge it into "
                        f"the base weights for a standalone model")
    # dtype auto: the weights stay in the dtype they are stored in (the trained fp32 weights after full
    # fine-tuning; the base model's dtype, which the merged adapter is cast into, after LoRA).
    model = load_model(run, dtype="auto")
    if lora:
        model = model.merge_and_unload()  # the adapters (and a LoRA classifier head) folded into plain weights
    target.parent.mkdir(parents=True, exist_ok=True)
    building = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.export-"))
    try:
        model.save_pretrained(building)  # safetensors (transformers 5 writes no pickle)
        load_tokenizer(run).save_pretrained(building)
        # mkdtemp makes the folder private, and transformers writes model.safetensors 0600: an export is meant to
        # be shared, so it gets the modes a plain mkdir/open would give.
        follow_umask(building)
        # Appears complete or not at all; rename replaces only an empty folder, so nothing a user put there is lost.
        os.rename(building, target)
    except BaseException:
        shutil.rmtree(building, ignore_errors=True)
        raise
    size = sum(f.stat().st_size for f in target.rglob("*") if f.is_file())
    log.info("exported %s to %s (%.1f MB)", "merged model" if lora else "model", target, size / 1e6)
    return target
