"""Plots of a run (PNG files in RUN_DIR/plots/) and plots.json beside them: the data of every line and matrix drawn,
read back from the figures themselves, for re-plotting and for the tests."""
import os
import tempfile
from pathlib import Path

from sft.files import plain_file_mode, write_json_atomic

PLOTS = "plots"
THROUGHPUT_KEY = "real_tokens_per_s"  # added to each training log line by sft.training.throughput


def write_plots(run_dir: Path, records: list[dict], eval_metrics: dict | None) -> dict[str, Path]:
    """Every plot the run's data allows, by title: a plot whose series were never logged is left out."""
    use_writable_matplotlib_dir()
    folder = run_dir / PLOTS
    figures = {"loss": loss_figure(records), "learning rate": series_figure(records, "learning_rate", "learning rate"),
               "throughput": series_figure(records, THROUGHPUT_KEY, "real tokens / s (all processes)"),
               "confusion matrix": confusion_figure(eval_metrics)}
    written, drawn = {}, {}
    for title, figure in figures.items():
        if figure is None:
            continue
        path = folder / f"{title.replace(' ', '_')}.png"
        _save_png(figure, path)
        written[title], drawn[path.name] = path, drawn_data(figure)
    write_json_atomic(folder / "plots.json", drawn)
    return written


def use_writable_matplotlib_dir() -> None:
    """Point MPLCONFIGDIR at a folder of ours in the temp dir unless matplotlib's own one can be written: in a
    read-only image (or a home that does not exist) matplotlib warns `mkdir -p failed` at every import."""
    home = Path.home()
    wanted = [os.environ["MPLCONFIGDIR"]] if os.environ.get("MPLCONFIGDIR") else [
        Path(os.environ.get("XDG_CONFIG_HOME") or home / ".config") / "matplotlib",
        Path(os.environ.get("XDG_CACHE_HOME") or home / ".cache") / "matplotlib"]
    if all(_writable_folder(Path(folder)) for folder in wanted):
        return
    # One folder per user, reused by later runs (matplotlib keeps its font cache there); not one someone else made.
    folder = Path(tempfile.gettempdir()) / f"sft-matplotlib-{os.getuid()}"
    if not (_writable_folder(folder) and folder.stat().st_uid == os.getuid()):
        folder = Path(tempfile.mkdtemp(prefix="sft-matplotlib-"))
    os.environ["MPLCONFIGDIR"] = str(folder)


def _writable_folder(folder: Path) -> bool:
    try:
        folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    except OSError:
        return False
    return os.access(folder, os.W_OK)


def loss_figure(records: list[dict]):
    """Training and eval loss against the optimizer step: an eval curve that turns up while the training curve
    keeps falling is overfitting."""
    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    evaluation = [(r["step"], r["eval_loss"]) for r in records if "eval_loss" in r]
    if not train and not evaluation:
        return None
    figure, axes = _figure("loss", "loss")
    if train:
        axes.plot(*zip(*train), label="train loss")
    if evaluation:
        axes.plot(*zip(*evaluation), marker="o", label="eval loss")
    axes.legend()
    return figure


def series_figure(records: list[dict], key: str, label: str):
    points = [(r["step"], r[key]) for r in records if key in r]
    if not points:
        return None
    figure, axes = _figure(label, label)
    axes.plot(*zip(*points), label=label)
    return figure


def confusion_figure(eval_metrics: dict | None):
    """Counts of the latest evaluation: rows are the true class, columns the predicted one."""
    if not eval_metrics or "confusion_matrix" not in eval_metrics:
        return None
    from matplotlib.figure import Figure

    matrix, names = eval_metrics["confusion_matrix"], eval_metrics["label_names"]
    size = 3 + 0.5 * len(names)
    figure = Figure(figsize=(size + 1, size), layout="constrained")
    axes = figure.add_subplot()
    image = axes.imshow(matrix, cmap="Blues")
    figure.colorbar(image, ax=axes)
    axes.set(title=f"confusion matrix (eval, step {eval_metrics['step']})", xlabel="predicted", ylabel="true",
             xticks=range(len(names)), yticks=range(len(names)), xticklabels=names, yticklabels=names)
    axes.tick_params(axis="x", labelrotation=45)
    largest = max(max(row) for row in matrix) or 1
    for true, row in enumerate(matrix):
        for predicted, count in enumerate(row):
            axes.text(predicted, true, str(count), ha="center", va="center",
                      color="white" if count > largest / 2 else "black")
    return figure


def drawn_data(figure) -> dict:
    """What the figure shows, taken from its artists: each line's x/y by label, an image's matrix."""
    axes = figure.axes[0]
    data = {line.get_label(): {"x": [float(x) for x in line.get_xdata()], "y": [float(y) for y in line.get_ydata()]}
            for line in axes.get_lines()}
    if axes.images:
        data["matrix"] = axes.images[0].get_array().tolist()
    return data


def _figure(title: str, ylabel: str):
    # Figure without pyplot: no global figure registry to leak, no GUI backend; savefig renders with Agg.
    from matplotlib.figure import Figure

    figure = Figure(figsize=(7, 4), layout="constrained")
    axes = figure.add_subplot()
    axes.set(title=title, xlabel="step", ylabel=ylabel)
    axes.grid(alpha=0.3)
    return figure, axes


def _save_png(figure, path: Path) -> None:
    """Temp file + rename, like every file of a run: a reader never sees half a PNG."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        figure.savefig(tmp, format="png", dpi=100)
        os.chmod(tmp, plain_file_mode())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
