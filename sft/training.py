"""Train stage: wire config, data and model into Hugging Face Trainer, resume from the newest complete
checkpoint, and leave a finished run directory (config, manifest, log, metrics, final model)."""
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

from sft import rundir
from sft.config import Config, resolved_yaml
from sft.errors import EXIT_PREEMPTED, UserError
from sft.files import write_text_atomic

log = logging.getLogger("sft")


class Preempted(Exception):
    """Training stopped on SIGUSR1/SIGTERM after writing a complete checkpoint; the job should be requeued.
    On rank 0 it carries the command that resumes the run."""
    exit_code = EXIT_PREEMPTED

    def __init__(self, resume_command: str | None = None):
        super().__init__(resume_command)
        self.resume_command = resume_command


class Interrupted(KeyboardInterrupt):
    """Ctrl-C during a run, after the manifest recorded it: carries the command that resumes the run, and whether a
    complete checkpoint exists to resume from (without one the command starts the run over)."""

    def __init__(self, resume_command: str, has_checkpoint: bool):
        super().__init__(resume_command)
        self.resume_command = resume_command
        self.has_checkpoint = has_checkpoint


@dataclass
class RunResult:
    run_dir: Path
    metrics: dict = field(default_factory=dict)
    is_main_process: bool = True  # under torchrun only rank 0 reports


def run_training(config: Config, overwrite: bool = False, overrides: list[str] = (),
                 env_file: str | None = None) -> RunResult:
    """Train; `overrides` and `env_file` as given on the command line, for the command that resumes the run."""
    from sft.callbacks import PreemptionCallback
    from sft.logs import close_run_log
    from sft.model import check_method_runs_here

    check_method_runs_here(config)  # before a run directory exists: nothing to clean up
    preemption = PreemptionCallback()
    preemption.install()
    try:
        return _run(config, overwrite, preemption, list(overrides), env_file)
    finally:
        preemption.restore()
        close_run_log()


def start_processes(config: Config):
    """This process's place among the torchrun workers (accelerate's PartialState), with the process group set up
    as TrainingArguments would: CPU runs need cpu=True to be distributed, and the collective timeout must be given
    here, as TrainingArguments' ddp_timeout is ignored once a process group exists."""
    from datetime import timedelta

    import torch
    from accelerate import PartialState

    return PartialState(cpu=not torch.cuda.is_available(), backend=config.training.ddp_backend,
                        timeout=timedelta(seconds=config.training.ddp_timeout))


def _run(config: Config, overwrite: bool, preemption, overrides: list[str], env_file: str | None) -> RunResult:
    from accelerate.utils import broadcast_object_list

    from sft import manifest as manifests
    from sft.determinism import seed_everything
    from sft.logs import add_run_log

    state = start_processes(config)
    is_main = state.is_main_process
    # Before any model or data object exists: a new classifier head or LoRA adapter draws from these generators.
    determinism = seed_everything(config.training.seed, config.training.deterministic)
    if not is_main:
        log.setLevel(logging.WARNING)  # one copy of each progress line in the job log, from rank 0
    # Rank 0 alone resolves the name ({time} differs between ranks), creates the directory and owns it until the
    # run ends; the others get the path.
    run = broadcast_object_list([rundir.open_run_dir(config, overwrite) if is_main else None])[0]
    try:
        if is_main:
            add_run_log(run.path, run.resumed)
        resume_from = _resume_checkpoint(run, is_main)
        if is_main:
            _write_config(run.path, config, must_match=resume_from is not None)
        manifest = manifests.start_manifest(run.path, config, resume_from and rundir.checkpoint_step(resume_from)) \
            if is_main else {}
        manifest["determinism"] = determinism
        log.info("run directory %s (%s)", run.path, f"resuming from {resume_from.name}" if resume_from else "new run")
        if state.num_processes > 1:
            log.info("%d processes (%s), collectives time out after %d s (training.ddp_timeout)", state.num_processes,
                     state.backend, config.training.ddp_timeout)
        # Under slurm/'s scripts a new job resumes it (the script binds and adds its own options again).
        resume = rundir.resubmit_command(run.path.name) or \
            rundir.resume_command(config, run.path.name, overrides, env_file)
        try:
            return _train(config, state, run, resume_from, manifest, preemption, resume)
        except Preempted:
            raise
        except BaseException as error:
            disk_full = rundir.disk_full_error(error, run, resume) if is_main else None
            if is_main:
                manifests.record_failure(run.path, manifest, disk_full or error)
            if isinstance(error, KeyboardInterrupt):
                raise Interrupted(resume, bool(rundir.complete_checkpoints(run.checkpoints))) from error
            if disk_full:
                raise disk_full from error
            raise
    finally:
        run.release()
        if state.use_distributed:
            # Tear the process groups down before the interpreter does: left to exit, gloo's threads aborted a rank
            # that finished while rank 0 was still writing ("terminate called without an active exception").
            state.destroy_process_group()


def _train(config: Config, state, run: rundir.RunDir, resume_from: Path | None, manifest: dict, preemption,
           resume: str) -> RunResult:
    from sft import data, loss, manifest as manifests, model as models, samples
    from sft.callbacks import tensorboard_callback
    from sft.progress import terminal_progress
    from sft.report import print_run_start

    is_main = state.is_main_process
    config = models.for_this_device(config)
    manifest["performance"] = {"attention": config.model.attn_implementation,
                               "max_tokens_per_batch": config.training.max_tokens_per_batch,
                               "compile": config.training.compile}
    # Load data (tokenized once into the cache; under torchrun the other processes memory-map the result)
    tokenizer = models.load_tokenizer(config)
    prepared = data.prepare_for_run(config, tokenizer, run.path, state)
    if config.training.max_tokens_per_batch:  # each item becomes a whole batch, read from the cached examples
        prepared = data.in_token_budget_batches(prepared, config.training.max_tokens_per_batch)
    if is_main:
        manifests.record_data(manifest, prepared)
        manifests.write_manifest(run.path, manifest)
    log.info("data: %s format, %d training %s, %d eval", prepared.data_format, len(prepared.train),
             "token-budget batches" if config.training.max_tokens_per_batch else "examples", len(prepared.eval or []))
    for name, value in data.summary_rows(prepared.summary, prepared.files):
        log.info("data: %s: %s", name, value)
    if is_main:
        print_run_start(config, prepared, run.path, str(models.training_dtype(config)).removeprefix("torch."),
                        state.num_processes)

    # Load model and train
    _check_fsdp_settings(config, state.num_processes)
    model = models.load_model(config, prepared.label_names)
    manifest["performance"]["chunked_loss"] = loss.apply_to(config, model)
    trainer = build_trainer(config, run, model, tokenizer, prepared, preemption)
    if is_main:
        trainer.add_callback(tensorboard_callback(run.path, resume_from and rundir.checkpoint_step(resume_from)))
        progress = terminal_progress()
        if progress:
            trainer.add_callback(progress)
    if config.training.fsdp and not trainer.is_fsdp_enabled:
        raise UserError("training.fsdp: accelerate runs FSDP only on GPUs, and this run has none (it would train "
                        "with plain DDP instead); drop training.fsdp for CPU runs")
    # Samples on rank 0 only, never under FSDP: after training no single process holds the whole model.
    prompts = samples.prompts_of(prepared.eval, config.output.samples) \
        if is_main and config.task == "causal_lm" and not config.training.fsdp else []
    if prompts:
        samples.record(run.path, trainer.model, tokenizer, prompts, "before")
    trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    if state.num_processes > 1:
        log.info("rank 0 holds %.1f%% of the model's parameter values (%s)", 100 * held_fraction(trainer.model),
                 f"FSDP shards across {state.num_processes} processes" if trainer.is_fsdp_enabled
                 else "DDP: every process holds a full copy")
    # A signal during the very last step leaves nothing to resume: finish normally instead.
    if preemption.stopped_by and trainer.state.global_step < trainer.state.max_steps:
        if is_main:
            manifests.finish_manifest(run.path, manifest, "preempted")
        log.warning("stopped by %s at step %d after saving a complete checkpoint", preemption.stopped_by,
                    trainer.state.global_step)
        # Every rank exits only after rank 0 has marked the checkpoint and written the manifest: torchrun
        # SIGTERMs the remaining workers as soon as one exits.
        state.wait_for_everyone()
        raise Preempted(resume if is_main else None)

    if config.training.early_stopping and trainer.state.global_step < trainer.state.max_steps:
        log.info("stopped early at step %d: %s did not improve for %d evaluations (training.early_stopping)",
                 trainer.state.global_step, trainer.args.metric_for_best_model, config.training.early_stopping.patience)
    if config.training.load_best_model_at_end and trainer.state.best_model_checkpoint:
        # The final model is the best checkpoint: evaluate it, so the final metrics and eval_metrics.json describe it.
        log.info("final model: the best checkpoint, %s", Path(trainer.state.best_model_checkpoint).name)
        trainer.evaluate()

    # Save the final model: every rank takes part (gathering sharded weights is a collective), rank 0 writes.
    metrics = {**final_metrics(trainer.state.log_history), **run_throughput(trainer)}
    if trainer.state.best_model_checkpoint:
        metrics["best_checkpoint"] = Path(trainer.state.best_model_checkpoint).name
    save_final(trainer, config, run.path)
    if is_main:
        manifests.finish_manifest(run.path, manifest, "finished", metrics)
        write_report_of(run.path, (lambda: samples.record(run.path, trainer.model, tokenizer, prompts, "after"))
                        if prompts else None)
    # No barrier here: the other ranks are done, and waiting for rank 0's writes would count against ddp_timeout.
    return RunResult(run.path, metrics, is_main)


def write_report_of(run_dir: Path, samples_after=None) -> None:
    """Samples after training, then report.md and plots. The model is saved and the run marked finished by now: a
    failure here must not fail the run."""
    from sft.run_report import write_report

    try:
        if samples_after:
            samples_after()
        log.info("report: %s", write_report(run_dir))
    except Exception as error:  # noqa: BLE001 - any plotting or rendering problem
        log.warning("report.md not written (%s: %s); retry with `sft report %s`", type(error).__name__, error,
                    run_dir)


def _check_fsdp_settings(config: Config, num_processes: int) -> None:
    if not config.training.fsdp:
        return
    if num_processes == 1:
        raise UserError("training.fsdp: FSDP shards the model across processes, and this run has one; start it with "
                        "torchrun (slurm/train_multi.sbatch), or drop training.fsdp")
    if config.method.name == "lora" and config.method.merge:
        raise UserError("method.merge: under training.fsdp no process holds the whole trained model to merge; "
                        "set method.merge: false and merge the saved adapter afterwards")


def held_fraction(model) -> float:
    """Share of the model's parameter values stored in this process: 1 under DDP, about 1/N under FSDP over N."""
    from torch.distributed.tensor import DTensor

    held = sum(p.to_local().numel() if isinstance(p, DTensor) else p.numel() for p in model.parameters())
    return held / sum(p.numel() for p in model.parameters())


def _write_config(run_dir: Path, config: Config, must_match: bool) -> None:
    """config.yaml; a run resumed from a checkpoint must keep its settings (a run that never reached one may change)."""
    path, text = run_dir / "config.yaml", resolved_yaml(config)
    if must_match and path.is_file() and path.read_text() != text:
        # output.name may differ: the printed resume command pins a template ({time}) to the name it resolved to.
        changed = [key for key in _changed_keys(path.read_text(), text) if key != "output.name"]
        if not changed:
            return
        raise UserError(f"output: {run_dir} was started with a different config ({', '.join(changed)} changed); "
                        f"resume with the same settings, or choose a new output.name")
    write_text_atomic(path, text)


def _changed_keys(old_yaml: str, new_yaml: str) -> list[str]:
    import yaml

    def flat(node, prefix=""):
        if isinstance(node, dict):
            return {k: v for key, value in node.items() for k, v in flat(value, f"{prefix}{key}.").items()}
        return {prefix.rstrip("."): node}

    old, new = flat(yaml.safe_load(old_yaml)), flat(yaml.safe_load(new_yaml))
    return sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))


def _resume_checkpoint(run: rundir.RunDir, is_main: bool) -> Path | None:
    if not run.resumed:
        return None
    complete = rundir.complete_checkpoints(run.checkpoints)
    newest = complete[-1] if complete else None
    if is_main:
        for path in rundir.discard_incomplete_checkpoints(run.checkpoints):
            log.warning("removed incomplete checkpoint %s (interrupted while saving)", path.name)
        _drop_metrics_after(run.path, rundir.checkpoint_step(newest) if newest else 0)
    return newest


def _drop_metrics_after(run_dir: Path, step: int) -> None:
    """Lines logged after the checkpoint we resume from are recomputed (identically), so drop the old copies,
    and the interrupted session's closing summary (train_runtime), which the resumed session writes anew."""
    path = run_dir / "metrics.jsonl"
    if path.is_file():
        records = [json.loads(line) for line in path.read_text().splitlines() if line]
        kept = [r for r in records if r.get("step", 0) <= step and "train_runtime" not in r]
        write_text_atomic(path, "".join(json.dumps(r) + "\n" for r in kept))


# Trainer wiring

def build_trainer(config: Config, run: rundir.RunDir, model, tokenizer, prepared, preemption):
    import torch
    from transformers import EarlyStoppingCallback, PrinterCallback, Trainer, TrainingArguments

    from sft.callbacks import (CompleteCheckpointCallback, EvalMetricsCallback, MetricsFileCallback,
                               NonFiniteLossCallback, OverfittingWarningCallback)
    from sft.metrics import ClassificationMetrics, CausalLMMetrics, predicted_token_ids
    from sft.model import training_dtype
    from sft.throughput import ThroughputCallback

    t = config.training
    has_eval = prepared.eval is not None
    by_tokens = bool(t.max_tokens_per_batch) and config.task == "causal_lm"
    dtype = training_dtype(config)
    on_gpu = torch.cuda.is_available()
    stopping = t.early_stopping
    # Trainer tracks the best checkpoint, which the rotation then keeps, only when it has a metric for it: give it
    # one whenever runs evaluate and save, so the best epoch of an overfitting run is never rotated away.
    evaluates_and_saves = has_eval and t.eval_strategy != "no" and t.save_strategy != "no"
    best_metric = stopping.metric if stopping else ("eval_loss" if evaluates_and_saves else None)
    compute_metrics = None
    if has_eval:
        compute_metrics = ClassificationMetrics(prepared.label_names) if config.task == "classification" \
            else CausalLMMetrics()
    args = TrainingArguments(
        output_dir=str(run.checkpoints),
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
        disable_tqdm=True,  # sft.progress draws the bar on a terminal
        use_cpu=not on_gpu,
        # Loading an 8,192-token batch from the cache takes 1.5 ms (bench/dataloader_probe.py), under 1% of a 0.5B
        # model's step on an H100: workers would overlap almost nothing and cost a process each.
        dataloader_num_workers=0,
        dataloader_pin_memory=on_gpu,
    )
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=prepared.train,
        eval_dataset=prepared.eval,
        processing_class=tokenizer,
        data_collator=make_collator(config, tokenizer),
        compute_metrics=compute_metrics,
        preprocess_logits_for_metrics=predicted_token_ids if config.task == "causal_lm" else None,
        # ThroughputCallback first: it adds tokens/s to the logs that MetricsFileCallback writes.
        callbacks=[ThroughputCallback(), MetricsFileCallback(run.path), EvalMetricsCallback(run.path, compute_metrics),
                   OverfittingWarningCallback(run.path, t.overfitting_warning),
                   CompleteCheckpointCallback(t.save_total_limit), preemption, NonFiniteLossCallback()]
                  + ([EarlyStoppingCallback(stopping.patience, stopping.threshold)] if stopping else []),
    )
    # Without tqdm Trainer prints raw log dicts; MetricsFileCallback already logs each step readably.
    trainer.remove_callback(PrinterCallback)
    if config.task == "classification":
        # Sequence-classification forwards take **kwargs, so Trainer assumes their loss divides by the token count
        # of the whole step (num_items_in_batch) and multiplies it by the number of processes. BERT-style heads take
        # a plain batch mean instead: without this, losses and gradients come out x world size under DDP.
        trainer.model_accepts_loss_kwargs = False
    return trainer


def make_collator(config: Config, tokenizer):
    from transformers import DataCollatorWithFlattening, DataCollatorWithPadding

    from sft.data import TokenBudgetCollator

    if config.task == "classification":
        return DataCollatorWithPadding(tokenizer)
    # Padding-free: examples are concatenated and position_ids restart at each one, so attention stays
    # within an example (tests/test_training.py checks packed loss == per-example loss).
    flatten = DataCollatorWithFlattening(return_position_ids=True)
    if config.training.max_tokens_per_batch:
        return TokenBudgetCollator(flatten)
    return flatten


def final_metrics(log_history: list[dict]) -> dict:
    """Last training loss and last evaluation, as the run's headline numbers."""
    from sft.metrics import perplexity

    metrics = {}
    train_losses = [entry for entry in log_history if "loss" in entry]
    if train_losses:
        metrics["train_loss"] = train_losses[-1]["loss"]
    evaluations = [entry for entry in log_history if "eval_loss" in entry]
    if evaluations:
        metrics.update({k: v for k, v in evaluations[-1].items() if k.startswith("eval_") and "runtime" not in k
                        and "per_second" not in k})
        if "eval_accuracy" not in metrics:
            metrics["eval_perplexity"] = perplexity(metrics["eval_loss"])
    summary = [entry for entry in log_history if "train_runtime" in entry]
    if summary:
        metrics["train_runtime_s"] = summary[-1]["train_runtime"]
    metrics["steps"] = max((entry.get("step", 0) for entry in log_history), default=0)
    return metrics


def run_throughput(trainer) -> dict:
    """Real tokens, tokens/s, token efficiency (and MFU) of this session, for the end summary and manifest."""
    from sft.throughput import ThroughputCallback

    return next(c.summary for c in trainer.callback_handler.callbacks if isinstance(c, ThroughputCallback))


def save_final(trainer, config: Config, run_dir: Path) -> None:
    """final/: model (or LoRA adapter) + tokenizer in safetensors; final/merged/ when method.merge is set.
    Written like a checkpoint: into a temporary folder, marked complete, then moved into place.
    Called on every rank: under FSDP the full weights exist only while all ranks gather them; rank 0 writes."""
    partial = rundir.start_final(run_dir) if trainer.args.should_save else run_dir / rundir.FINAL_IN_PROGRESS
    trainer.save_model(str(partial))
    if not trainer.args.should_save:
        return
    if config.method.name == "lora" and config.method.merge:
        merged = trainer.model.merge_and_unload()
        merged.save_pretrained(str(partial / "merged"))  # transformers 5 writes safetensors only
        trainer.processing_class.save_pretrained(str(partial / "merged"))
    # A pickle of TrainingArguments (torch.load runs code to read it): config.yaml already records every setting.
    (partial / "training_args.bin").unlink(missing_ok=True)
    final = rundir.publish_final(partial)
    log.info("saved %s to %s", "model" if config.method.name == "full" else "adapter", final)
