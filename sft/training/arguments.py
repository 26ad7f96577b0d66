"""Trainer's arguments from a config, without a model or data: `sft train` builds them for Trainer and `sft check`
builds the very same object, so what check accepts, Trainer accepts (transformers' refusals become one line that
names the config key)."""
import logging
from pathlib import Path

from sft.config import Config
from sft.errors import UserError


def training_arguments(config: Config, output_dir: Path, gpu: bool | None = None):
    """Trainer's arguments for this config, without a model or data: train and `sft check` build the same object, so
    what check accepts, Trainer accepts. gpu: whether the run trains on a GPU; None: this machine's device.
    Raises a one-line UserError naming the config key when transformers refuses a setting."""
    import torch
    from transformers import TrainingArguments

    from sft.model.device import training_dtype

    t = config.training
    # The data stage holds out data.eval_fraction or reads data.eval, or fails: eval data exists exactly when asked.
    has_eval = config.data.eval is not None or config.data.eval_fraction > 0
    by_tokens = bool(t.max_tokens_per_batch) and config.task == "causal_lm"
    dtype = training_dtype(config, gpu)
    # The device settings follow this machine: TrainingArguments sets up the device it is built on.
    on_gpu = torch.cuda.is_available()
    stopping = t.early_stopping
    # Trainer tracks the best checkpoint, which the rotation then keeps, only when it has a metric for it: give it
    # one whenever runs evaluate and save, so the best epoch of an overfitting run is never rotated away.
    evaluates_and_saves = has_eval and t.eval_strategy != "no" and t.save_strategy != "no"
    best_metric = stopping.metric if stopping else ("eval_loss" if evaluates_and_saves else None)
    options = dict(
        output_dir=str(output_dir),
        num_train_epochs=t.epochs,
        max_steps=t.max_steps,
        # With a token budget each dataset row already is a whole batch.
        per_device_train_batch_size=1 if by_tokens else t.batch_size,
        per_device_eval_batch_size=1 if by_tokens else (t.eval_batch_size or t.batch_size),
        gradient_accumulation_steps=t.gradient_accumulation_steps,
        learning_rate=t.learning_rate,
        weight_decay=t.weight_decay,
        warmup_steps=t.warmup_ratio,  # transformers 5: a float below 1 is a ratio of total steps
        lr_scheduler_type=t.lr_scheduler,
        max_grad_norm=t.max_grad_norm,
        eval_strategy=t.eval_strategy if has_eval else "no",
        eval_steps=t.eval_steps,
        save_strategy=t.save_strategy,
        save_steps=t.save_steps,
        save_total_limit=None,  # CompleteCheckpointCallback rotates, after the new checkpoint is complete
        load_best_model_at_end=t.load_best_model_at_end,
        metric_for_best_model=best_metric,
        # A resumed run continues early stopping's patience count instead of starting it again (off by default).
        restore_callback_states_from_checkpoint=True,
        logging_strategy="steps",
        logging_steps=t.logging_steps,
        logging_nan_inf_filter=False,  # a non-finite loss must reach the log: NonFiniteLossCallback stops on it
        seed=t.seed,
        data_seed=t.seed,
        # Autocast to the compute dtype over fp32 trained weights (model.weights_dtype); on CPU too when asked for.
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        activation_checkpointing=t.gradient_checkpointing,
        ddp_backend=t.ddp_backend,
        ddp_timeout=t.ddp_timeout,
        # Every trainable parameter takes part in each forward pass; searching for unused ones costs a graph walk.
        ddp_find_unused_parameters=False,
        fsdp=t.fsdp,
        torch_compile=t.compile,
        report_to="none",
        remove_unused_columns=False,
        disable_tqdm=True,  # sft.training.progress draws the bar on a terminal
        use_cpu=not on_gpu,
        # Loading a batch is under 1% of a GPU step (measured, docs/performance.md): workers would overlap almost
        # nothing and cost a process each.
        dataloader_num_workers=0,
        dataloader_pin_memory=on_gpu,
    )
    # training.fsdp is Trainer's option string, which transformers warns about on every construction: noise in
    # the log, and a second line under `sft check`'s one-line error.
    logger, drop = logging.getLogger("transformers.training_args"), _DropFsdpStringWarning()
    logger.addFilter(drop)
    try:
        # An unset setting (None) means Trainer's default: passed on, None replaces the default (save_strategy steps
        # with save_steps None failed with a TypeError after data preparation).
        return TrainingArguments(**{name: value for name, value in options.items() if value is not None})
    except (ValueError, TypeError) as error:
        raise UserError(trainer_refusal(str(error))) from None
    finally:
        logger.removeFilter(drop)


class _DropFsdpStringWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "Passing `fsdp` as a string is deprecated" not in record.getMessage()


# A fragment of what transformers says when it refuses a setting → the config key it is about, and how to fix it.
# Checked in order: the first fragment found names the key.
TRAINER_REFUSALS = (
    ("load_best_model_at_end", "training.load_best_model_at_end",
     "save and evaluate at the same points: save_strategy equal to eval_strategy, and under steps save_steps a "
     "multiple of eval_steps (eval_steps defaults to training.logging_steps)"),
    ("SchedulerType", "training.lr_scheduler", "use a transformers scheduler name such as linear, cosine or "
                                               "constant_with_warmup"),
    ("lr_scheduler_type", "training.lr_scheduler", "set training.eval_strategy (and data.eval or data.eval_fraction) "
                                                   "or use cosine"),
    ("min_lr", "training.lr_scheduler", "sft passes no scheduler arguments; use cosine, linear or "
                                        "constant_with_warmup"),
    ("num_decay_steps", "training.lr_scheduler", "sft passes no scheduler arguments; use cosine, linear or "
                                                 "constant_with_warmup"),
    ("lr_end", "training.learning_rate", "raise it above the schedule's end rate, or use linear"),
    ("fsdp", "training.fsdp", "write space-separated options from full_shard, shard_grad_op, offload, auto_wrap"),
    ("bf16", "model.dtype", "use float32, or a GPU with bf16 support"),
    ("fp16", "model.dtype", "use bfloat16 or float32"),
    ("warmup", "training.warmup_ratio", "use a ratio from 0 to below 1"),
    ("logging_steps", "training.logging_steps", "use a whole number of steps"),
    ("eval_steps", "training.eval_steps", "use a whole number of steps"),
    ("save_steps", "training.save_steps", "use a whole number of steps"),
)


def trainer_refusal(message: str) -> str:
    """transformers' message for a refused setting, as one line that starts with the config key."""
    said = " ".join(message.split())
    for fragment, key, fix in TRAINER_REFUSALS:
        if fragment in said:
            return f"{key}: {said} (transformers); {fix}"
    return f"training: transformers refuses these settings: {said}; change the setting it names"


def trainer_problems(config: Config, gpu: bool | None = None) -> list[str]:
    """What TrainingArguments, as train builds them, and Trainer's learning rate schedule (which otherwise fails at
    the first step) refuse. gpu: whether the run trains on a GPU; None: this machine's device."""
    import torch
    from transformers import get_scheduler

    try:
        args = training_arguments(config, Path(config.output.dir), gpu)
    except UserError as error:
        return [str(error)]
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=args.learning_rate)
    # The run's length is known only after data preparation; no scheduler's rules depend on it.
    steps = args.max_steps if args.max_steps > 0 else 100
    try:  # as Trainer.create_scheduler calls it
        get_scheduler(args.lr_scheduler_type, optimizer, num_warmup_steps=args.get_warmup_steps(steps),
                      num_training_steps=steps, scheduler_specific_kwargs=args.lr_scheduler_kwargs)
    except (ValueError, TypeError) as error:
        return [trainer_refusal(str(error))]
    return []
