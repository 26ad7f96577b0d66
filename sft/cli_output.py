"""What the commands print besides the log: the end-of-run summary, `sft check`, `sft prepare` and `sft info`
tables (the table as training starts: sft.training.progress; report.md: sft.run.report)."""
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


def print_check(config: Config, loaded, checked: list[tuple[str, str]] = ()) -> None:
    """`sft check`: the data summary without tokens (no torch: it answers in seconds), and what sft.check.preflight
    found."""
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
    from sft.run.manifest import accelerator_info, image_provenance, package_versions

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
