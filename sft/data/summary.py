"""The data summary shown by `sft check`, `sft prepare`, the training log and manifest.json: what was read, what
was dropped and why, and what the tokens look like before and after truncation."""
from typing import Any

from sft.data.formats import FULL_LENGTH, SKIPPED_TURNS, TRAINABLE, TRAINED_TURNS

PERCENTILES = (50, 90, 99)


def summarize(tokenized, max_length: int, dropped: dict[str, int], label_names: list[str] | None) -> dict[str, Any]:
    """Statistics over the tokenized training examples (before rows without answer tokens are removed)."""
    import numpy as np

    full = int_column(tokenized, FULL_LENGTH)
    summary: dict[str, Any] = {
        "token_lengths": {**{f"p{p}": int(np.percentile(full, p)) for p in PERCENTILES}, "max": int(full.max())}
        if len(full) else {},
        "truncated": int((full > max_length).sum()),
        "max_length": max_length,
        "dropped": {reason: count for reason, count in dropped.items() if count},
    }
    if label_names is None:
        trainable = int_column(tokenized, TRAINABLE)
        kept = np.minimum(full, max_length).sum()
        summary["trainable_token_share"] = round(float(trainable.sum() / kept), 4) if kept else 0.0
    else:
        counts = np.bincount(int_column(tokenized, "labels"), minlength=len(label_names))
        summary["labels"] = {name: int(count) for name, count in zip(label_names, counts)}
    if TRAINED_TURNS in tokenized.column_names:
        summary["assistant_turns"] = {"trained": int(int_column(tokenized, TRAINED_TURNS).sum()),
                                      "skipped": int(int_column(tokenized, SKIPPED_TURNS).sum())}
    return summary


def int_column(dataset, name: str):
    """One integer column as numpy, through the dataset's row selection if it has one. datasets' own column access
    on a selection gathers row by row (a table slice per row: 1.5 s for 200,000 rows); a numpy take does not."""
    import numpy as np

    values = np.asarray(dataset.data.column(name).to_numpy(), dtype=np.int64)
    if dataset._indices is not None:
        values = values[dataset._indices.column(0).to_numpy()]
    return values


def rows_summary(loaded, label_field: str) -> dict[str, Any]:
    """The part of the summary that needs no tokenizer (for `sft check`, which stays fast and torch-free)."""
    from collections import Counter

    from sft.data.validation import iter_records

    summary: dict[str, Any] = {"train_examples": len(loaded.train),
                               "eval_examples": len(loaded.eval) if loaded.eval is not None else 0,
                               "dropped": {reason: count for reason, count in loaded.dropped.items() if count},
                               "format": loaded.format_description}
    if loaded.label_names:
        names = loaded.label_names
        counts = Counter(value if isinstance(value, str) else names[value]
                         for _, record in iter_records(loaded.train, [label_field]) for value in [record[label_field]])
        summary["labels"] = {name: counts.get(name, 0) for name in names}
    return summary


def summary_rows(summary: dict[str, Any], files: list) -> list[tuple[str, str]]:
    """(name, value) lines for a table or a log."""
    rows = [("data", f"{f.source} ({f.rows} rows, sha256 {f.sha256[:12]})") for f in files]
    if summary.get("format"):
        rows.append(("read as", summary["format"]))
    rows.append(("training examples", str(summary["train_examples"])))
    rows.append(("eval examples", str(summary["eval_examples"]) if summary["eval_examples"] else "none (evaluation off)"))
    for reason, count in summary.get("dropped", {}).items():
        rows.append(("dropped", f"{count} ({reason})"))
    lengths = summary.get("token_lengths")
    if lengths:
        rows.append(("example lengths", ", ".join(f"{k} {v}" for k, v in lengths.items()) + " tokens, before truncation"))
    if "truncated" in summary:
        rows.append(("truncated", f"{summary['truncated']} to data.max_length={summary['max_length']}"))
    if "trainable_token_share" in summary:
        rows.append(("trainable tokens", f"{summary['trainable_token_share']:.1%} of tokens carry loss"))
    if "assistant_turns" in summary:
        turns = summary["assistant_turns"]
        rows.append(("assistant turns", f"{turns['trained']} trained, {turns['skipped']} skipped (weight 0 or "
                                        f"data.train_on)"))
    if "labels" in summary:
        rows.append(("labels (train)", ", ".join(f"{name}: {count}" for name, count in summary["labels"].items())))
    return rows
