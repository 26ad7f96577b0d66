"""Train stage: wire config, data and model into Hugging Face Trainer, resume from the newest complete
checkpoint, and leave a finished run directory (config, manifest, log, metrics, final model)."""
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

from sft.config import Config
from sft.errors import EXIT_PREEMPTED, UserError
from sft.run.checkpoints import (FINAL_IN_PROGRESS, checkpoint_step, complete_checkpoints, disk_full_error,
                                 publish_final, start_final)
from sft.run.directory import RunDir, open_run_dir
from sft.run.naming import resubmit_command, resume_command
from sft.training.resume import go_back_to, may_change_on_restart, resume_checkpoint, write_run_config

log = logging.getLogger("sft")


class Preempted(Exception):
    """Training stopped on SIGUSR1/SIGTERM or by the wall-time guard (sft/training/walltime.py) after writing a complete
    checkpoint; the job should be requeued.
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
                 env_file: str | None = None, allow_data_change: bool = False,
                 from_checkpoint: str | None = None) -> RunResult:
    """Train; `overrides` and `env_file` as given on the command line, for the command that resumes the run;
    `allow_data_change` lets a resume continue on data whose content changed since the run started;
    `from_checkpoint` (checkpoint-N) restarts an unfinished run from that checkpoint instead of the newest."""
    from sft.data import check_sources_exist
    from sft.logs import close_run_log
    from sft.model.device import check_method_runs_here
    from sft.training.callbacks import PreemptionCallback
    from sft.training.walltime import WallTimeCallback

    check_method_runs_here(config)  # before a run directory exists: nothing to clean up
    check_sources_exist(config)  # a wrong data path, too
    preemption = PreemptionCallback()
    preemption.install()
    walltime = WallTimeCallback.for_session(config, preemption)  # a stop_at duration counts from now
    try:
        return _run(config, overwrite, preemption, walltime, list(overrides), env_file, allow_data_change,
                    from_checkpoint)
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


def _run(config: Config, overwrite: bool, preemption, walltime, overrides: list[str], env_file: str | None,
         allow_data_change: bool, from_checkpoint: str | None) -> RunResult:
    from accelerate.utils import broadcast_object_list

    from sft.logs import add_run_log
    from sft.run import manifest as manifests
    from sft.training.arguments import trainer_problems
    from sft.training.determinism import seed_everything

    state = start_processes(config)
    is_main = state.is_main_process
    # Trainer's own arguments, before a run directory exists; built only now because building them sets up the
    # process group, which start_processes must create first (with training.ddp_timeout).
    problems = trainer_problems(config)
    if problems:
        raise UserError("; ".join(problems))
    # Before any model or data object exists: a new classifier head or LoRA adapter draws from these generators.
    determinism = seed_everything(config.training.seed, config.training.deterministic)
    if not is_main:
        log.setLevel(logging.WARNING)  # one copy of each progress line in the job log, from rank 0
    # Rank 0 alone resolves the name ({time} differs between ranks), creates the directory and owns it until the
    # run ends; the others get the path.
    run = broadcast_object_list([open_run_dir(config, overwrite) if is_main else None])[0]
    try:
        moved_aside = None
        if from_checkpoint:  # every rank was given it: rank 0 decides, and tells the others
            from_checkpoint, moved_aside = broadcast_object_list(
                [go_back_to(run, from_checkpoint) if is_main else None])[0]
        if is_main:
            add_run_log(run.path, run.resumed)
        resume_from = resume_checkpoint(run, is_main, from_checkpoint)
        may_change = may_change_on_restart(config) if from_checkpoint else ()
        changed_settings = write_run_config(run.path, config, must_match=resume_from is not None,
                                         may_change=may_change) if is_main else {}
        manifest = manifests.start_manifest(run.path, config, resume_from and checkpoint_step(resume_from),
                                            changed_settings) if is_main else {}
        if from_checkpoint and is_main:
            changed = {key: change for key, change in changed_settings.items() if key in may_change}
            manifests.record_chosen_checkpoint(run.path, manifest, from_checkpoint, moved_aside, changed)
            log.warning("restarting from %s%s%s", from_checkpoint,
                        f"; the checkpoints after it are in {moved_aside}" if moved_aside else "",
                        "; changed: " + ", ".join(f"{key} {change['from']} -> {change['to']}"
                                                  for key, change in changed.items()) if changed else "")
        manifest["determinism"] = determinism
        log.info("run directory %s (%s)", run.path, f"resuming from {resume_from.name}" if resume_from else "new run")
        if state.num_processes > 1:
            log.info("%d processes (%s), collectives time out after %d s (training.ddp_timeout)", state.num_processes,
                     state.backend, config.training.ddp_timeout)
        # Under slurm/'s scripts a new job resumes it (the script binds and adds its own options again).
        resume = resubmit_command(run.path.name) or \
            resume_command(config, run.path.name, overrides, env_file)
        try:
            return _train(config, state, run, resume_from, manifest, preemption, walltime, resume, allow_data_change)
        except Preempted:
            raise
        except BaseException as error:
            disk_full = disk_full_error(error, run, resume) if is_main else None
            if is_main:
                manifests.record_failure(run.path, manifest, disk_full or error)
            if isinstance(error, KeyboardInterrupt):
                raise Interrupted(resume, bool(complete_checkpoints(run.checkpoints))) from error
            if disk_full:
                raise disk_full from error
            raise
    finally:
        run.release()
        if state.use_distributed:
            # Tear the process groups down before the interpreter does: left to exit, gloo's threads aborted a rank
            # that finished while rank 0 was still writing ("terminate called without an active exception").
            state.destroy_process_group()


def _train(config: Config, state, run: RunDir, resume_from: Path | None, manifest: dict, preemption,
           walltime, resume: str, allow_data_change: bool) -> RunResult:
    from sft import data
    from sft.model import loss
    from sft.model.device import for_this_device, training_dtype
    from sft.model.loading import load_model, load_tokenizer
    from sft.run import manifest as manifests
    from sft.training import samples
    from sft.training.callbacks import tensorboard_callback
    from sft.training.progress import print_run_start, terminal_progress

    is_main = state.is_main_process
    config = for_this_device(config)
    manifest["performance"] = {"attention": config.model.attn_implementation,
                               "max_tokens_per_batch": config.training.max_tokens_per_batch,
                               "compile": config.training.compile}
    # Load data (tokenized once into the cache; under torchrun the other processes memory-map the result)
    tokenizer = load_tokenizer(config)
    prepared = data.prepare_for_run(config, tokenizer, run.path, state)
    if config.training.max_tokens_per_batch:  # each item becomes a whole batch, read from the cached examples
        prepared = data.in_token_budget_batches(prepared, config.training.max_tokens_per_batch)
    if is_main:
        changed = manifests.record_data(manifest, prepared, resumed=resume_from is not None,
                                        allow_change=allow_data_change)
        manifests.write_manifest(run.path, manifest)
        if changed and not allow_data_change:
            raise UserError(f"data: the data changed since {run.path} started ({'; '.join(changed)}); resume on the "
                            f"data it trained on, pass --allow-data-change to continue on the new data (recorded in "
                            f"the manifest), or choose a new output.name")
    log.info("data: %s format, %d training %s, %d eval", prepared.data_format, len(prepared.train),
             "token-budget batches" if config.training.max_tokens_per_batch else "examples", len(prepared.eval or []))
    for name, value in data.summary_rows(prepared.summary, prepared.files):
        log.info("data: %s: %s", name, value)
    if is_main:
        print_run_start(config, prepared, run.path, str(training_dtype(config)).removeprefix("torch."),
                        state.num_processes)

    # Load model and train
    _check_fsdp_settings(config, state.num_processes)
    model = load_model(config, prepared.label_names)
    manifest["performance"]["chunked_loss"] = loss.apply_to(config, model)
    trainer = build_trainer(config, run, model, tokenizer, prepared, preemption, walltime)
    if is_main:
        trainer.add_callback(tensorboard_callback(run.path, resume_from and checkpoint_step(resume_from)))
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
    # A signal during the very last step, or the step whose evaluation stops early, leaves nothing to resume: finish
    # normally instead.
    if preemption.stopped_by and trainer.state.global_step < trainer.state.max_steps and not _stopped_early(trainer):
        if is_main:
            manifests.record_session(manifest, walltime.ended_by(), walltime.save_seconds,
                                     seconds_left=walltime.seconds_left())
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
    save_started = time.time()
    save_final(trainer, config, run.path)
    if is_main:
        manifests.record_session(manifest, "finished", walltime.save_seconds, final_save_s=time.time() - save_started,
                                 seconds_left=walltime.seconds_left())
        manifests.finish_manifest(run.path, manifest, "finished", metrics)
        if config.training.save_strategy == "no":
            _remove_preemption_checkpoints(run)
        write_report_of(run.path, (lambda: samples.record(run.path, trainer.model, tokenizer, prompts, "after"))
                        if prompts else None)
    # No barrier here: the other ranks are done, and waiting for rank 0's writes would count against ddp_timeout.
    return RunResult(run.path, metrics, is_main)


def _remove_preemption_checkpoints(run: RunDir) -> None:
    """With save_strategy "no" only a preemption writes checkpoints, for the requeued job to resume from: once the
    run is finished (and says so) they have served."""
    import shutil

    for checkpoint in complete_checkpoints(run.checkpoints):
        shutil.rmtree(checkpoint)
        log.info("removed %s: written at a preemption, not needed once the run finished (training.save_strategy "
                 "no)", checkpoint.name)


def _stopped_early(trainer) -> bool:
    """Whether early stopping's patience ran out (training.early_stopping)."""
    from transformers import EarlyStoppingCallback

    return any(isinstance(c, EarlyStoppingCallback) and c.early_stopping_patience_counter >= c.early_stopping_patience
               for c in trainer.callback_handler.callbacks)


def write_report_of(run_dir: Path, samples_after=None) -> None:
    """Samples after training, then report.md and plots. The model is saved and the run marked finished by now: a
    failure here must not fail the run."""
    from sft.run.report import write_report

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


# Trainer wiring

def build_trainer(config: Config, run: RunDir, model, tokenizer, prepared, preemption, walltime):
    from transformers import EarlyStoppingCallback, PrinterCallback, Trainer

    from sft.training.arguments import training_arguments
    from sft.training.callbacks import (CompleteCheckpointCallback, ConfiguredLearningRateCallback, EvalMetricsCallback,
                                        MetricsFileCallback, NonFiniteLossCallback, OverfittingWarningCallback)
    from sft.training.metrics import CausalLMMetrics, ClassificationMetrics, predicted_token_ids
    from sft.training.throughput import ThroughputCallback

    t = config.training
    has_eval = prepared.eval is not None
    stopping = t.early_stopping
    compute_metrics = None
    if has_eval:
        compute_metrics = ClassificationMetrics(prepared.label_names) if config.task == "classification" \
            else CausalLMMetrics()
    args = training_arguments(config, run.checkpoints)
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
                   CompleteCheckpointCallback(t.save_total_limit), walltime, preemption, NonFiniteLossCallback(),
                   ConfiguredLearningRateCallback()]
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
    # within an example (tests/training/test_trainer.py checks packed loss == per-example loss).
    flatten = DataCollatorWithFlattening(return_position_ids=True)
    if config.training.max_tokens_per_batch:
        return TokenBudgetCollator(flatten)
    return flatten


def final_metrics(log_history: list[dict]) -> dict:
    """Last training loss and last evaluation, as the run's headline numbers."""
    from sft.training.metrics import perplexity

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
    from sft.training.throughput import ThroughputCallback

    return next(c.summary for c in trainer.callback_handler.callbacks if isinstance(c, ThroughputCallback))


def save_final(trainer, config: Config, run_dir: Path) -> None:
    """final/: model (or LoRA adapter) + tokenizer in safetensors; final/merged/ when method.merge is set.
    Written like a checkpoint: into a temporary folder, marked complete, then moved into place.
    Called on every rank: under FSDP the full weights exist only while all ranks gather them; rank 0 writes."""
    partial = start_final(run_dir) if trainer.args.should_save else run_dir / FINAL_IN_PROGRESS
    trainer.save_model(str(partial))
    if not trainer.args.should_save:
        return
    if config.method.name == "lora" and config.method.merge:
        merged = trainer.model.merge_and_unload()
        merged.save_pretrained(str(partial / "merged"))  # transformers 5 writes safetensors only
        trainer.processing_class.save_pretrained(str(partial / "merged"))
    # A pickle of TrainingArguments (torch.load runs code to read it): config.yaml already records every setting.
    (partial / "training_args.bin").unlink(missing_ok=True)
    final = publish_final(partial)
    log.info("saved %s to %s", "model" if config.method.name == "full" else "adapter", final)
