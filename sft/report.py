"""Terminal reports: the end-of-run summary, `sft check` and `sft info`."""
from collections import Counter

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


def print_check(config: Config, loaded) -> None:
    table = Table(title=f"sft check: {config.config_path}", show_header=False)
    table.add_row("task / format", f"{config.task} / {loaded.data_format}")
    table.add_row("training examples", str(len(loaded.train.records)))
    table.add_row("eval examples", str(len(loaded.eval.records)) if loaded.eval else "none (evaluation off)")
    for file in loaded.train.files + (loaded.eval.files if loaded.eval else []):
        table.add_row("data", f"{file.source} ({file.rows} rows, sha256 {file.sha256[:12]})")
    if loaded.label_names:
        label = config.data.fields.label
        counts = Counter(r[label] if isinstance(r[label], str) else loaded.label_names[r[label]]
                         for r in loaded.train.records)
        table.add_row("labels (train)", ", ".join(f"{name}: {counts.get(name, 0)}" for name in loaded.label_names))
    console.print(table)
    console.print("[green]OK[/green]: config and every data row are valid")


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
