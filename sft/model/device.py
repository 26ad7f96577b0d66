"""What this device trains with: compute dtype, attention kernel, token budget and whether the method runs here;
the same rules for `sft check` (asked about the job's device) and `sft train`."""
import importlib.util
import logging

from sft.config import Config
from sft.errors import UserError
from sft.model.estimate import CPU_TOKEN_BUDGET, GPU_TOKEN_BUDGET

log = logging.getLogger("sft")


def training_dtype(config: Config, gpu: bool | None = None):
    """The compute dtype (autocast): bf16 where the GPU supports it, fp32 on CPU unless asked for (CPU bf16
    autocast works but is slower on CPUs without bf16 instructions). fp16 needs a GPU (a loss scaler on CUDA).
    gpu: whether the run trains on a GPU; None: this machine's device."""
    import torch

    names = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    on_gpu = torch.cuda.is_available() if gpu is None else gpu
    if config.model.dtype == "float16" and not on_gpu:
        raise UserError("model.dtype: float16 needs a CUDA GPU (no GPU is visible); use bfloat16 or float32 on CPU")
    if config.model.dtype != "auto":
        return names[config.model.dtype]
    # `sft check --gpu-mem` on a login node cannot ask the GPU: the GPUs jobs train on (A100, H100) support bf16.
    if on_gpu and (not torch.cuda.is_available() or torch.cuda.is_bf16_supported()):
        return torch.bfloat16
    return torch.float32


def weights_dtype(config: Config):
    """Trained weights stay fp32 under bf16/fp16 autocast (AdamW updates on half-precision weights lose precision,
    and the fp16 loss scaler refuses to unscale fp16 gradients); LoRA's frozen base weights can live in the compute
    dtype and halve memory."""
    import torch

    compute_dtype = training_dtype(config)
    return torch.float32 if config.method.name == "full" else compute_dtype


# On CPU, flex_attention has no backward (torch 2.13), and eager beat sdpa on packed batches in `make bench`'s
# model (bench/RESULTS.md): both build the same (sum of lengths)^2 block mask from position_ids.
CPU_ATTENTION = "eager"


def attention_problem(config: Config, gpu: bool) -> str | None:
    """Why model.attn_implementation, as set in the config, cannot train on a GPU (gpu) or on CPU; None if it can."""
    requested = config.model.attn_implementation
    if requested == "flex_attention" and not gpu:
        return ("model.attn_implementation: flex_attention has no backward pass on CPU (torch raises "
                "NotImplementedError at the first step); use auto (eager on CPU) or sdpa, or train on a GPU "
                "(`sft check --gpu-mem SIZE` checks for one)")
    if requested == "flash_attention_2" and importlib.util.find_spec("flash_attn") is None:
        return ("model.attn_implementation: flash_attention_2 needs the flash-attn package, which is not installed; "
                "use sdpa or flex_attention")
    if requested == "flash_attention_2" and not gpu:
        return "model.attn_implementation: flash_attention_2 runs on CUDA GPUs only; use auto (eager on CPU) or sdpa"
    return None


def choose_attention(config: Config) -> tuple[str, str]:
    """model.attn_implementation resolved for this device and task, and why."""
    import torch

    requested = config.model.attn_implementation
    if requested != "auto":
        problem = attention_problem(config, torch.cuda.is_available())
        if problem:
            raise UserError(problem)
        return requested, "set in the config"
    if config.task == "classification":
        return "sdpa", "classification batches are padded, not packed"
    if not torch.cuda.is_available():
        return CPU_ATTENTION, "fastest measured on CPU (flex_attention has no CPU backward)"
    from transformers.utils import is_flash_attn_2_available, is_flash_attn_3_available

    if is_flash_attn_3_available() and torch.cuda.get_device_capability()[0] == 9:
        return "flash_attention_3", "varlen flash attention (flash-attn 3, Hopper) is installed"
    if is_flash_attn_2_available():
        return "flash_attention_2", "varlen flash attention (flash-attn 2) is installed"
    if importlib.util.find_spec("torch.nn.attention.flex_attention"):
        return "flex_attention", "document masking for packed batches, fastest measured on an H100"
    return "sdpa", "no flash-attn or flex_attention in this torch; cuDNN SDPA off for variable shapes"


def token_budget(config: Config) -> int | None:
    """training.max_tokens_per_batch resolved for this device: None means batch_size examples per batch."""
    import torch

    budget = config.training.max_tokens_per_batch
    if budget != "auto":
        return budget
    if config.task != "causal_lm":
        return None
    if not torch.cuda.is_available():
        return max(CPU_TOKEN_BUDGET, config.data.max_length)
    return max(gpu_token_budget(config, torch.cuda.get_device_properties(0).total_memory), config.data.max_length)


def gpu_token_budget(config: Config, gpu_bytes: float) -> int:
    """GPU_TOKEN_BUDGET, halved while the memory estimate says a batch that size would not fit."""
    from sft.model import estimate

    model_config = estimate.read_model_config(config)
    budget = GPU_TOKEN_BUDGET
    if model_config is None:
        return budget
    shape = estimate.shape_from_config(model_config)
    chunked = estimate.uses_chunked_loss(config, model_config)
    while budget > config.data.max_length and not estimate.fits(estimate.estimate_memory(
            shape, config.method.name, budget, gradient_checkpointing=config.training.gradient_checkpointing,
            lora_rank=config.method.lora.r, chunked_loss=chunked), gpu_bytes):
        budget //= 2
    return budget


def for_this_device(config: Config) -> Config:
    """A copy of the config with `auto` attention and token budget resolved (logged; the manifest records them).
    With sdpa on a GPU the cuDNN backend is switched off: it re-plans for every new shape, and padding-free
    batches all differ (measured in docs/performance.md)."""
    import torch

    attention, why = choose_attention(config)
    resolved = config.model_copy(deep=True)
    resolved.model.attn_implementation = attention
    resolved.training.max_tokens_per_batch = token_budget(config)
    if attention == "sdpa" and torch.cuda.is_available() and config.model.attn_implementation == "auto":
        torch.backends.cuda.enable_cudnn_sdp(False)
    log.info("attention: %s (%s); batches: %s", attention, why,
             f"{resolved.training.max_tokens_per_batch} tokens" if resolved.training.max_tokens_per_batch
             else f"{config.training.batch_size} examples")
    return resolved


def method_problem(config: Config, gpu: bool) -> str | None:
    """Why method.name cannot train on a GPU (gpu) or on CPU; None if it can."""
    if config.method.name != "qlora":
        return None
    if not gpu:
        return ("method.name: qlora quantizes the base model with bitsandbytes on a CUDA GPU, and no GPU is "
                "visible; use lora (or full) on CPU, or run on a GPU node")
    if importlib.util.find_spec("bitsandbytes") is None:
        return ("method.name: qlora needs the bitsandbytes package, which is not installed; "
                "pip install bitsandbytes (the GPU image ships it), or use lora")
    return None


def check_method_runs_here(config: Config) -> None:
    """qlora needs a CUDA GPU and bitsandbytes: say so before any data is tokenized or weights are read."""
    import torch

    problem = method_problem(config, torch.cuda.is_available())
    if problem:
        raise UserError(problem)
