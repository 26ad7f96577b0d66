"""Data stage: read every source into memory-mapped Arrow, validate with file:line errors, tokenize per format in
parallel (`Dataset.map`), and cache the result on disk so every later run, requeue and torchrun process reuses it.

    sources.py     files, save_to_disk folders and SQL queries → Arrow, with where each row came from
    validation.py  per-format checks, labels, duplicates, the eval split
    formats.py     one pure tokenize function per format (masking visible there) and the batched map body
    batching.py    token-budget batches and their collator
    cache.py       cache key, atomic build, the torchrun handoff
    summary.py     the data summary (check, prepare, log, manifest)
"""
import logging
import os
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

from sft.config import Config, FileSource, Source, SQLSource
from sft.data import cache
from sft.data.batching import TokenBudgetBatches, TokenBudgetCollator, group_by_tokens
from sft.data.formats import (FULL_LENGTH, IGNORE_INDEX, SKIPPED_TURNS, TRAINABLE, TRAINED_TURNS, chat_format,
                              tokenize_batch, tokenize_classification, tokenize_instruction, tokenize_messages,
                              tokenize_prompt_completion, tokenize_text)
from sft.data.sources import (DataFile, Rows, check_source_exists, concatenate, file_fingerprint, read_file, read_sql,
                              source_items)
from sft.data.summary import int_column, summarize, summary_rows
from sft.data.validation import (SHAREGPT_COLUMN, describe_format, detect_format, duplicate_free, eval_split_rows,
                                 format_columns, resolve_labels, row_problems, split_eval)
from sft.errors import UserError

log = logging.getLogger("sft")

__all__ = ["IGNORE_INDEX", "DataFile", "LoadedRows", "PreparedData", "Rows", "TokenBudgetBatches",
           "TokenBudgetCollator", "check_sources_exist", "group_by_tokens", "in_token_budget_batches", "load_rows",
           "prepare", "prepare_for_run", "read_source",
           "split_eval", "summary_rows", "tokenize_classification", "tokenize_instruction", "tokenize_messages",
           "tokenize_prompt_completion", "tokenize_rows", "tokenize_text"]


@dataclass
class Opened:
    """A configured source with its content hash; SQL results are already read (the hash needs the rows)."""
    item: str | FileSource | SQLSource
    fingerprint: DataFile
    rows: Rows | None = None


@dataclass
class LoadedRows:
    """Validated raw examples, ready to tokenize."""
    train: Rows
    eval: Rows | None
    data_format: str
    label_names: list[str] | None
    dropped: dict[str, int] = field(default_factory=dict)
    format_description: str = ""  # the detected format and how columns and roles were read, for check and prepare
    # With data.eval_fraction: the rows before the split and (train row numbers, eval row numbers) into them, so
    # tokenization runs once over all of them: no copy of the train rows out of their selection, one worker pool.
    split_from: Rows | None = None
    split: tuple[Any, Any] | None = None


@dataclass
class PreparedData:
    train: Any  # datasets.Dataset of token ids, memory-mapped from the cache
    eval: Any | None
    data_format: str
    label_names: list[str] | None
    files: list[DataFile]
    summary: dict[str, Any]
    cache_key: str
    cache_folder: Path
    build_seconds: float | None  # None: taken from the cache


# Read

def check_sources_exist(config: Config) -> None:
    """Every configured data source exists, before `sft train` creates a run directory: a wrong path (or a host
    DATA_PATH the container does not see) then leaves no failed run behind."""
    for config_key, source in (("data.train", config.data.train), ("data.eval", config.data.eval)):
        for item in source_items(source):
            check_source_exists(item, config_key)


def open_sources(config: Config, work_dir: Path) -> dict[str, list[Opened]]:
    opened = {}
    for config_key, source in (("data.train", config.data.train), ("data.eval", config.data.eval)):
        opened[config_key] = []
        for item in source_items(source):
            if isinstance(item, SQLSource):
                rows = read_sql(item, config_key, work_dir)
                opened[config_key].append(Opened(item, rows.files[0], rows))
            else:
                opened[config_key].append(Opened(item, file_fingerprint(item, config_key)))
    return opened


def read_source(source: Source, config_key: str, work_dir: Path, default_split: str = "train") -> Rows:
    """Every item of a configured source, concatenated (the items must share their columns)."""
    parts = [_read_item(Opened(item, None), config_key, default_split, work_dir) for item in source_items(source)]
    return concatenate(parts)


def _read_item(opened: Opened, config_key: str, default_split: str, work_dir: Path) -> Rows:
    item = opened.item
    if opened.rows is not None:
        return opened.rows
    if isinstance(item, SQLSource):
        return read_sql(item, config_key, work_dir)
    return read_file(item, config_key, default_split, work_dir, opened.fingerprint)


def _rename_fields(rows: Rows, item, config: Config, config_key: str) -> Rows:
    """Per-source `fields`: this source's column names → the names data.fields gives (so sources can be mixed)."""
    mapping = item.fields.model_dump(exclude_none=True) if not isinstance(item, str) and item.fields else {}
    columns = rows.dataset.column_names
    for role, column in mapping.items():
        if column not in columns:
            raise UserError(f"{config_key}.fields.{role}: no column '{column}' in {rows.files[0].source} "
                            f"(columns: {', '.join(columns)})")
    renames = {column: getattr(config.data.fields, role) for role, column in mapping.items()
               if column != getattr(config.data.fields, role)}
    return replace(rows, dataset=rows.dataset.rename_columns(renames)) if renames else rows


def _pick(rows: Rows, item, seed: int) -> tuple[Rows, int]:
    """max_rows / fraction: a random (seeded) subset of this source, for mixing sources in chosen proportions."""
    import numpy as np

    if isinstance(item, str) or not (item.max_rows or item.fraction):
        return rows, 0
    count = len(rows) if item.fraction is None else round(len(rows) * item.fraction)
    count = min(count, item.max_rows or count)
    if count >= len(rows):
        return rows, 0
    picked = np.sort(np.random.default_rng(seed).permutation(len(rows))[:count])
    (start, origin), = rows.origins
    return replace(rows, dataset=rows.dataset.select(picked), origins=[(start, replace(origin, picked=picked))]), \
        len(rows) - count


def _only_columns(rows: Rows, columns: list[str]) -> Rows:
    """The format's columns; an optional one a source lacks (e.g. instruction input) becomes empty."""
    import pyarrow as pa

    # Missing columns are added before selecting: a dataset of zero columns would also have zero rows.
    dataset = rows.dataset
    for column in columns:
        if column not in dataset.column_names:
            dataset = dataset.add_column(column, pa.nulls(len(dataset), pa.string()))
    return replace(rows, dataset=dataset.select_columns(columns))


def load_rows(config: Config, work_dir: Path, opened: dict[str, list[Opened]] | None = None) -> LoadedRows:
    """Read, map fields, pick, validate, de-duplicate and split: everything before tokens."""
    opened = opened or open_sources(config, work_dir)
    dropped = {"not picked (max_rows/fraction)": 0, "exact duplicates": 0}
    parts: dict[str, list[Rows]] = {}
    for config_key, items in opened.items():
        default_split = "train" if config_key == "data.train" else "validation"
        parts[config_key] = []
        for one in items:
            rows = _rename_fields(_read_item(one, config_key, default_split, work_dir), one.item, config, config_key)
            rows, not_picked = _pick(rows, one.item, config.training.seed)
            dropped["not picked (max_rows/fraction)"] += not_picked
            parts[config_key].append(rows)
    data_format = detect_format(config, parts["data.train"][0])
    description = describe_format(data_format, parts["data.train"][0], config)
    if data_format == "messages":  # ShareGPT's column, read as data.fields.messages
        parts = {key: [_renamed(p, SHAREGPT_COLUMN, config.data.fields.messages) for p in found]
                 for key, found in parts.items()}
    columns = format_columns(data_format, config.data.fields)
    train = concatenate([_only_columns(p, columns) for p in parts["data.train"]])
    eval_rows = concatenate([_only_columns(p, columns) for p in parts["data.eval"]]) if parts["data.eval"] else None
    # Every problem is collected and reported once: bad rows and label mismatches together.
    problems = row_problems(train, data_format, config, "data.train")
    if not len(train):
        raise UserError(problems[0])
    if eval_rows is not None:
        problems += row_problems(eval_rows, data_format, config, "data.eval")
    if config.data.dedupe:
        train, duplicates = duplicate_free(train, columns)
        dropped["exact duplicates"] += duplicates
        if eval_rows is not None:
            eval_rows, duplicates = duplicate_free(eval_rows, columns)
            dropped["exact duplicates"] += duplicates
    split_from, split = None, None
    if eval_rows is None and config.data.eval_fraction > 0:
        try:
            split_from, split = train, eval_split_rows(len(train), config.data.eval_fraction, config.training.seed)
            train, eval_rows = train.select(split[0]), train.select(split[1])
            eval_rows = replace(eval_rows, files=[])  # the files are recorded once, under train
        except UserError as error:  # too few rows: said together with what is wrong in them
            problems.append(str(error))
    label_names = None
    if data_format == "classification":
        label_names, label_problems = resolve_labels(config, train, eval_rows)
        problems += label_problems
    if problems:
        raise UserError("; ".join(problems))
    return LoadedRows(train, eval_rows, data_format, label_names, dropped, description, split_from, split)


def _renamed(rows: Rows, column: str, to: str) -> Rows:
    columns = rows.dataset.column_names
    if column not in columns or to in columns:
        return rows
    return replace(rows, dataset=rows.dataset.rename_column(column, to))


# Tokenize

def num_proc(config: Config, rows: int) -> int:
    """data.num_proc, else the CPUs of this Slurm task (or of this process), fewer for small data: a worker
    process costs about a second to start, more than it saves below a few thousand rows."""
    if config.data.num_proc:
        return config.data.num_proc
    cpus = int(os.environ.get("SLURM_CPUS_PER_TASK") or len(os.sched_getaffinity(0)))
    return max(1, min(cpus, rows // 5000))


def tokenize_rows(rows: Rows, data_format: str, config: Config, tokenizer, label_names: list[str] | None,
                  config_key: str, work_dir: Path) -> tuple[Any, dict[str, Any]]:
    """Tokenize every row with `Dataset.map(batched=True, num_proc=...)` into Arrow files under work_dir; causal-LM
    examples whose answer was truncated away are dropped and reported. Returns the dataset and its summary."""
    tokenized = _tokenized(rows, data_format, config, tokenizer, label_names, config_key, work_dir)
    return _checked(tokenized, rows, data_format, config.data.max_length, label_names, config_key)


def _tokenized(rows: Rows, data_format: str, config: Config, tokenizer, label_names: list[str] | None,
               config_key: str, work_dir: Path):
    """The map: examples plus the columns the summary needs (FULL_LENGTH, TRAINABLE)."""
    dataset = rows.dataset
    if dataset._indices is not None:
        # Rows picked by select() (max_rows/fraction, de-duplication, data.eval_fraction before tokenize_rows):
        # copy them out once. Mapping through an
        # indices mapping gathers every batch row by row and measured 2-3x slower than the copy plus the map.
        dataset = dataset.flatten_indices(cache_file_name=str(work_dir / f"{config_key}-rows.arrow"))
    return dataset.map(
        tokenize_batch, batched=True, batch_size=1000, num_proc=num_proc(config, len(rows)),
        remove_columns=dataset.column_names,
        fn_kwargs={"data_format": data_format, "fields": config.data.fields, "tokenizer": tokenizer,
                   "label_names": label_names, "max_length": config.data.max_length, "chat": chat_format(config)},
        cache_file_name=str(work_dir / f"{config_key}.arrow"), load_from_cache_file=False,
        # A fresh fingerprint: otherwise datasets hashes the function and tokenizer (slow); our cache key covers them.
        new_fingerprint=f"{config_key}-{time.time_ns()}")


def _checked(tokenized, rows: Rows, data_format: str, max_length: int, label_names: list[str] | None,
             config_key: str) -> tuple[Any, dict[str, Any]]:
    """Report and drop the examples with no answer tokens left, summarize, and drop the summary columns."""
    import numpy as np

    no_answer = 0
    if data_format != "classification":
        trainable = int_column(tokenized, TRAINABLE)
        empty = np.flatnonzero(trainable == 0)
        no_answer = len(empty)
        if no_answer:
            message = (f"{config_key}: {no_answer} example(s) have no answer tokens left after truncation to "
                       f"data.max_length={max_length} (first: {rows.where(int(empty[0]))}); raise data.max_length "
                       f"or shorten prompts")
            if no_answer == len(rows):
                raise UserError(message)
            log.warning("%s; skipped them", message)
    summary = summarize(tokenized, max_length, {"no answer tokens left after truncation": no_answer}, label_names)
    if no_answer:
        tokenized = tokenized.select(np.flatnonzero(trainable > 0))
    summary_columns = (FULL_LENGTH, TRAINABLE, TRAINED_TURNS, SKIPPED_TURNS)
    return tokenized.remove_columns([c for c in summary_columns if c in tokenized.column_names]), summary


# The whole stage, cached

def prepare(config: Config, get_tokenizer: Callable[[], Any]) -> PreparedData:
    """Tokenized train/eval data from the cache, building it first when no earlier run did. The tokenizer is asked
    for (`get_tokenizer()`) only to build, or to download a hub tokenizer the key needs the files of."""
    from filelock import Timeout

    from sft.model.hub import local_model_folder

    root = cache.cache_root(config)
    try:
        (root / "tokenized").mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise UserError(f"data.cache_dir: cannot create {root / 'tokenized'} ({error.strerror}); set data.cache_dir "
                        f"or HF_HOME to a writable folder (in the container: bind one at /cache)") from None
    started = time.monotonic()
    with tempfile.TemporaryDirectory(dir=root, prefix=".work-") as work:
        opened = open_sources(config, Path(work))
        fingerprints = {key: [one.fingerprint for one in items] for key, items in opened.items() if items}
        key, tokenizer = cache.cache_key(config, fingerprints, local_model_folder(config)), None
        if key is None:  # a hub model not downloaded yet: loading its tokenizer downloads it (or says how to)
            tokenizer = get_tokenizer()
            key = cache.cache_key(config, fingerprints, local_model_folder(config))
            if key is None:
                raise UserError(f"model.name: the tokenizer of {config.model.name} loaded, but its files are not in "
                                f"the hub cache; point model.name at a folder that holds them")
        folder = root / "tokenized" / key
        try:
            with cache.build_lock(folder, config.data.wait_minutes):
                built = not cache.is_complete(folder)
                if built:
                    _build(config, tokenizer or get_tokenizer(), opened, Path(work), folder)
        except Timeout:
            raise UserError(f"data.wait_minutes: another process has been preparing {folder} for over "
                            f"{config.data.wait_minutes:g} minutes; wait for it or raise data.wait_minutes") from None
    prepared = load_prepared(folder)
    # Paths as configured now (the cache is keyed by content, so the data may have moved since it was built).
    current = [f for items in fingerprints.values() for f in items]
    prepared.files = [replace(stored, source=now.source) for stored, now in zip(prepared.files, current)]
    if built:
        prepared.build_seconds = time.monotonic() - started
        log.info("tokenized data built in %.1f s into cache %s (%s)", prepared.build_seconds, key, folder)
    else:
        log.info("tokenized data from cache %s (%s)", key, folder)
    return prepared


def _build(config: Config, tokenizer, opened: dict[str, list[Opened]], work_dir: Path, folder: Path) -> None:
    loaded = load_rows(config, work_dir, opened)
    data_format, label_names = loaded.data_format, loaded.label_names
    if loaded.split is not None:
        # Tokenize before the split, then select: the map over a row selection would first copy the 99% of rows
        # that train on out of it (a third of the map's time), and the eval rows would start a second worker pool.
        everything = _tokenized(loaded.split_from, data_format, config, tokenizer, label_names, "data.train", work_dir)
        train_part, eval_part = everything.select(loaded.split[0]), everything.select(loaded.split[1])
    else:
        train_part = _tokenized(loaded.train, data_format, config, tokenizer, label_names, "data.train", work_dir)
        eval_part = None if loaded.eval is None else \
            _tokenized(loaded.eval, data_format, config, tokenizer, label_names, "data.eval", work_dir)
    max_length = config.data.max_length
    train, summary = _checked(train_part, loaded.train, data_format, max_length, label_names, "data.train")
    eval_set = None if eval_part is None else \
        _checked(eval_part, loaded.eval, data_format, max_length, label_names, "data.eval")[0]
    summary["dropped"] = {**{k: v for k, v in loaded.dropped.items() if v}, **summary["dropped"]}
    summary |= {"train_examples": len(train), "eval_examples": len(eval_set) if eval_set is not None else 0,
                "format": loaded.format_description}
    files = loaded.train.files + (loaded.eval.files if loaded.eval else [])
    cache.save(folder, train, eval_set, {"data_format": loaded.data_format, "label_names": loaded.label_names,
                                         "files": cache.files_to(files), "summary": summary})


def load_prepared(folder: Path) -> PreparedData:
    train, eval_set, info = cache.load(folder)
    return PreparedData(train, eval_set, info["data_format"], info["label_names"], cache.files_from(info),
                        info["summary"], folder.name, folder, None)


def in_token_budget_batches(prepared: PreparedData, max_tokens: int) -> PreparedData:
    """The same data served as token-budget batches (planned from the cached lengths; nothing is copied)."""
    return replace(prepared, train=TokenBudgetBatches(prepared.train, max_tokens),
                   eval=TokenBudgetBatches(prepared.eval, max_tokens) if prepared.eval is not None else None)


def prepare_for_run(config: Config, tokenizer, run_dir: Path, state) -> PreparedData:
    """Under torchrun the first process of each node prepares (or finds) the cached data and the others memory-map
    it when the handoff note says it is ready: they wait on a file, not in a collective with a timeout."""
    if state.num_processes == 1:
        return prepare(config, lambda: tokenizer)
    note = cache.handoff_path(config, run_dir)
    if state.is_main_process:
        note.unlink(missing_ok=True)  # a note from an earlier (requeued) start must not be read as this one's
    state.wait_for_everyone()
    if state.is_local_main_process:
        prepared = prepare(config, lambda: tokenizer)
        if state.is_main_process:
            cache.write_handoff(note, prepared.cache_folder)
        return prepared
    return load_prepared(cache.wait_for_handoff(note, config.data.wait_minutes))
