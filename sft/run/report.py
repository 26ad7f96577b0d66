"""`sft report RUN_DIR`: report.md and the plots of a run directory, from what the run left there (manifest.json,
metrics.jsonl, eval_metrics.json, config.yaml). Also written at the end of every training session that finishes."""
from datetime import datetime
from pathlib import Path
from types import SimpleNamespace

from sft.errors import UserError
from sft.files import write_text_atomic
from sft.run.records import read_metrics, read_samples

REPORT = "report.md"


def write_report(run_dir: Path) -> Path:
    from sft.run.manifest import read_manifest
    from sft.run.plots import write_plots
    from sft.run.records import read_eval_metrics

    run_dir = Path(run_dir)
    manifest = read_manifest(run_dir) if run_dir.is_dir() else None
    if not manifest:
        raise UserError(f"{run_dir}: not an sft run directory (no manifest.json); pass a folder under output.dir, "
                        f"e.g. runs/NAME")
    records = read_metrics(run_dir)
    eval_metrics = read_eval_metrics(run_dir)
    plots = write_plots(run_dir, records, eval_metrics)
    config = _read_config(run_dir)
    text = render(run_dir, manifest, config, records, eval_metrics, plots)
    path = run_dir / REPORT
    write_text_atomic(path, text)
    return path


def _read_config(run_dir: Path) -> dict:
    import yaml

    path = run_dir / "config.yaml"
    return yaml.safe_load(path.read_text()) if path.is_file() else {}


def render(run_dir: Path, manifest: dict, config: dict, records: list[dict], eval_metrics: dict | None,
           plots: dict[str, Path]) -> str:
    """The report as Markdown (renders on GitHub/GitLab and in Jupyter; images by path relative to it)."""
    lines = [f"# {manifest.get('name', run_dir.name)}", ""]
    lines += _table(["", ""], [("status", manifest.get("status", "unknown")), ("started", manifest.get("started")),
                               ("finished", manifest.get("finished") or manifest.get("stopped") or "not yet"),
                               ("wall time", _wall_time(manifest)), ("restarts", len(manifest.get("restarts", []))),
                               ("Slurm job", manifest.get("slurm_job") or "none")])
    lines += ["", "## Results", ""]
    results = _final_metrics(manifest, records, eval_metrics)
    lines += _table(["metric", "value"], results.items()) if results else ["No metrics logged yet."]
    if eval_metrics and "per_class" in eval_metrics:
        lines += ["", f"Per class (evaluation at step {eval_metrics['step']}):", ""]
        lines += _table(["class", "precision", "recall", "F1", "support"],
                        [(name, c["precision"], c["recall"], c["f1"], c["support"])
                         for name, c in eval_metrics["per_class"].items()])
    if plots:
        lines += ["", "## Plots", ""]
        for title, path in plots.items():  # a blank line each: one image per row, not side by side
            lines += [f"![{title}]({path.relative_to(run_dir).as_posix()})", ""]
    if "throughput" not in plots:
        lines += ["", "Throughput was not recorded in metrics.jsonl."]
    samples = read_samples(run_dir)
    if samples:
        lines += ["", "## Samples", "", f"Eval prompts answered greedily (at most {samples['max_new_tokens']} new "
                                        f"tokens) before and after training.", ""]
        for index, prompt in enumerate(samples["prompts"]):
            lines += [f"**Prompt {index + 1}**", "", _quoted(prompt), "", "Reference:", "",
                      _quoted(samples["references"][index])]
            for stage in ("before", "after"):
                if stage in samples:
                    lines += ["", f"{stage.capitalize()} training:", "", _quoted(samples[stage][index])]
            lines.append("")
    lines += ["", "## Config", ""] + _table(["setting", "value"], config_rows(config, manifest.get("performance") or {}))
    lines += ["", "## Data", ""] + _table(["", ""], data_rows(manifest.get("data") or {}))
    lines += ["", "## Environment", ""] + _table(["", ""], environment_rows(manifest))
    if manifest.get("restarts"):
        lines += ["", "## Restarts", ""]
        lines += _table(["time", "host", "Slurm job", "resumed from step", "previous attempt"],
                        [(r.get("time"), r.get("host"), r.get("slurm_job"), r.get("resumed_from_step"),
                          r.get("previous", {}).get("status")) for r in manifest["restarts"]])
    lines += ["", f"Written by `sft report {run_dir}` at {datetime.now().astimezone().isoformat(timespec='seconds')}.",
              ""]
    return "\n".join(lines)


def _final_metrics(manifest: dict, records: list[dict], eval_metrics: dict | None) -> dict:
    """The finished run's headline numbers; for a run still going (or stopped), the latest logged ones."""
    if manifest.get("results"):
        return dict(manifest["results"])
    latest = {}
    for record in records:
        latest.update({k: v for k, v in record.items() if isinstance(v, (int, float))})
    if eval_metrics:
        latest.update({k: v for k, v in eval_metrics.items() if isinstance(v, (int, float))})
    return latest


def config_rows(config: dict, performance: dict) -> list[tuple[str, object]]:
    """The config as it ran: `auto` attention and token budget as resolved for the device (manifest.json)."""
    if not config:
        return [("config.yaml", "missing")]
    model, method, training, data = (config.get(k, {}) for k in ("model", "method", "training", "data"))
    training = {**training, "max_tokens_per_batch": performance.get("max_tokens_per_batch",
                                                                    training.get("max_tokens_per_batch"))}
    lora = method.get("lora", {})
    steps = training.get("max_steps", -1)
    rows = [("task", config.get("task")), ("model", model.get("name")),
            ("method", f"LoRA r={lora.get('r')} alpha={lora.get('alpha')}" if method.get("name") in ("lora", "qlora")
             else method.get("name")),
            ("length", f"{steps} steps" if steps and steps > 0 else f"{training.get('epochs')} epochs"),
            ("batch", f"{training['max_tokens_per_batch']} tokens per device" if training.get("max_tokens_per_batch")
             else f"{training.get('batch_size')} per device x {training.get('gradient_accumulation_steps')} "
                  f"accumulation"),
            ("learning rate", f"{training.get('learning_rate')} ({training.get('lr_scheduler')}, warmup "
                              f"{training.get('warmup_ratio')})"),
            ("precision", model.get("dtype")), ("attention", performance.get("attention", model.get("attn_implementation"))),
            ("max length", data.get("max_length")), ("seed", training.get("seed"))]
    if performance.get("compile"):
        rows.append(("compiled", "torch.compile (Inductor)"))
    if "chunked_loss" in performance:
        rows.append(("loss", "chunked cross-entropy" if performance["chunked_loss"] else "the model's own"))
    if training.get("early_stopping"):
        stopping = training["early_stopping"]
        rows.append(("early stopping", f"{stopping.get('metric')}, patience {stopping.get('patience')}"))
    if training.get("load_best_model_at_end"):
        rows.append(("final model", "best checkpoint"))
    return rows


def data_rows(data: dict) -> list[tuple[str, object]]:
    from sft.data.summary import summary_rows

    rows: list[tuple[str, object]] = [("format", data.get("format"))]
    if data.get("label_names"):
        rows.append(("classes", ", ".join(data["label_names"])))
    summary = data.get("summary")
    if summary:
        files = [SimpleNamespace(**f) for f in data.get("files", [])]  # as summary_rows reads DataFile
        rows += summary_rows({"train_examples": data.get("train_examples", 0),
                              "eval_examples": data.get("eval_examples", 0), **summary}, files)
    return rows


def environment_rows(manifest: dict) -> list[tuple[str, object]]:
    accelerator = manifest.get("accelerator") or {}
    gpus = accelerator.get("gpus") or []
    rows = [("host", manifest.get("host")), ("platform", manifest.get("platform")),
            ("GPUs", "; ".join(f"{g['name']} ({g['memory_gib']} GiB)" for g in gpus) if gpus else "none"),
            ("CUDA (torch build)", accelerator.get("cuda_build") or "none")]
    rows += [(name, version) for name, version in (manifest.get("versions") or {}).items()]
    image = manifest.get("image")
    rows += [(f"image {k}", v) for k, v in image.items()] if image else [("image", "none (run from a venv)")]
    git = manifest.get("git")
    if git:
        rows.append(("git", f"{git['commit'][:12]}{' (uncommitted changes)' if git.get('dirty') else ''}"))
    return rows


def _wall_time(manifest: dict) -> str:
    """First start to the end (or to now, for a run still going), queue time between restarts included."""
    try:
        start = datetime.fromisoformat(manifest["started"])
        end_text = manifest.get("finished") or manifest.get("stopped")
        end = datetime.fromisoformat(end_text) if end_text else datetime.now().astimezone()
    except (KeyError, TypeError, ValueError):
        return "unknown"
    seconds = int((end - start).total_seconds())
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}" + ("" if end_text else " so far")


def _quoted(text: str) -> str:
    """A fenced block: model output may contain Markdown or HTML that must show as written."""
    fence = "````" if "```" in text else "```"
    return f"{fence}text\n{text}\n{fence}"


def _table(header: list[str], rows) -> list[str]:
    def cell(value) -> str:
        text = f"{value:.4g}" if isinstance(value, float) else str(value)
        return text.replace("|", "\\|").replace("\n", " ")

    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + \
        ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
