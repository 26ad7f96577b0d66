"""Loading: tokenizer and model from where sft.model.hub says the files live, with the safetensors, remote-code
and offline rules every loader follows (training, predict, export), wrapped in LoRA when asked."""
import logging
from contextlib import contextmanager
from pathlib import Path

from sft.config import Config
from sft.errors import UserError
from sft.model.device import check_method_runs_here, choose_attention, training_dtype, weights_dtype
from sft.model.hub import resolve_model_path

log = logging.getLogger("sft")


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
        from sft.model.hub import offline_hint

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
