"""Training under torchrun with 2 CPU processes over gloo: reported losses, the process-group timeout, FSDP.

Each test starts `torchrun --standalone --nproc-per-node 2 entrypoint.py train ...`, as train_multi.sbatch does
on one node, and checks the run against an independent single-process computation.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import CHAT_ROWS, REPO, build_tiny_tokenizer, tiny_lm_config, write_jsonl

pytestmark = pytest.mark.slow

REVIEWS = [{"text": f"{adjective} {thing}", "label": label}
           for adjective, label in [("great", "positive"), ("awful", "negative")]
           for thing in ["node", "queue", "cluster", "login", "storage", "scheduler", "network", "support"]]


def torchrun(*args: str, script: Path = REPO / "entrypoint.py") -> subprocess.CompletedProcess:
    """`sft ARGS` (or another script) in 2 processes on this machine (a free rendezvous port each time)."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               str(script), *args]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return result


@pytest.fixture(scope="module")
def tiny_bert_classifier(tmp_path_factory) -> Path:
    """A 2-layer BERT sequence classifier with its head saved (nothing is initialised at load), no dropout."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    folder = tmp_path_factory.mktemp("tiny-bert")
    tokenizer = build_tiny_tokenizer(folder, chat_template=None)
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4, max_position_embeddings=128, pad_token_id=tokenizer.pad_token_id,
                        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, num_labels=2,
                        id2label={0: "negative", 1: "positive"}, label2id={"negative": 0, "positive": 1})
    BertForSequenceClassification(config).save_pretrained(folder)
    return folder


def classification_loss(model_dir: Path, tokenizer_dir: Path, rows: list[dict]) -> float:
    """Mean cross-entropy over rows, one example at a time (no padding, no batching, no Trainer)."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    losses = []
    with torch.no_grad():
        for row in rows:
            logits = model(**tokenizer(row["text"], truncation=True, max_length=64, return_tensors="pt")).logits
            label = torch.tensor([model.config.label2id[row["label"]]])
            losses.append(torch.nn.functional.cross_entropy(logits, label).item())
    return sum(losses) / len(losses)


def causal_lm_loss(model_dir: Path, tokenizer_dir: Path, rows: list[dict]) -> float:
    """Mean cross-entropy over every answer token of rows, one conversation at a time."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sft.data import tokenize_messages

    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    total, tokens = 0.0, 0
    with torch.no_grad():
        for row in rows:
            example = tokenize_messages(tokenizer, row["messages"], 64)
            logits = model(input_ids=torch.tensor([example["input_ids"]])).logits[0, :-1]
            targets = torch.tensor(example["labels"][1:])
            total += torch.nn.functional.cross_entropy(logits, targets, ignore_index=-100, reduction="sum").item()
            tokens += int((targets != -100).sum())
    return total / tokens


@pytest.mark.parametrize("task", ["classification", "causal_lm"])
def test_losses_under_two_process_ddp_equal_a_single_process_evaluation(task, tiny_bert_classifier, tiny_causal_lm,
                                                                         tmp_path):
    """One optimizer step over the whole training set (4 examples per process), then one evaluation: the logged
    train loss is the initial weights' loss on those 8 examples, the logged eval loss the final weights' loss on
    the 8 eval examples, both as a single process computes them."""
    if task == "classification":
        model, train_rows, eval_rows, reference = tiny_bert_classifier, REVIEWS[::2], REVIEWS[1::2], classification_loss
    else:
        model, train_rows, eval_rows, reference = tiny_causal_lm, CHAT_ROWS[:8], CHAT_ROWS[8:16], causal_lm_loss
    config = tiny_lm_config(model, write_jsonl(tmp_path / "train.jsonl", train_rows), tmp_path / "runs",
                            max_steps=1, learning_rate=0.05, eval_strategy="steps", eval_steps=1)
    config["task"] = task
    config["data"]["eval"] = str(write_jsonl(tmp_path / "eval.jsonl", eval_rows))
    config_path = tmp_path / "config.yaml"
    config_path.write_text(yaml.safe_dump(config))

    torchrun("train", str(config_path), "training.ddp_backend=gloo")

    run_dir = tmp_path / "runs" / "tiny"
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    logged_loss = next(r["loss"] for r in records if "loss" in r)
    logged_eval_loss = next(r["eval_loss"] for r in records if "eval_loss" in r)
    summary_loss = next(r["train_loss"] for r in records if "train_runtime" in r)
    results = json.loads((run_dir / "manifest.json").read_text())["results"]

    initial_loss = reference(model, model, train_rows)
    final_eval_loss = reference(run_dir / "final", model, eval_rows)
    assert logged_loss == pytest.approx(initial_loss, rel=1e-5)
    assert summary_loss == pytest.approx(initial_loss, rel=1e-5)
    assert logged_eval_loss == pytest.approx(final_eval_loss, rel=1e-5)
    assert results["train_loss"] == logged_loss and results["eval_loss"] == logged_eval_loss
    # The eval loss is that of the trained weights (the step moved it well beyond the tolerance above).
    assert final_eval_loss != pytest.approx(reference(model, model, eval_rows), rel=1e-4)


def test_the_configured_timeout_reaches_the_process_group(tiny_causal_lm, tiny_chat_data, tmp_path):
    """Read back the timeout of the process group sft starts (gloo's own default is 1800 s, as is sft's)."""
    config_path = tmp_path / "config.yaml"
    config_path.write_text(yaml.safe_dump(tiny_lm_config(tiny_causal_lm, tiny_chat_data, tmp_path / "runs")))
    probe = tmp_path / "probe.py"
    probe.write_text(
        "import sys, torch, torch.distributed as dist\n"
        "from sft.config import load_config\n"
        "from sft.training import start_processes\n"
        "state = start_processes(load_config(sys.argv[1], sys.argv[2:]))\n"
        "backend = dist.distributed_c10d._get_default_group()._get_backend(torch.device('cpu'))\n"
        "print(f'rank {state.process_index}: {type(backend).__name__} {backend.options._timeout.total_seconds():g} s')\n")
    result = torchrun(str(config_path), "training.ddp_backend=gloo", "training.ddp_timeout=4321", script=probe)
    assert sorted(line for line in result.stdout.splitlines() if line.startswith("rank ")) \
        == ["rank 0: ProcessGroupGloo 4321 s", "rank 1: ProcessGroupGloo 4321 s"]
