"""`sft check`'s memory table: the estimate for the model's config.json and whether it fits --gpu-mem or the visible
GPU."""
import re

from sft.config import Config
from sft.errors import UserError
from sft.model.estimate import (GIB, GPU_TOKEN_BUDGET, HEADROOM, batch_tokens, estimate_memory, fits, shape_from_config,
                                size, uses_chunked_loss, what_fits)


def parse_memory(text: str) -> float:
    """'80GB', '80 GiB', '40g', '24000MB' -> bytes. GPU sizes are quoted in binary units ("80GB" H100 = 80 GiB)."""
    match = re.fullmatch(r"\s*([0-9.]+)\s*([gm])i?b?\s*", text.lower())
    if not match:
        raise UserError(f"--gpu-mem {text}: expected a size like 80GB or 40GiB")
    return float(match[1]) * (GIB if match[2] == "g" else 2**20)


def visible_gpu_memory() -> float | None:
    """Memory of the first visible GPU, from nvidia-smi (importing torch would cost `sft check` seconds)."""
    import shutil
    import subprocess

    if not shutil.which("nvidia-smi"):
        return None
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=memory.total", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=10, check=True).stdout.split()
    except (OSError, subprocess.SubprocessError):
        return None
    return float(out[0]) * 2**20 if out else None


def memory_rows(config: Config, gpu_bytes: float | None,
                model_config: dict) -> tuple[list[tuple[str, str]], str | None]:
    """Rows for `sft check`: the estimate's parts for the model's config.json, and whether it fits the GPU (with the
    change that would); and, when it does not fit, the problem to report."""
    shape = shape_from_config(model_config)
    budget = config.training.max_tokens_per_batch
    if budget == "auto":
        budget = max(GPU_TOKEN_BUDGET, config.data.max_length) if config.task == "causal_lm" else None
    tokens = batch_tokens(config, budget)
    chunked = uses_chunked_loss(config, model_config)
    estimate = estimate_memory(shape, config.method.name, tokens, half_precision=config.model.dtype != "float32",
                               gradient_checkpointing=config.training.gradient_checkpointing,
                               lora_rank=config.method.lora.r, classification=config.task == "classification",
                               chunked_loss=chunked)
    parts = ", ".join(f"{name}{' (chunked loss)' if name == 'logits' and chunked else ''} {size(value)}"
                      for name, value in estimate.parts.items() if value)
    rows = [("memory estimate", f"{size(estimate.total)} per GPU for {tokens:,} tokens per batch ({parts})")]
    if gpu_bytes is None:
        rows.append(("fits the GPU?", "no GPU visible; pass --gpu-mem 80GB to check"))
    elif fits(estimate, gpu_bytes):
        rows.append(("fits the GPU?", f"fits in {size(gpu_bytes)} (keeping {HEADROOM:.0%} free)"))
    else:
        change = what_fits(config, shape, tokens, gpu_bytes, chunked)
        verdict = f"does not fit in {size(gpu_bytes)} (keeping {HEADROOM:.0%} free); " + \
            (f"fits with {change}" if change else "no single change makes it fit")
        rows.append(("fits the GPU?", verdict))
        return rows, f"memory estimate: {size(estimate.total)} per GPU {verdict}"
    return rows, None


def print_memory_table(config: Config, gpu_bytes: float | None, model_config: dict) -> str | None:
    """`sft check`: the memory estimate, and whether it fits --gpu-mem or the visible GPU; returns the problem when
    it does not fit."""
    from rich.console import Console
    from rich.table import Table

    rows, problem = memory_rows(config, gpu_bytes, model_config)
    table = Table(title="memory (estimated from config.json)", show_header=False)
    for name, value in rows:
        table.add_row(name, value)
    Console().print(table)
    return problem
