"""Model stage: load tokenizer and model (from where sft.hub says the weights live), wrap in LoRA when asked."""
import importlib.util
import logging
from contextlib import contextmanager
from pathlib import Path

from sft.config import Config
from sft.errors import UserError
from sft.estimate import CPU_TOKEN_BUDGET, GPU_TOKEN_BUDGET
from sft.hub import resolve_model_path

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
    from sft import estimate

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


def load_tokenizer(config: Config):
    from transformers import AutoTokenizer

    path = resolve_model_path(config.model.name)
    tokenizer = _from_pretrained(AutoTokenizer, path, config)
    if tokenizer.pad_token is None:
        # Causal LMs often ship without a pad token; padding-free batches barely use it, eval batching does.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(config: Config, label_names: list[str] | None = None):
    """The model as Trainer will train it: base weights, plus LoRA adapters when method.name is lora."""
    path = resolve_model_path(config.model.name)
    options = {"attn_implementation": choose_attention(config)[0]}
    if config.method.name == "qlora":
        check_method_runs_here(config)
        options["quantization_config"] = qlora_quantization(config)
    model = load_pretrained(config, path, label_names, **options)
    if config.training.gradient_checkpointing:
        model.config.use_cache = False
    if config.method.name == "qlora":
        from peft import prepare_model_for_kbit_training

        # Casts norms and the head to fp32 and enables input gradients, which a frozen 4-bit base needs for the
        # adapters' gradients to flow; checkpointing as configured (not peft's default of always on).
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=config.training.gradient_checkpointing)
    if config.method.name in ("lora", "qlora"):
        model = _wrap_lora(model, config)
    total, trainable = count_parameters(model)
    log.info("model %s: %s parameters, %s trainable (%.2f%%)", path, f"{total:,}", f"{trainable:,}",
             100 * trainable / total)
    return model


def load_pretrained(config: Config, path: str | Path, label_names: list[str] | None = None,
                    head_in_adapter: bool = False, **options):
    """The model class config.task needs, loaded from path by the rules of every sft load (training, predict,
    export): safetensors unless model.allow_pickle, remote code only with model.trust_remote_code, one-line errors
    with offline hints. A classifier gets its label names in the model config, so exported models show them.
    head_in_adapter: the classifier head is missing here because a LoRA adapter loaded next brings it."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    if config.task != "classification":
        return _from_pretrained(AutoModelForCausalLM, path, config, **options)
    options |= {"num_labels": len(label_names),
                "id2label": dict(enumerate(label_names)),
                "label2id": {name: i for i, name in enumerate(label_names)}}
    return _from_pretrained(AutoModelForSequenceClassification, path, config, head_in_adapter, **options)


def count_parameters(model) -> tuple[int, int]:
    """The model's parameter values, all and trainable. A 4-bit weight (bitsandbytes Params4bit) packs two values
    per byte, so its numel() is half or less of its real count: the shape it was quantized from is in quant_state."""
    def values(parameter) -> int:
        quant_state = getattr(parameter, "quant_state", None)
        return quant_state.shape.numel() if quant_state is not None else parameter.numel()

    parameters = list(model.parameters())
    return sum(map(values, parameters)), sum(values(p) for p in parameters if p.requires_grad)


def qlora_quantization(config: Config):
    """NF4 with double quantization (the QLoRA paper's settings), computing in the training dtype."""
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=training_dtype(config))


def _wrap_lora(model, config: Config):
    from peft import LoraConfig, TaskType, get_peft_model

    lora = config.method.lora
    task_type = TaskType.SEQ_CLS if config.task == "classification" else TaskType.CAUSAL_LM
    # For SEQ_CLS, peft adds the classifier head to modules_to_save: it is trained fully and saved with the adapter.
    peft_config = LoraConfig(task_type=task_type, r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                             target_modules=lora.target_modules)
    try:
        model = get_peft_model(model, peft_config)
    except ValueError as error:
        raise UserError(f"method.lora.target_modules: {error}") from None
    # peft keeps adapters in fp32, but modules_to_save (the classifier head) are copies in the base's dtype:
    # every trained parameter gets fp32 master weights, like full fine-tuning.
    for parameter in model.parameters():
        if parameter.requires_grad:
            parameter.data = parameter.data.float()
    return model


def _from_pretrained(auto_class, path: str | Path, config: Config, head_in_adapter: bool = False, **options):
    """Load from a folder or the hub, turning 'not found / offline' into one actionable line; options override
    the defaults (e.g. the dtype predict computes in)."""
    kwargs = {"revision": config.model.revision, "trust_remote_code": config.model.trust_remote_code}
    is_model = "Tokenizer" not in auto_class.__name__
    if is_model:
        kwargs |= {"dtype": weights_dtype(config), "output_loading_info": True}
        # Safetensors only: transformers would otherwise fall back to pytorch_model.bin, a pickle.
        kwargs["use_safetensors"] = None if config.model.allow_pickle else True
    try:
        if not is_model:
            return auto_class.from_pretrained(path, **kwargs | options)
        with _without_load_report():
            model, loading_info = auto_class.from_pretrained(path, **kwargs | options)
        _log_loading(model, loading_info, head_in_adapter)
        return model
    except ImportError as error:  # e.g. flash_attention_2 without the flash-attn package, or on CPU
        raise UserError(f"model.attn_implementation: {config.model.attn_implementation}: "
                        f"{str(error).splitlines()[0]} Use sdpa or flex_attention instead.") from None
    except ValueError as error:
        if "trust_remote_code" not in str(error):
            raise
        raise UserError(f"model.name: {path} brings its own Python code, which would run on load; set "
                        f"model.trust_remote_code: true only if you trust its authors") from None
    except OSError as error:
        if not config.model.allow_pickle and _pickle_weights_only(path, error):
            raise UserError(f"model.name: {path} has its weights only as pickle files (e.g. pytorch_model.bin), "
                            f"which can run code when loaded; convert them to safetensors, or set "
                            f"model.allow_pickle: true if you trust them") from None
        if Path(path).exists():
            raise UserError(f"model.name: {path}: {str(error).splitlines()[0]}") from None
        from sft.hub import offline_hint

        raise UserError(f"model.name: cannot load '{path}' (not a local folder, and the hub copy is not cached; "
                        f"runs are offline by default): {offline_hint(path, config.model.revision)}") from None


def _pickle_weights_only(path: str, error: OSError) -> bool:
    """Whether loading failed because only pickle weights exist (refused by use_safetensors=True)."""
    folder = Path(path)
    if folder.is_dir():
        return not any(folder.glob("*.safetensors*")) and any(
            folder.glob(pattern) for pattern in ("*.bin", "*.bin.index.json", "*.pt", "*.pth", "*.ckpt"))
    return "cannot be loaded with `safetensors`" in str(error)


class _DropLoadReport(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "LOAD REPORT" not in record.getMessage()


@contextmanager
def _without_load_report():
    """transformers logs a many-line table of missing/unused weights; _log_loading says the same in a line or two."""
    logger, drop = logging.getLogger("transformers.modeling_utils"), _DropLoadReport()
    logger.addFilter(drop)
    try:
        yield
    finally:
        logger.removeFilter(drop)


def _log_loading(model, loading_info: dict, head_in_adapter: bool = False) -> None:
    """A new task head (weights outside the base model) is expected; missing base weights are not."""
    prefix = f"{model.base_model_prefix}."
    missing = sorted(loading_info["missing_keys"])
    head = [key for key in missing if not key.startswith(prefix)]
    base = [key for key in missing if key.startswith(prefix)]
    if head and not head_in_adapter:
        log.info("new classifier head initialised (%s), trained from scratch", ", ".join(head))
    if base:
        log.warning("%d weights of the base model are not in the checkpoint and were initialised randomly: %s",
                    len(base), _some(base))
    if loading_info["unexpected_keys"]:
        log.info("%d checkpoint weights are not used by this model (e.g. a pretraining head): %s",
                 len(loading_info["unexpected_keys"]), _some(sorted(loading_info["unexpected_keys"])))


def _some(keys: list[str], shown: int = 4) -> str:
    return ", ".join(keys[:shown]) + (f" and {len(keys) - shown} more" if len(keys) > shown else "")
