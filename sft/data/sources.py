"""Read sources (files, save_to_disk folders, SQL queries) into memory-mapped Arrow datasets that remember where each
row came from (file:line), so later stages can point at a bad row without keeping rows as Python objects."""
import codecs
import csv
import hashlib
import json
import logging
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterator

from sft.config import FileSource, Source, SQLSource
from sft.errors import UserError
from sft.secrets import mask

FILE_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")
SQL_CHUNK_ROWS = 10_000  # rows fetched per round trip and written per Arrow batch: bounded memory, few round trips
# Byte-order marks of the wide encodings Windows tools write (Excel's "Unicode text" is UTF-16). UTF-32 LE first:
# its mark starts with UTF-16 LE's.
WIDE_BOMS = ((codecs.BOM_UTF32_LE, "utf-32"), (codecs.BOM_UTF32_BE, "utf-32"), (codecs.BOM_UTF16_LE, "utf-16"),
             (codecs.BOM_UTF16_BE, "utf-16"))


@dataclass
class DataFile:
    """One input as recorded in the manifest."""
    source: str
    sha256: str
    rows: int


@dataclass
class Origin:
    """Where a stretch of rows came from; turns a row number into the text a user finds the row by."""
    kind: str  # jsonl, json, csv, parquet, saved, sql
    label: str  # the file, folder[split] or database
    picked: Any = None  # numpy array of source row numbers when the source was sampled (max_rows/fraction)

    def where(self, index: int) -> str:
        row = int(self.picked[index]) if self.picked is not None else index
        if self.kind == "jsonl":
            return f"{self.label}:{_jsonl_line(Path(self.label), row)}"
        if self.kind == "csv":
            return f"{self.label}:{_csv_line(Path(self.label), row)}"
        if self.kind == "json":
            return f"{self.label}: item {row}"
        if self.kind == "sql":
            return f"{self.label}: query row {row + 1}"
        return f"{self.label}: row {row + 1}"


@dataclass
class Rows:
    """Raw examples as an Arrow dataset, plus where each came from, for error messages."""
    dataset: Any  # datasets.Dataset
    origins: list[tuple[int, Origin]] = field(default_factory=list)  # (first row, origin), in row order
    files: list[DataFile] = field(default_factory=list)
    positions: Any = None  # numpy array: row -> row number before select(), or None

    def __len__(self) -> int:
        return len(self.dataset)

    def where(self, index: int) -> str:
        row = int(self.positions[index]) if self.positions is not None else index
        start, origin = next((s, o) for s, o in reversed(self.origins) if s <= row)
        return origin.where(row - start)

    def select(self, indices) -> "Rows":
        """The rows at `indices` (a sorted numpy array), keeping their locations."""
        import numpy as np

        indices = np.asarray(indices, dtype=np.int64)
        positions = indices if self.positions is None else self.positions[indices]
        return replace(self, dataset=self.dataset.select(indices), positions=positions)


def concatenate(parts: list[Rows]) -> Rows:
    from datasets import concatenate_datasets

    if len(parts) == 1:
        return parts[0]
    origins, files, start = [], [], 0
    for part in parts:
        if part.positions is not None:
            raise AssertionError("concatenate() takes rows before any select()")
        origins += [(start + s, o) for s, o in part.origins]
        files += part.files
        start += len(part)
    try:
        dataset = concatenate_datasets(_aligned([part.dataset for part in parts]))
    except ValueError as error:
        raise UserError(f"data sources have different columns or types ({str(error).splitlines()[0]}); give each "
                        f"source a fields mapping onto the same names, or convert them to one schema") from None
    return Rows(dataset, origins, files)


def _aligned(datasets: list) -> list:
    """The datasets with the column types chat files differ in made equal: a column one of them reads as JSON values
    (rows of different shapes, e.g. messages with tool calls) is cast to that JSON type in all of them, and a column
    that is all nulls in a file (an optional column it lacks, such as `tools` beside plain conversations) takes the
    type the other files give it. So files of plain and tool-call conversations concatenate; other differences are
    left for concatenate_datasets to report."""
    from datasets.features import Json

    aligned = list(datasets)
    for column in aligned[0].column_names:
        types = [d.features.get(column) for d in aligned]
        if None in types or all(t == types[0] for t in types):
            continue
        empty = [d.data.column(column).null_count == len(d) for d in aligned]
        filled = [t for t, is_empty in zip(types, empty) if not is_empty]
        target = next((t for t in types if _holds_json(t, Json)), filled[0] if filled else types[0])
        aligned = [_nulls_as(d, column, target) if t != target and is_empty
                   else d.cast_column(column, target) if t != target and _holds_json(target, Json)
                   else d for d, t, is_empty in zip(aligned, types, empty)]
    return aligned


def _nulls_as(dataset, column: str, feature):
    """DATASET with COLUMN, all nulls, retyped as FEATURE (Arrow cannot cast a string column to a struct)."""
    import pyarrow as pa
    from datasets import Features

    arrow_type = Features({column: feature}).arrow_schema.field(column).type
    order = dataset.column_names
    return dataset.remove_columns(column).add_column(column, pa.nulls(len(dataset), arrow_type),
                                                     feature=feature).select_columns(order)


def _holds_json(feature, json_class) -> bool:
    if isinstance(feature, json_class):
        return True
    inner = getattr(feature, "feature", None)  # List / Sequence
    return inner is not None and _holds_json(inner, json_class)


# Fingerprints: content hashes, cheap enough to compute before deciding whether the cache already has the result

def source_items(source: Source | None) -> list[str | FileSource | SQLSource]:
    if source is None:
        return []
    return list(source) if isinstance(source, list) else [source]


def existing_path(item: str | FileSource, config_key: str) -> Path:
    """The file or save_to_disk folder a source names; a missing one is a one-line error naming the config key."""
    path = Path(item if isinstance(item, str) else item.path)
    if not (path.is_file() or path.is_dir()):
        raise UserError(f"{config_key}: {path} does not exist (a relative path is looked up from {Path.cwd()}, "
                        f"then next to the config); check the path (and DATA_PATH in .env)")
    return path


def check_source_exists(item: str | FileSource | SQLSource, config_key: str) -> None:
    """What can be checked without reading: the file, folder or SQLite database exists, the database URL is one sft
    reads. Cheap, so `sft train` asks it before creating a run directory."""
    if isinstance(item, SQLSource):
        _database_url(item, config_key)
    else:
        existing_path(item, config_key)


def file_fingerprint(item: str | FileSource, config_key: str) -> DataFile:
    path = existing_path(item, config_key)
    if path.is_dir():
        return DataFile(str(path), _sha256_folder(path), -1)
    if path.suffix.lower() not in FILE_SUFFIXES:
        raise UserError(f"{config_key}: {path}: unsupported file type; use one of {', '.join(FILE_SUFFIXES)} "
                        f"or a datasets save_to_disk folder")
    return DataFile(str(path), _sha256_file(path), -1)


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _sha256_folder(path: Path) -> str:
    digest = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        digest.update(str(file.relative_to(path)).encode())
        digest.update(_sha256_file(file).encode())
    return digest.hexdigest()


# Files

def read_file(item: str | FileSource, config_key: str, default_split: str, work_dir: Path,
              fingerprint: DataFile | None = None) -> Rows:
    """One file or save_to_disk folder as Arrow; a file that Arrow cannot read is re-read line by line to say where."""
    fingerprint = fingerprint or file_fingerprint(item, config_key)
    path = Path(fingerprint.source)
    if path.is_dir():
        split_given = isinstance(item, FileSource) and bool(item.split)
        split = (item.split if split_given else None) or default_split
        rows = _read_saved_dataset(path, config_key, split, split_given)
    else:
        kind = path.suffix.lower().lstrip(".")
        rows = Rows(_load_file(path, kind, work_dir), [(0, Origin(kind, str(path)))])
    rows.files = [replace(fingerprint, rows=len(rows))]
    return rows


def _load_file(path: Path, kind: str, work_dir: Path):
    import datasets
    from datasets import Features, Value, load_dataset

    datasets.disable_progress_bars()
    options: dict[str, Any] = {}
    encoding = text_encoding(path) if kind != "parquet" else None
    if encoding in ("utf-16", "utf-32"):
        source = _utf8_copy(path, encoding, work_dir)  # Arrow's readers take UTF-8 only; lines stay where they were
    else:
        source = path
        if encoding:
            _require_utf8(path)
    if kind == "csv":
        # Every column as text, empty cells as "" (pandas would guess numbers and NaN): the same values csv gives.
        # utf-8-sig: drop the byte-order mark Excel writes, which would otherwise become part of the first name.
        with source.open(encoding="utf-8-sig", newline="") as f:
            header = next(csv.reader(f), [])
        separator = next((sep for sep in ";\t|" if len(header) == 1 and sep in header[0]), None)
        if separator:
            raise UserError(f"{path}:1: the header is one column ({header[0]!r}): the file is separated by "
                            f"{separator!r}, not commas (Excel does so in many locales); save it as comma-separated "
                            f"CSV (Excel: CSV UTF-8)")
        options = {"features": Features({name: Value("string") for name in header}), "na_filter": False,
                   "encoding": "utf-8-sig"}
    builder = {"jsonl": "json", "json": "json", "csv": "csv", "parquet": "parquet"}[kind]
    # datasets logs its own error before raising; ours (below) says where in the file and how to fix it.
    verbosity = datasets.logging.get_verbosity()
    datasets.logging.set_verbosity(logging.CRITICAL)
    try:
        return load_dataset(builder, data_files=str(source), split="train", cache_dir=str(work_dir / "sources"),
                            **options)
    except Exception as error:  # noqa: BLE001 - any parser failure; the line-by-line reader names the place
        if kind in ("jsonl", "json", "csv"):
            if not sum(1 for _ in iter_file_records(path, kind)):  # every row read: the bad one raises
                raise UserError(f"{path}: no rows in the file; check the path, or export the data again") from None
        cause = error.__cause__ or error
        detail = (str(cause).splitlines() or [""])[0]
        raise UserError(f"{path}: cannot read as {kind} ({type(cause).__name__}: {detail}); fix the file or convert "
                        f"it") from None
    finally:
        datasets.logging.set_verbosity(verbosity)


def text_encoding(path: Path) -> str:
    """utf-16 or utf-32 when the file starts with their byte-order mark, else utf-8-sig (UTF-8, with or without
    the mark Excel and Notepad write)."""
    with path.open("rb") as f:
        head = f.read(4)
    return next((encoding for bom, encoding in WIDE_BOMS if head.startswith(bom)), "utf-8-sig")


def _utf8_copy(path: Path, encoding: str, work_dir: Path) -> Path:
    copy = work_dir / f"utf8-{path.name}"
    try:
        with path.open(encoding=encoding, newline="") as source, copy.open("w", encoding="utf-8", newline="") as out:
            for block in iter(lambda: source.read(1 << 20), ""):
                out.write(block)
    except UnicodeDecodeError:
        raise UserError(f"{path}: starts with a {encoding.upper()} byte-order mark but is not valid {encoding.upper()} "
                        f"text; re-save it as UTF-8") from None
    return copy


def _require_utf8(path: Path) -> None:
    """Arrow's JSON reader keeps bytes that are not UTF-8 and fails only when a later stage reads the text: check
    the whole file first (decoding runs at about 1 GB/s, a fraction of the tokenizer's time)."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    try:
        with path.open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                decoder.decode(block)
        decoder.decode(b"", final=True)
    except UnicodeDecodeError:
        raise UserError(_not_utf8(path)) from None


def iter_file_records(path: Path, kind: str) -> Iterator[tuple[str, dict]]:
    """(where, record) for each row, read the slow way: for the exact place of a syntax error."""
    encoding = text_encoding(path)
    try:
        yield from _records(path, kind, encoding)
    except UnicodeDecodeError:
        raise UserError(_not_utf8(path) if encoding == "utf-8-sig" else
                        f"{path}: not valid {encoding.upper()} text; re-save it as UTF-8") from None


def _records(path: Path, kind: str, encoding: str) -> Iterator[tuple[str, dict]]:
    if kind == "jsonl":
        with path.open(encoding=encoding) as f:
            for line_no, line in enumerate(f, 1):
                line = line.rstrip("\n")  # else an error at the end of a cut-off line is reported at column 1
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as error:
                    ends_early = error.pos >= len(line.rstrip()) or error.msg.startswith("Unterminated string")
                    cut = "; the line ends before the object does (cut off?)" if ends_early else ""
                    raise UserError(f"{path}:{line_no}: invalid JSON ({error.msg.removesuffix(' at')} at column "
                                    f"{error.colno}{cut}); each line must be one complete JSON object") from None
                _require_object(record, f"{path}:{line_no}")
                yield f"{path}:{line_no}", record
    elif kind == "json":
        try:
            data = json.loads(path.read_text(encoding=encoding))
        except json.JSONDecodeError as error:
            raise UserError(f"{path}:{error.lineno}: invalid JSON ({error.msg.removesuffix(' at')} at column "
                            f"{error.colno}); fix the file or convert it to JSONL") from None
        if not isinstance(data, list):
            raise UserError(f"{path}: expected a JSON array of objects at the top level")
        for index, record in enumerate(data):
            _require_object(record, f"{path}: item {index}")
            yield f"{path}: item {index}", record
    else:
        with path.open(encoding=encoding, newline="") as f:
            reader = csv.DictReader(f)
            for record in reader:
                if None in record:
                    raise UserError(f"{path}:{reader.line_num}: more values than header columns; quote fields "
                                    f"that contain commas")
                yield f"{path}:{reader.line_num}", record


def _not_utf8(path: Path) -> str:
    """The first byte that is not UTF-8, as file:line (a line ends at LF, CRLF or CR, as Python counts)."""
    line_no = 0
    with path.open("rb") as f:
        for chunk in f:
            for line in chunk.removesuffix(b"\n").removesuffix(b"\r").split(b"\r"):
                line_no += 1
                try:
                    line.decode("utf-8")
                except UnicodeDecodeError as error:
                    return (f"{path}:{line_no}: byte 0x{line[error.start]:02X} at byte {error.start + 1} of the line "
                            f"is not UTF-8 (saved as Windows-1252 or Latin-1, as Excel does for CSV?); re-save it "
                            f"as UTF-8 (Excel: CSV UTF-8) or convert it: iconv -f cp1252 -t utf-8 {path.name} > "
                            f"{path.stem}-utf8{path.suffix}")
    return f"{path}: not valid UTF-8 text; re-save it as UTF-8"


def _require_object(record: Any, where: str) -> None:
    if not isinstance(record, dict):
        raise UserError(f"{where}: expected a JSON object with named fields, got {type(record).__name__}")


def _jsonl_line(path: Path, row: int) -> int:
    """Line number of the row-th record (blank lines are skipped by the reader, so they are counted here)."""
    seen = -1
    with path.open(encoding=text_encoding(path)) as f:
        for line_no, line in enumerate(f, 1):
            seen += bool(line.strip())
            if seen == row:
                return line_no
    return row + 1


def _csv_line(path: Path, row: int) -> int:
    """Line on which the row-th record ends (quoted fields may span lines), as csv.reader counts."""
    with path.open(encoding=text_encoding(path), newline="") as f:
        reader = csv.reader(f)
        for index, _ in enumerate(reader, -1):  # -1: the header
            if index == row:
                return reader.line_num
    return row + 2


def _read_saved_dataset(path: Path, config_key: str, split: str, split_given: bool) -> Rows:
    from datasets import DatasetDict, load_from_disk

    try:
        dataset = load_from_disk(str(path))
    except FileNotFoundError:
        raise UserError(f"{config_key}: {path} is a folder but not a datasets save_to_disk folder") from None
    if isinstance(dataset, DatasetDict):
        if split not in dataset:
            raise UserError(f"{config_key}: {path} has splits {', '.join(dataset)}, not '{split}'; "
                            f"write {config_key}: {{path: {path}, split: NAME}}")
        dataset = dataset[split]
        label = f"{path}[{split}]"
    elif split_given:
        raise UserError(f"{config_key}: {path} holds a single dataset without splits; remove split")
    else:
        label = str(path)
    return Rows(dataset, [(0, Origin("saved", label))])


# SQL (SQLite and PostgreSQL, through SQLAlchemy)

def read_sql(source: SQLSource, config_key: str, work_dir: Path) -> Rows:
    """Stream the query's rows in chunks into an Arrow file (never all rows in memory) and hash them on the way,
    so the same query on changed data gets a different fingerprint."""
    import pyarrow as pa
    from datasets import Dataset
    from sqlalchemy import create_engine, text
    from sqlalchemy.exc import ArgumentError, DBAPIError, SQLAlchemyError

    url, label = _database_url(source, config_key)
    try:
        engine = create_engine(url, **_engine_options(url, source.timeout))
    except (ArgumentError, ValueError) as error:  # e.g. port 5432x: int() of it raises while the URL is parsed
        raise UserError(mask(f"{config_key}.database: {label} is not a valid database URL ({error}); write "
                             f"postgresql://user:${{PGPASSWORD}}@host[:port]/dbname or sqlite:///path/to.db")) from None
    digest = hashlib.sha256(source.query.encode())
    arrow_file = Path(tempfile.mkstemp(dir=work_dir, prefix="query-", suffix=".arrow")[1])
    writer, schema, count = None, None, 0
    stage = "connect"
    try:
        with engine.connect() as connection:
            stage = "query"
            if url.startswith("sqlite"):
                _interrupt_after(connection.connection.driver_connection, source.timeout)
            # stream_results: a server-side cursor, so the database hands rows over chunk by chunk.
            result = connection.execution_options(stream_results=True, max_row_buffer=SQL_CHUNK_ROWS).execute(
                text(source.query))
            columns = list(result.keys())
            for chunk in result.partitions(SQL_CHUNK_ROWS):
                records = [dict(zip(columns, row)) for row in chunk]
                digest.update(json.dumps(records, default=str, sort_keys=True).encode())
                batch = _record_batch(records, schema, count, config_key)
                schema = batch.schema
                writer = writer or pa.ipc.new_stream(str(arrow_file), schema)
                writer.write_batch(batch)
                count += len(records)
            if writer is None:  # no rows: an empty file with the query's columns, so validation says "no examples"
                writer = pa.ipc.new_stream(str(arrow_file), pa.schema([(c, pa.string()) for c in columns]))
    except DBAPIError as error:
        raise UserError(_sql_error(error, source, config_key, label, stage)) from None
    except SQLAlchemyError as error:
        setting = "database" if stage == "connect" else "query"
        raise UserError(mask(f"{config_key}.{setting}: {str(error).splitlines()[0]}; check the database URL and "
                             f"query")) from None
    finally:
        if writer is not None:
            writer.close()
        engine.dispose()
    rows = Rows(Dataset.from_file(str(arrow_file)), [(0, Origin("sql", label))])
    rows.files = [DataFile(mask(f"{label} :: {source.query}"), digest.hexdigest(), count)]
    return rows


def _database_url(source: SQLSource, config_key: str) -> tuple[str, str]:
    """SQLAlchemy URL and the (password-free) label used in messages."""
    url = source.database
    if url.startswith("sqlite:///"):
        db_path = Path(url.removeprefix("sqlite:///"))
        if not db_path.is_file():
            raise UserError(f"{config_key}.database: {db_path} does not exist; check the path")
        # Read-only URI: the tool never writes into the user's data (and works on read-only binds).
        return f"sqlite:///file:{db_path.resolve()}?mode=ro&uri=true", str(db_path)
    if url.startswith(("postgresql://", "postgresql+psycopg://", "postgres://")):
        rest = url.split("://", 1)[1]
        return f"postgresql+psycopg://{rest}", mask(url)
    raise UserError(f"{config_key}.database: {mask(url)}: unsupported database; use sqlite:///path/to.db or "
                    f"postgresql://user:${{PGPASSWORD}}@host/dbname")


def _engine_options(url: str, timeout: float) -> dict:
    from sqlalchemy.pool import NullPool

    if not url.startswith("postgresql"):
        return {}
    milliseconds = int(timeout * 1000)
    # A read-only transaction (the tool never writes into the user's data) and a server-side statement timeout,
    # so a runaway query fails with a message instead of holding the job until Slurm kills it.
    return {"connect_args": {"connect_timeout": 10, "options": f"-c statement_timeout={milliseconds} "
                                                               f"-c default_transaction_read_only=on"},
            "poolclass": NullPool}


def _interrupt_after(sqlite_connection, seconds: float) -> None:
    """SQLite has no statement timeout: its progress handler, called every 10,000 virtual machine instructions,
    interrupts the query (OperationalError "interrupted") once SECONDS have passed, reading rows included."""
    deadline = time.monotonic() + seconds
    sqlite_connection.set_progress_handler(lambda: time.monotonic() > deadline, 10_000)


def _record_batch(records: list[dict], schema, first_row: int, config_key: str):
    import pyarrow as pa

    try:
        return pa.RecordBatch.from_pylist(records, schema=schema)
    except (pa.ArrowInvalid, pa.ArrowTypeError) as error:
        raise UserError(f"{config_key}.query: a column changes type after row {first_row} ({error}); CAST it to one "
                        f"type in the query") from None


def _sql_error(error, source: SQLSource, config_key: str, label: str, stage: str) -> str:
    original = getattr(error, "orig", None) or error
    detail = (str(original).strip().splitlines() or [type(original).__name__])[0]
    if "statement timeout" in detail or detail == "interrupted":  # PostgreSQL, SQLite (_interrupt_after)
        return mask(f"{config_key}.query: cancelled after {source.timeout:g} s (statement timeout) on {label}; "
                    f"make the query cheaper or raise {config_key}.timeout")
    if stage == "connect":
        return mask(f"{config_key}.database: cannot connect to {label}: {detail}; check host, port, user and "
                    f"password (PGPASSWORD in .env)")
    return mask(f"{config_key}.query: {detail}; check the SQL against {label}")
