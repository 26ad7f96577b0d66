"""Training under torchrun with 2 CPU processes over gloo: reported losses, the process-group timeout, FSDP.

Each test starts `torchrun --standalone --nproc-per-node 2 entrypoint.py train ...`, as train_multi.sbatch does
on one node, and checks the run against an independent single-process computation.
"""
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from conftest import CHAT_ROWS, REPO, build_tiny_tokenizer, tiny_lm_config, write_jsonl

pytestmark = pytest.mark.slow

REVIEWS = [{"text": f"{adjective} {thing}", "label": label}
           for adjective, label in [("great", "positive"), ("awful", "negative")]
           for thing in ["node", "queue", "cluster", "login", "storage", "scheduler", "network", "support"]]


# Test-only: accelerate's FSDP on CPU (see tests/hooks/sitecustomize.py).
FSDP_ON_CPU = {"PYTHONPATH": str(REPO / "tests" / "hooks"), "SFT_TEST_FSDP_ON_CPU": "1"}


def torchrun_command(*args: str, script: Path = REPO / "entrypoint.py") -> list[str]:
    """`sft ARGS` (or another script) in 2 processes on this machine (a free rendezvous port each time)."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(script), *args]


def torchrun(*args: str, script: Path = REPO / "entrypoint.py", env: dict | None = None) -> subprocess.CompletedProcess:
    result = subprocess.run(torchrun_command(*args, script=script), capture_output=True, text=True, timeout=600,
                            env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})
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
        "from sft.training.trainer import start_processes\n"
        "state = start_processes(load_config(sys.argv[1], sys.argv[2:]))\n"
        "backend = dist.distributed_c10d._get_default_group()._get_backend(torch.device('cpu'))\n"
        # A file per rank: the ranks share one stdout, where their lines can interleave mid-line.
        f"open(f'{tmp_path}/rank-{{state.process_index}}.txt', 'w')"
        ".write(f'{type(backend).__name__} {backend.options._timeout.total_seconds():g} s')\n")
    torchrun(str(config_path), "training.ddp_backend=gloo", "training.ddp_timeout=4321", script=probe)
    assert [(tmp_path / f"rank-{rank}.txt").read_text() for rank in (0, 1)] == ["ProcessGroupGloo 4321 s"] * 2


def loss_records(run_dir: Path) -> list[tuple[int, float]]:
    path = run_dir / "metrics.jsonl"
    lines = path.read_text().splitlines() if path.is_file() else []
    return [(record["step"], record["loss"]) for line in lines if "loss" in (record := json.loads(line))]


def test_fsdp_shards_stops_all_ranks_together_resumes_exactly_and_saves_a_loadable_model(tiny_causal_lm,
                                                                                         tiny_chat_data, tmp_path):
    """FSDP2 through accelerate and Trainer, 2 processes: each holds half of the parameters; SIGUSR1 to one rank
    stops both at the same step with a complete checkpoint; the resumed run equals an uninterrupted one bit for
    bit; final/ loads with from_pretrained."""
    import shutil

    import psutil
    import torch
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    model = tmp_path / "model"  # with dropout, so that each rank's restored RNG state matters
    shutil.copytree(tiny_causal_lm, model)
    model_config = AutoConfig.from_pretrained(model)
    model_config.attention_dropout = 0.1
    model_config.save_pretrained(model)
    config = tiny_lm_config(model, tiny_chat_data, tmp_path / "runs", epochs=100, max_steps=100, batch_size=2,
                            fsdp="full_shard auto_wrap")
    config_path = tmp_path / "config.yaml"
    config_path.write_text(yaml.safe_dump(config))
    env = {**os.environ, "OMP_NUM_THREADS": "1", **FSDP_ON_CPU}

    torchrun("train", str(config_path), "training.ddp_backend=gloo", "output.name=reference", env=FSDP_ON_CPU)
    reference = tmp_path / "runs" / "reference"
    log = next(reference.glob("sft_log_*.log")).read_text()
    held = float(re.search(r"rank 0 holds ([\d.]+)% of the model's parameter values \(FSDP shards", log)[1])
    assert 45 < held < 55, log

    run_dir = tmp_path / "runs" / "preempted"
    command = torchrun_command("train", str(config_path), "training.ddp_backend=gloo", "output.name=preempted")
    with (tmp_path / "preempted.log").open("w") as output:
        launcher = subprocess.Popen(command, env=env, stdout=output, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 300
        while len(loss_records(run_dir)) < 5:
            assert launcher.poll() is None and time.monotonic() < deadline, (tmp_path / "preempted.log").read_text()
            time.sleep(0.05)
        rank_1 = next(p for p in psutil.Process(launcher.pid).children(recursive=True)
                      if p.environ().get("RANK") == "1")
        rank_1.send_signal(signal.SIGUSR1)  # rank 0 hears of it only through the agreed flag
        assert launcher.wait(timeout=300) != 0  # torchrun reports the workers' exit 75 as a failure
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["status"] == "preempted"
    checkpoints = list((run_dir / "checkpoints").glob("checkpoint-*"))
    assert len(checkpoints) == 1 and (checkpoints[0] / ".complete").is_file()
    step = int(checkpoints[0].name.split("-")[1])
    assert 5 <= step < 100
    # accelerate's FSDP checkpoint (the gathered model and optimizer), and both ranks' RNG states
    assert {"pytorch_model_fsdp.bin", "optimizer.bin", "rng_state_0.pth", "rng_state_1.pth"} \
        <= {p.name for p in checkpoints[0].iterdir()}
    assert "stopped by a signal on another rank" in (tmp_path / "preempted.log").read_text()

    torchrun("train", str(config_path), "training.ddp_backend=gloo", "output.name=preempted", env=FSDP_ON_CPU)
    assert loss_records(run_dir) == loss_records(reference)
    expected, actual = (load_file(d / "final" / "model.safetensors") for d in (reference, run_dir))
    assert expected.keys() == actual.keys() and all(expected[name].equal(actual[name]) for name in expected)
    loaded = AutoModelForCausalLM.from_pretrained(run_dir / "final")
    assert all(torch.equal(parameter, actual[name]) for name, parameter in loaded.state_dict().items())


def test_the_wall_time_guard_stops_both_ranks_at_one_step_and_the_next_session_finishes(tiny_causal_lm,
                                                                                       tiny_chat_data, tmp_path):
    """training.stop_at under torchrun, no signal: every rank's guard sees the end coming, and the agreed flag stops
    both after the same step with one complete checkpoint holding both ranks' state, exit 75 on each; the next
    session resumes from it and finishes, each step logged once."""
    config = tiny_lm_config(tiny_causal_lm, tiny_chat_data, tmp_path / "runs", max_steps=6, save_strategy="steps",
                            save_steps=5)
    config_path = tmp_path / "config.yaml"
    config_path.write_text(yaml.safe_dump(config))
    env = {name: value for name, value in os.environ.items() if not name.startswith("SLURM_")}
    stopped = subprocess.run(torchrun_command("train", str(config_path), "training.ddp_backend=gloo",
                                              "training.stop_at=20s"),
                             capture_output=True, text=True, timeout=600, env={**env, "OMP_NUM_THREADS": "1"})
    output = stopped.stdout + stopped.stderr
    assert stopped.returncode != 0 and re.findall(r"exitcode\s*:\s*75", output), output[-5000:]
    run_dir = tmp_path / "runs" / "tiny"
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["status"] == "preempted" and manifest["sessions"][0]["ended_by"] == "wall-time guard"
    # The guard trips at the first step; the ranks agree on it one step later (the flag's all-reduce overlaps it).
    step = int(re.search(r"stopped by the wall-time guard at step (\d+)",
                         next(run_dir.glob("sft_log_*.log")).read_text())[1])
    [checkpoint] = (run_dir / "checkpoints").glob("checkpoint-*")  # the guard's save: the regular one is at 5
    assert step < 5 and checkpoint.name == f"checkpoint-{step}" and (checkpoint / ".complete").is_file()
    assert {"rng_state_0.pth", "rng_state_1.pth"} <= {p.name for p in checkpoint.iterdir()}  # both ranks saved

    torchrun("train", str(config_path), "training.ddp_backend=gloo", "training.stop_at=1h", env=env)
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["status"] == "finished"
    assert [s["ended_by"] for s in manifest["sessions"]] == ["wall-time guard", "finished"]
    assert [step for step, _ in loss_records(run_dir)] == [1, 2, 3, 4, 5, 6]


def test_fsdp_where_accelerate_would_not_shard_is_refused(tiny_causal_lm, tiny_chat_data, tmp_path):
    """Without GPUs accelerate ignores the FSDP plugin and trains with DDP: sft refuses instead of pretending."""
    import torch

    if torch.cuda.is_available():
        pytest.skip("on GPUs accelerate does shard")
    config_path = tmp_path / "config.yaml"
    config_path.write_text(yaml.safe_dump(tiny_lm_config(tiny_causal_lm, tiny_chat_data, tmp_path / "runs",
                                                         fsdp="full_shard auto_wrap")))
    result = subprocess.run(torchrun_command("train", str(config_path), "training.ddp_backend=gloo"), text=True,
                            capture_output=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode != 0
    assert "training.fsdp: accelerate runs FSDP only on GPUs, and this run has none" in result.stderr
    assert not list((tmp_path / "runs" / "tiny").glob("checkpoints/checkpoint-*"))  # no step was trained

    single = subprocess.run([sys.executable, str(REPO / "entrypoint.py"), "train", str(config_path)], text=True,
                            capture_output=True, timeout=600)
    assert single.returncode == 2 and "training.fsdp: FSDP shards the model across processes" in single.stderr
