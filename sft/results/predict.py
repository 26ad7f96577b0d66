"""`sft predict RUN_DIR INPUT`: a finished run's model on new rows, one JSON line per row: the row as read plus
`predicted_label` and `probabilities` (classification) or `generated` (causal LM, greedy and bounded).

    sft predict runs/demo-20261125 new_reviews.jsonl --output predictions.jsonl
"""
import json
import logging
import os
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Iterator

from sft.errors import UserError
from sft.results.finished_run import TrainedRun, load_model, load_tokenizer, open_trained_run

log = logging.getLogger("sft")
INPUT = "INPUT"  # how messages about the input file name it (data sources name their config key)
PROGRESS_SECONDS = 30  # a progress line at most this often: a Slurm log stays readable over a million rows


def predict(run_dir: str, input_path: str, output: str | None, batch_size: int, max_new_tokens: int) -> int:
    """Write predictions for every row of INPUT to OUTPUT (stdout when None); returns the number of rows."""
    import torch

    from sft.data import read_source
    from sft.data.validation import iter_records
    from sft.model.device import training_dtype

    run = open_trained_run(run_dir)
    if output and Path(output).exists():
        raise UserError(f"--output {output}: the file exists; choose a new name or delete it (predict never "
                        f"overwrites a file)")
    # Flex attention is for packed training batches; padded inference batches use sdpa (or eager, if trained so).
    attention = "eager" if run.config.model.attn_implementation == "eager" else "sdpa"
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with tempfile.TemporaryDirectory(prefix="sft-predict-") as work_dir:
        rows = read_source(input_path, INPUT, Path(work_dir))
        check_rows(rows, run, input_path)
        tokenizer = load_tokenizer(run)
        model = load_model(run, dtype=training_dtype(run.config), attention=attention).to(device)
        predict_batch = classify if run.config.task == "classification" else generate
        options = {} if run.config.task == "classification" else {"max_new_tokens": max_new_tokens}
        with _output_file(output) as out:
            done, logged = 0, time.monotonic()
            for batch in _batches((record for _, record in iter_records(rows)), batch_size):
                for record, prediction in zip(batch, predict_batch(run, model, tokenizer, batch, **options)):
                    out.write(json.dumps({**record, **prediction}, ensure_ascii=False, default=str) + "\n")
                done += len(batch)
                if done == len(rows) or time.monotonic() - logged > PROGRESS_SECONDS:
                    log.info("predicted %d/%d rows", done, len(rows))
                    logged = time.monotonic()
    return len(rows)


def check_rows(rows, run: TrainedRun, input_path: str) -> None:
    """Every row has what the run's format reads before its answer (the answer itself, a label or completion, may
    be absent): all problems counted, the first few named by file:line, in one line."""
    from sft.data.validation import iter_records

    fields = run.config.data.fields
    needed = {"classification": [fields.text] + ([fields.text_pair] if fields.text_pair else []),
              "messages": [fields.messages], "prompt_completion": [fields.prompt], "instruction": [fields.instruction],
              "text": [fields.text]}[run.data_format]
    missing = [c for c in needed if c not in rows.dataset.column_names]
    if missing:
        raise UserError(f"{input_path}: no column {', '.join(repr(c) for c in missing)} (columns: "
                        f"{', '.join(rows.dataset.column_names)}); the run trained on {run.data_format} data, which "
                        f"reads {', '.join(needed)} (data.fields in the run's config.yaml)")
    if not len(rows):
        raise UserError(f"{input_path}: no rows to predict")
    problems = [f"{rows.where(index)}: {problem}" for index, record in iter_records(rows, needed)
                for problem in _row_problems(record, needed, run.data_format)]
    if problems:
        raise UserError(f"{input_path}: {len(problems)} bad row(s): {'; '.join(problems[:3])}"
                        f"{f' (and {len(problems) - 3} more)' if len(problems) > 3 else ''}")


def _row_problems(record: dict, needed: list[str], data_format: str) -> list[str]:
    if data_format != "messages":
        return [f"'{column}' must be non-empty text" for column in needed
                if not isinstance(record[column], str) or not record[column]]
    messages = record[needed[0]]
    if not isinstance(messages, list) or not all(isinstance(m, dict) and isinstance(m.get("role"), str)
                                                 and isinstance(m.get("content"), str) for m in messages):
        return [f"'{needed[0]}' must be a list of {{role, content}} messages"]
    if all(m["role"] == "assistant" for m in messages):
        return ["no message before the answer to continue from"]
    return []


def _batches(records: Iterator[dict], size: int) -> Iterator[list[dict]]:
    batch = []
    for record in records:
        batch.append(record)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def classify(run: TrainedRun, model, tokenizer, records: list[dict]) -> list[dict]:
    """Label name and the probability of every label, tokenized as training did (same truncation)."""
    import torch

    from sft.data.formats import tokenize_classification

    fields = run.config.data.fields
    examples = []
    for record in records:
        pair = record[fields.text_pair] if fields.text_pair else None
        example = tokenize_classification(tokenizer, record[fields.text], pair, 0, run.config.data.max_length)
        examples.append({k: v for k, v in example.items() if k != "labels"})
    tokenizer.padding_side = "right"
    batch = tokenizer.pad(examples, return_tensors="pt").to(model.device)
    with torch.no_grad():
        probabilities = torch.softmax(model(**batch).logits.float(), dim=-1).tolist()
    names = run.label_names
    return [{"predicted_label": names[p.index(max(p))], "probabilities": dict(zip(names, p))} for p in probabilities]


def generate(run: TrainedRun, model, tokenizer, records: list[dict], max_new_tokens: int) -> list[dict]:
    """Greedy continuation of each row's prompt, at most max_new_tokens, stopping at end of sequence."""
    import torch
    from transformers import GenerationConfig

    from sft.data.formats import chat_format, prompt_ids

    fields, chat = run.config.data.fields, chat_format(run.config)
    prompts = [prompt_ids(tokenizer, record, run.data_format, fields, chat) for record in records]
    # Left padding: every prompt ends where generation starts.
    tokenizer.padding_side = "left"
    batch = tokenizer.pad({"input_ids": prompts}, return_tensors="pt").to(model.device)
    stop = model.generation_config.eos_token_id
    stop = {*(stop if isinstance(stop, list) else [stop]), tokenizer.eos_token_id} - {None}
    settings = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                                eos_token_id=sorted(stop), pad_token_id=tokenizer.pad_token_id)
    with torch.no_grad():
        output = model.generate(**batch, generation_config=settings)
    new_tokens = output[:, batch["input_ids"].shape[1]:].tolist()
    return [{"generated": tokenizer.decode(_until_stop(ids, stop), skip_special_tokens=True)} for ids in new_tokens]


def _until_stop(ids: list[int], stop: set[int]) -> list[int]:
    """The generated tokens before the first stop token (after it come only pad tokens of a finished row)."""
    end = next((i for i, token in enumerate(ids) if token in stop), len(ids))
    return ids[:end]


@contextmanager
def _output_file(output: str | None) -> Iterator[IO]:
    """stdout, or a new file that appears only once complete: an interrupted predict never leaves half a file that
    looks finished, and a file that appeared meanwhile is not overwritten (a hard link never replaces one)."""
    if output is None:
        yield sys.stdout
        sys.stdout.flush()
        return
    path = Path(output)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with temporary.open("x", encoding="utf-8") as file:
            yield file
        os.link(temporary, path)
    except FileExistsError:
        raise UserError(f"--output {output}: the file appeared while predicting; choose a new name") from None
    finally:
        temporary.unlink(missing_ok=True)
