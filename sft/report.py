"""Terminal reports: the settings table as training starts, the end-of-run summary, `sft check` / `sft prepare`
and `sft info` (report.md and plots: sft.run_report)."""
from rich.console import Console
from rich.table import Table

from sft.config import Config

console = Console()


def print_summary(result) -> None:
    table = Table(title="Run finished", show_header=False)
    for name, value in result.metrics.items():
        table.add_row(name, f"{value:.4f}" if isinstance(value, float) else str(value))
    table.add_row("run directory", str(result.run_dir))
    console.print(table)


def print_run_start(config: Config, prepared, run_dir, precision: str, processes: int) -> None:
    """The settings a user checks first in a job's output, printed once as training starts."""
    from sft.logs import terminal_console

    table = Table(title="sft train", show_header=False)
    for name, value in run_start_rows(config, prepared, run_dir, precision, processes):
        table.add_row(name, value)
    terminal_console().print(table)


def run_start_rows(config: Config, prepared, run_dir, precision: str, processes: int) -> list[tuple[str, str]]:
    t, method = config.training, config.method
    budget = (f"{t.max_tokens_per_batch} tokens" if t.max_tokens_per_batch else f"{t.batch_size} examples")
    eval_rows = f"{len(prepared.eval)} eval" if prepared.eval is not None else "no eval"
    data_unit = "token-budget batches" if t.max_tokens_per_batch else "examples"
    return [("model", config.model.name),
            ("task / method", f"{config.task} / " + (f"{'QLoRA' if method.name == 'qlora' else 'LoRA'} r={method.lora.r} alpha={method.lora.alpha}"
                                                     if method.name != "full" else "full fine-tuning")),
            ("data", f"{prepared.data_format}: {len(prepared.train)} training {data_unit}, {eval_rows}"),
            ("batch", f"{budget} per process x {_count(processes, 'process', 'processes')} x "
                      f"{_count(t.gradient_accumulation_steps, 'accumulation step', 'accumulation steps')}"),
            ("length", f"{t.max_steps} steps" if t.max_steps > 0 else f"{t.epochs:g} epochs"),
            ("precision", precision), ("attention", config.model.attn_implementation),
            ("run directory", str(run_dir))]


def _count(number: int, one: str, many: str) -> str:
    return f"{number} {one if number == 1 else many}"


def print_check(config: Config, loaded, checked: list[tuple[str, str]] = ()) -> None:
    """`sft check`: the data summary without tokens (no torch: it answers in seconds), and what sft.preflight found."""
    from sft.data.summary import rows_summary, summary_rows

    table = Table(title=f"sft check: {config.config_path}", show_header=False)
    table.add_row("task / format", f"{config.task} / {loaded.data_format}")
    files = loaded.train.files + (loaded.eval.files if loaded.eval else [])
    for name, value in summary_rows(rows_summary(loaded, config.data.fields.label), files):
        table.add_row(name, value)
    for name, value in checked:
        table.add_row(name, value)
    console.print(table)
    console.print("[green]OK[/green]: config, model files, every data row and output space are valid; `sft prepare` "
                  "adds token statistics")


def print_prepare(config: Config, prepared) -> None:
    """`sft prepare`: the full data summary and where the tokenized data is cached."""
    from sft.data.summary import summary_rows

    table = Table(title=f"sft prepare: {config.config_path}", show_header=False)
    table.add_row("task / format", f"{config.task} / {prepared.data_format}")
    for name, value in summary_rows(prepared.summary, prepared.files):
        table.add_row(name, value)
    table.add_row("cache key", prepared.cache_key)
    table.add_row("cache folder", str(prepared.cache_folder))
    console.print(table)
    done = f"built in {prepared.build_seconds:.1f} s" if prepared.build_seconds is not None else "already in the cache"
    console.print(f"[green]OK[/green]: tokenized data {done}; `sft train` with the same data settings reuses it")


def print_info() -> None:
    from sft.manifest import accelerator_info, image_provenance, package_versions

    table = Table(title="sft info", show_header=False)
    for name, version in package_versions().items():
        table.add_row(name, version or "not installed")
    accelerator = accelerator_info()
    table.add_row("CUDA (torch build)", accelerator["cuda_build"] or "none (CPU build)")
    table.add_row("cuDNN", str(accelerator["cudnn"] or "none"))
    gpus = accelerator["gpus"]
    table.add_row("GPUs", "; ".join(f"{g['name']} ({g['memory_gib']} GiB)" for g in gpus) if gpus else "none visible")
    image = image_provenance()
    if image:
        for key, value in image.items():
            table.add_row(f"image {key}", str(value))
    else:
        table.add_row("image", "not in an sft container (no provenance file)")
    console.print(table)
