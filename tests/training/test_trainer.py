"""Train stage: packed batches are exact, tiny end-to-end runs learn, the run directory is complete, resume is exact."""
import functools
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import REPO, tiny_lm_config
from test_report import tensorboard_scalars

from sft.config import load_config
from sft.errors import EXIT_PREEMPTED, EXIT_USER_ERROR
from sft.run import checkpoints as run_checkpoints


def train_losses(run_dir: Path) -> list[tuple[int, float]]:
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(line["step"], line["loss"]) for line in lines if "loss" in line]


def assert_same_training(expected_dir: Path, actual_dir: Path, rel: float = 1e-5, atol: float = 1e-5,
                         rtol: float = 1e-4) -> None:
    """Two runs that differ in how they compute, not in what: the same losses step by step (at least 3 logged) and
    final weights under the same names, equal to float rounding."""
    from safetensors.torch import load_file
    from torch.testing import assert_close

    expected, actual = train_losses(expected_dir), train_losses(actual_dir)
    assert len(expected) >= 3 and [(step, pytest.approx(loss, rel=rel)) for step, loss in actual] == expected
    expected_weights, actual_weights = (load_file(next((d / "final").glob("*.safetensors")))
                                        for d in (expected_dir, actual_dir))
    assert actual_weights.keys() == expected_weights.keys()
    for name, weight in actual_weights.items():
        assert_close(weight, expected_weights[name], atol=atol, rtol=rtol, msg=name)


def run_cli(*args: str, cwd: Path | None = None, **popen) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "entrypoint.py"), *args], capture_output=True, text=True,
                          cwd=cwd, timeout=600, **popen)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
# Every kernel that model.attn_implementation auto can choose (sft.model.device.choose_attention), on every device.
@pytest.mark.parametrize("attention", ["sdpa", "eager", "flex_attention",
                                       pytest.param("flash_attention_2", marks=pytest.mark.gpu),
                                       pytest.param("flash_attention_3", marks=pytest.mark.gpu)])
def test_packed_loss_equals_per_example_loss(tiny_causal_lm, attention, device):
    """Flattened examples must not attend to each other: the packed batch's logits and loss under each kernel equal
    those of each example run alone through eager attention (the independent reference). The reference is never
    flex_attention on a lone unmasked sequence: on some CPU builds that path gave logits off by 0.14, or NaN."""
    import torch
    from transformers import AutoModelForCausalLM, DataCollatorWithFlattening
    from transformers.utils import is_flash_attn_2_available, is_flash_attn_3_available

    dtype = torch.float32
    if attention.startswith("flash"):
        if device == "cpu":
            pytest.skip("flash attention runs on CUDA only")
        if not {"flash_attention_2": is_flash_attn_2_available, "flash_attention_3": is_flash_attn_3_available}[attention]():
            pytest.skip(f"{attention}: flash-attn is not installed")
        dtype = torch.bfloat16  # flash kernels take half precision only
    model = AutoModelForCausalLM.from_pretrained(tiny_causal_lm, attn_implementation=attention,
                                                 dtype=dtype).eval().to(device)
    reference = AutoModelForCausalLM.from_pretrained(tiny_causal_lm, attn_implementation="eager",
                                                     dtype=dtype).eval().to(device)
    examples = [{"input_ids": [1, 20, 30, 40, 50, 60], "labels": [-100, -100, 30, 40, 50, 60]},
                {"input_ids": [1, 70, 80, 90], "labels": [-100, 70, 80, 90]},
                {"input_ids": [1, 25, 35, 45, 55, 65, 75, 85], "labels": [-100, -100, -100, 45, 55, 65, 75, 85]}]
    packed = {k: v.to(device) for k, v in DataCollatorWithFlattening(return_position_ids=True)(examples).items()}
    with torch.no_grad():
        packed_output = model(**packed, use_cache=False)
        separate = [reference(input_ids=torch.tensor([e["input_ids"]], device=device),
                              labels=torch.tensor([e["labels"]], device=device), use_cache=False) for e in examples]
    answer_tokens = [sum(label != -100 for label in e["labels"][1:]) for e in examples]
    per_example_loss = sum(out.loss * n for out, n in zip(separate, answer_tokens)) / sum(answer_tokens)
    tolerance = 1e-5 if device == "cpu" else 1e-4  # different GPU kernels sum in different orders
    if dtype == torch.bfloat16:
        tolerance = 2e-2  # bf16 keeps 8 bits of mantissa
    torch.testing.assert_close(packed_output.logits[0], torch.cat([out.logits[0] for out in separate]),
                               atol=tolerance, rtol=tolerance)
    torch.testing.assert_close(packed_output.loss, per_example_loss, atol=tolerance / 10, rtol=tolerance)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["full", "lora"])
def test_tiny_causal_lm_learns_and_writes_a_complete_run_dir(tiny_causal_lm, tiny_chat_data, tmp_path,
                                                             write_config, method):
    from transformers import AutoModelForCausalLM

    from sft.training.trainer import run_training

    config = tiny_lm_config(tiny_causal_lm, tiny_chat_data, tmp_path / "runs", epochs=8,
                            learning_rate=3e-3 if method == "full" else 2e-2)
    config["method"] = {"name": method, "lora": {"r": 16, "alpha": 64}, "merge": method == "lora"}
    config["data"]["eval_fraction"] = 0.25
    config["training"]["eval_strategy"] = "epoch"
    result = run_training(load_config(write_config(config)))

    run_dir = result.run_dir
    losses = [loss for _, loss in train_losses(run_dir)]
    # LoRA on a random-init model moves slowly (a random lm_head caps the change in logits); full FT memorizes.
    assert losses[-1] < (0.6 if method == "full" else 0.95) * losses[0], losses
    assert result.metrics["eval_loss"] < losses[0]
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["status"] == "finished" and manifest["seed"] == 42
    assert manifest["data"]["files"][0]["sha256"] and manifest["data"]["files"][0]["rows"] == 24
    assert manifest["versions"]["torch"] and manifest["versions"]["transformers"]
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["method"]["name"] == method
    assert len(list(run_dir.glob("sft_log_*.log"))) == 1
    assert (run_dir / "final" / "tokenizer.json").is_file()
    if method == "lora":
        assert (run_dir / "final" / "adapter_model.safetensors").is_file()
        merged = AutoModelForCausalLM.from_pretrained(run_dir / "final" / "merged")
        base = AutoModelForCausalLM.from_pretrained(tiny_causal_lm)
        assert not any("lora" in name for name, _ in merged.named_parameters())
        changed = [n for n, p in merged.named_parameters() if not (p == base.get_parameter(n)).all()]
        assert changed and all("proj" in name for name in changed), changed
    else:
        assert (run_dir / "final" / "model.safetensors").is_file()
        AutoModelForCausalLM.from_pretrained(run_dir / "final")


def minilm_config(output: Path, **training) -> dict:
    """The demo's classification config (real MiniLM weights) with a short schedule in `output`."""
    config = yaml.safe_load((REPO / "configs" / "demo.yaml").read_text())
    config["data"]["train"] = str(REPO / "data" / "demo" / "reviews.jsonl")
    config["training"].update(training)
    config["output"] = {"dir": str(output), "name": "minilm"}
    return config


def final_weights(run_dir: Path) -> dict:
    from safetensors.torch import load_file

    return {f"{file.name}:{name}": tensor for file in sorted((run_dir / "final").glob("*.safetensors"))
            for name, tensor in load_file(file).items()}


@pytest.mark.slow
@pytest.mark.parametrize("task,method", [("classification", "full"), ("classification", "lora"),
                                         ("causal_lm", "full"), ("causal_lm", "lora")])
def test_same_config_data_and_seed_train_the_same_model(tiny_causal_lm, tiny_chat_data, tmp_path, write_config,
                                                        task, method):
    """The image's first promise. Two runs in one process: the second starts with the global generators wherever the
    first left them, so anything built before seeding (a new classifier head, LoRA adapters) would differ."""
    import torch

    from sft.training.trainer import run_training

    if task == "classification":
        config = minilm_config(tmp_path / "runs", max_steps=3, logging_steps=1, eval_strategy="no", save_strategy="no")
    else:
        config = tiny_lm_config(tiny_causal_lm, tiny_chat_data, tmp_path / "runs", max_steps=3)
    config["method"] = {"name": method, "lora": {"r": 4, "alpha": 8}}
    runs = []
    for name in ("first", "second"):
        config["output"]["name"] = name
        torch.rand(7)  # leave the global generator somewhere else than a fresh process would
        runs.append(run_training(load_config(write_config(config))).run_dir)
    first, second = (final_weights(run) for run in runs)
    assert train_losses(runs[0]) == train_losses(runs[1]) and len(train_losses(runs[0])) == 3
    assert first.keys() == second.keys() and first
    assert all(torch.equal(first[name], second[name]) for name in first)
    manifest = json.loads((runs[0] / "manifest.json").read_text())
    assert manifest["determinism"] == {"seed": 42, "deterministic": False, "torch_deterministic_algorithms": False,
                                       "cudnn_deterministic": False, "cudnn_benchmark": False,
                                       "cublas_workspace_config": None}


@pytest.mark.slow
def test_deterministic_switch_enables_deterministic_kernels_and_is_recorded(tiny_causal_lm, tiny_chat_data, tmp_path,
                                                                            write_config, monkeypatch):
    import torch

    from sft.training.trainer import run_training

    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    config = tiny_lm_config(tiny_causal_lm, tiny_chat_data, tmp_path / "runs", max_steps=2, deterministic=True)
    try:
        result = run_training(load_config(write_config(config)))
        assert torch.are_deterministic_algorithms_enabled() and torch.backends.cudnn.deterministic
    finally:
        torch.use_deterministic_algorithms(False)
        torch.backends.cudnn.deterministic = False
    determinism = json.loads((result.run_dir / "manifest.json").read_text())["determinism"]
    assert determinism["deterministic"] and determinism["torch_deterministic_algorithms"]
    assert determinism["cudnn_deterministic"] and determinism["cublas_workspace_config"] == ":4096:8"


@pytest.mark.slow
def test_token_budget_batches_train(tiny_causal_lm, tiny_chat_data, tmp_path, write_config):
    from conftest import CHAT_ROWS
    from transformers import AutoTokenizer

    from sft.data import group_by_tokens, tokenize_messages
    from sft.model.device import CPU_ATTENTION
    from sft.training.trainer import run_training

    tokenizer = AutoTokenizer.from_pretrained(tiny_causal_lm)
    lengths = [len(tokenize_messages(tokenizer, row["messages"], 64)["input_ids"]) for row in CHAT_ROWS]
    expected_batches = group_by_tokens(lengths, 128)
    assert all(sum(lengths[i] for i in batch) <= 128 for batch in expected_batches)

    config = tiny_lm_config(tiny_causal_lm, tiny_chat_data, tmp_path / "runs", max_tokens_per_batch=128)
    result = run_training(load_config(write_config(config)))
    # One optimizer step per token-budget batch (one epoch), far fewer than one per example.
    assert result.metrics["steps"] == len(expected_batches) < len(CHAT_ROWS) / 3
    manifest = json.loads((result.run_dir / "manifest.json").read_text())
    counts = manifest["data"]
    assert (counts["train_examples"], counts["train_batches"]) == (len(CHAT_ROWS), len(expected_batches))
    # Throughput: every token of the flattened batches is real, each example counted once; in every log line too.
    results = manifest["results"]
    assert results["real_tokens"] == results["processed_tokens"] == sum(lengths)
    assert results["token_efficiency"] == 1.0 and results["real_tokens_per_s"] > 0
    assert manifest["performance"] == {"attention": CPU_ATTENTION, "max_tokens_per_batch": 128, "compile": False,
                                       "chunked_loss": True}
    logged = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [line for line in logged if "loss" in line]
    assert all(line["token_efficiency"] == 1.0 and line["real_tokens_per_s"] > 0 for line in steps[1:])


def test_chunked_loss_trains_the_same_model_as_the_models_own_loss(tiny_causal_lm, tiny_chat_data, tmp_path,
                                                                   write_config):
    """Token-budget batches with gradient accumulation (num_items_in_batch spans two batches): the same losses step by
    step and the same final weights as the model's own cross-entropy."""
    from sft.training.trainer import run_training

    runs = {}
    for chunked in (False, "auto"):
        config = tiny_lm_config(tiny_causal_lm, tiny_chat_data, tmp_path / str(chunked), max_tokens_per_batch=128,
                                gradient_accumulation_steps=2, chunked_loss=chunked)
        runs[chunked] = run_training(load_config(write_config(config))).run_dir
    performance = [json.loads((runs[c] / "manifest.json").read_text())["performance"] for c in (False, "auto")]
    assert [p["chunked_loss"] for p in performance] == [False, True]
    assert_same_training(runs[False], runs["auto"])


def test_gradient_checkpointing_trains_the_same_model(tiny_causal_lm, tiny_chat_data, tmp_path, write_config,
                                                      monkeypatch):
    """Recomputing activations in the backward pass (with the chunked loss, the default) changes memory, not the
    losses or the weights."""
    import transformers.modeling_utils

    from sft.training.trainer import run_training

    checkpointed_layers, checkpoint = [], transformers.modeling_utils.checkpoint
    monkeypatch.setattr(transformers.modeling_utils, "checkpoint",
                        lambda *args, **kwargs: checkpointed_layers.append(1) or checkpoint(*args, **kwargs))
    runs = {}
    for checkpointing in (False, True):
        config = tiny_lm_config(tiny_causal_lm, tiny_chat_data, tmp_path / str(checkpointing), max_tokens_per_batch=128,
                                gradient_checkpointing=checkpointing)
        runs[checkpointing] = run_training(load_config(write_config(config))).run_dir
        assert bool(checkpointed_layers) == checkpointing  # the layers really went through torch's checkpoint
    assert_same_training(runs[False], runs[True])


@pytest.mark.slow
@pytest.mark.parametrize("method", ["full", "lora"])
def test_compiled_model_trains_like_the_eager_one_and_saves_plain_weights(tiny_causal_lm, tiny_chat_data, tmp_path,
                                                                          write_config, method):
    """training.compile: Inductor really compiles the training graphs (dynamo's counters), the losses match eager
    to float rounding, and final/ holds the eager run's weights under the same names (none of the compiled
    wrapper's `_orig_mod.`), so from_pretrained and peft load it as usual."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    from sft.training.trainer import run_training

    torch._dynamo.reset()
    counters.clear()
    runs = {}
    for compiled in (False, True):
        config = tiny_lm_config(tiny_causal_lm, tiny_chat_data, tmp_path / str(compiled), max_tokens_per_batch=128,
                                compile=compiled)
        # LoRA dropout off: compiled dropout draws its masks from Inductor's own generator, not eager's.
        config["method"] = {"name": method, "lora": {"r": 4, "alpha": 8, "dropout": 0.0}}
        runs[compiled] = run_training(load_config(write_config(config))).run_dir
        assert bool(counters["stats"]["unique_graphs"]) == compiled
    assert json.loads((runs[True] / "manifest.json").read_text())["performance"]["compile"] is True
    assert_same_training(runs[False], runs[True], rel=1e-4, atol=1e-4, rtol=1e-3)


@pytest.mark.slow
def test_minilm_classifier_with_lora_saves_adapter_and_head(tmp_path, write_config):
    from peft import AutoPeftModelForSequenceClassification
    from transformers import AutoModelForSequenceClassification

    from sft.training.trainer import run_training

    config = minilm_config(tmp_path / "runs", max_steps=20, logging_steps=5, eval_strategy="steps", eval_steps=20,
                           learning_rate=5e-3)
    config["method"] = {"name": "lora", "lora": {"r": 8, "alpha": 16}, "merge": True}
    result = run_training(load_config(write_config(config)))

    # It learned: 80 held-out reviews, two balanced classes (chance 0.5).
    assert result.metrics["eval_accuracy"] >= 0.8, result.metrics
    final = result.run_dir / "final"
    # The adapter holds LoRA weights and the fully trained classifier head; labels come from the manifest.
    label_names = json.loads((result.run_dir / "manifest.json").read_text())["data"]["label_names"]
    adapter = AutoPeftModelForSequenceClassification.from_pretrained(
        final, id2label=dict(enumerate(label_names)), label2id={n: i for i, n in enumerate(label_names)})
    merged = AutoModelForSequenceClassification.from_pretrained(final / "merged")
    assert merged.config.id2label == {0: "negative", 1: "positive"}
    head = adapter.base_model.model.classifier.modules_to_save["default"]
    assert (head.weight == merged.classifier.weight).all()


@pytest.mark.slow
def test_finished_run_is_not_overwritten_without_flag(tiny_causal_lm, tiny_chat_data, tmp_path, write_config):
    config_path = write_config(tiny_lm_config(tiny_causal_lm, tiny_chat_data, tmp_path / "runs", max_steps=2))
    assert run_cli("train", str(config_path)).returncode == 0
    final_model = tmp_path / "runs" / "tiny" / "final" / "model.safetensors"
    before = final_model.stat().st_mtime_ns

    refused = run_cli(str(config_path))
    assert refused.returncode == EXIT_USER_ERROR
    assert "finished run" in refused.stderr and "--overwrite" in refused.stderr
    assert "Traceback" not in refused.stderr
    assert final_model.stat().st_mtime_ns == before

    assert run_cli("train", str(config_path), "--overwrite").returncode == 0
    assert final_model.stat().st_mtime_ns != before


def start_training(config_path: Path, tmp_path: Path) -> subprocess.Popen:
    log = (tmp_path / "stdout.log").open("a")
    return subprocess.Popen([sys.executable, str(REPO / "entrypoint.py"), "train", str(config_path)],
                            stdout=log, stderr=subprocess.STDOUT)


def wait_for_file(path: Path, process: subprocess.Popen) -> None:
    wait_until(path.exists, process, f"{path} was written")


def wait_until(condition, process: subprocess.Popen, what: str) -> None:
    deadline = time.time() + 300
    while not condition():
        assert process.poll() is None, f"training ended before {what}"
        assert time.time() < deadline
        time.sleep(0.005)


def write_named_config(folder: Path, config: dict, name: str) -> Path:
    """The config with output.name `name`, written to folder/NAME.yaml."""
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump({**config, "output": {**config["output"], "name": name}}, sort_keys=False))
    return path


def assert_identical_runs(run_dir: Path, reference_dir: Path) -> None:
    """Same per-step losses and bit-identical final weights."""
    from safetensors.torch import load_file

    assert train_losses(run_dir) == train_losses(reference_dir)
    # TensorBoard shows each step once: the interrupted session's steps after the checkpoint are purged.
    assert [(step, pytest.approx(loss, rel=1e-6)) for step, loss in train_losses(run_dir)] == \
        tensorboard_scalars(run_dir)["train/loss"]
    summaries = [line for line in (run_dir / "metrics.jsonl").read_text().splitlines() if "train_runtime" in line]
    assert len(summaries) == 1
    expected, actual = (load_file(next((d / "final").glob("*.safetensors"))) for d in (reference_dir, run_dir))
    assert expected.keys() == actual.keys()
    assert all((expected[name] == actual[name]).all() for name in expected)


@pytest.fixture(scope="module")
def resumable(tiny_causal_lm, tiny_chat_data, tmp_path_factory):
    """Configs of 24 steps with dropout (so RNG state matters) and a checkpoint every 3 steps, sharing one
    folder of runs, plus an uninterrupted reference run of them: (make_config, runs folder)."""
    import shutil

    from transformers import AutoConfig

    folder = tmp_path_factory.mktemp("resumable")
    model = folder / "model"
    shutil.copytree(tiny_causal_lm, model)
    model_config = AutoConfig.from_pretrained(model)
    model_config.attention_dropout = 0.1
    model_config.save_pretrained(model)

    make = functools.partial(write_named_config, folder, tiny_lm_config(
        model, tiny_chat_data, folder / "runs", epochs=4, batch_size=4, save_steps=3, save_total_limit=10))
    reference = run_cli("train", str(make("reference")))
    assert reference.returncode == 0, reference.stderr
    return make, folder / "runs"


@pytest.mark.slow
def test_resume_after_sigkill_matches_uninterrupted_run(resumable, tmp_path):
    make_config, runs = resumable
    interrupted_config = make_config("interrupted")
    run_dir = runs / "interrupted"
    process = start_training(interrupted_config, tmp_path)
    wait_for_file(run_dir / "checkpoints" / "checkpoint-3" / ".complete", process)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (run_dir / "final").exists(), "the run finished before the kill: make it longer"
    # A checkpoint killed mid-write (no .complete marker) must be ignored, never resumed from.
    newest = max(int(p.parent.name.split("-")[1]) for p in (run_dir / "checkpoints").glob("checkpoint-*/.complete"))
    half_written = run_dir / "checkpoints" / f"checkpoint-{newest + 3}"
    half_written.mkdir(exist_ok=True)
    (half_written / "trainer_state.json").write_text("{truncated")

    resumed = run_cli("train", str(interrupted_config))
    assert resumed.returncode == 0, resumed.stderr

    assert_identical_runs(run_dir, runs / "reference")
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["status"] == "finished" and manifest["restarts"][0]["resumed_from_step"] == newest


@pytest.mark.slow
@pytest.mark.parametrize("kill_at,resumed_from", [("load", None), ("step:8", 6), ("save:checkpoint-9", 6),
                                                  ("save:.final.partial", 24)], ids=["load", "step", "checkpoint",
                                                                                     "final"])
def test_sigkill_at_each_point_leaves_a_run_that_resumes_exactly(resumable, request, kill_at, resumed_from):
    """A run killed while loading the model, mid-step, half-way through writing a checkpoint or the final model
    (tests/hooks/sitecustomize.py) resumes to the same losses and weights as the uninterrupted run."""
    make_config, runs = resumable
    name = f"killed-during-{request.node.callspec.id}"  # not containing the hook's TEXT: only the file is matched
    config_path = make_config(name)
    run_dir = runs / name
    killed = run_cli("train", str(config_path), env={**os.environ, "PYTHONPATH": str(REPO / "tests" / "hooks"),
                                                    "SFT_TEST_KILL_AT": kill_at})
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert json.loads((run_dir / "manifest.json").read_text())["status"] == "running"
    assert not (run_dir / "final").exists()
    complete = [p.parent.name for p in (run_dir / "checkpoints").glob("checkpoint-*/.complete")]
    assert max(complete, key=lambda n: int(n.split("-")[1]), default=None) \
        == (f"checkpoint-{resumed_from}" if resumed_from else None)
    half_written = {"save:checkpoint-9": run_dir / "checkpoints" / "checkpoint-9",
                    "save:.final.partial": run_dir / ".final.partial"}.get(kill_at)
    if half_written:  # the kill landed inside that write
        assert (half_written / "model.safetensors").is_file() and not (half_written / ".complete").exists()

    resumed = run_cli("train", str(config_path))
    assert resumed.returncode == 0, resumed.stderr
    assert_identical_runs(run_dir, runs / "reference")
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["status"] == "finished" and manifest["restarts"][0]["resumed_from_step"] == resumed_from


@pytest.mark.slow
def test_compiled_lora_run_killed_mid_step_resumes_exactly(tiny_causal_lm, tiny_chat_data, tmp_path):
    """training.compile with LoRA dropout (its masks come from Inductor's generator): killed at step 8 and resumed
    from checkpoint-6, the same losses and a bit-identical adapter as the uninterrupted compiled run."""
    config = tiny_lm_config(tiny_causal_lm, tiny_chat_data, tmp_path / "runs", max_tokens_per_batch=128,
                            compile=True, epochs=3, save_steps=3, save_total_limit=10)
    config["method"] = {"name": "lora", "lora": {"r": 4, "alpha": 8}}
    make_config = functools.partial(write_named_config, tmp_path, config)
    reference = run_cli("train", str(make_config("reference")))
    assert reference.returncode == 0, reference.stderr
    config_path = make_config("killed")
    killed = run_cli("train", str(config_path), env={**os.environ, "PYTHONPATH": str(REPO / "tests" / "hooks"),
                                                    "SFT_TEST_KILL_AT": "step:8"})
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    resumed = run_cli("train", str(config_path))
    assert resumed.returncode == 0, resumed.stderr
    assert_identical_runs(tmp_path / "runs" / "killed", tmp_path / "runs" / "reference")
    manifest = json.loads((tmp_path / "runs" / "killed" / "manifest.json").read_text())
    assert manifest["performance"]["compile"] and manifest["restarts"][0]["resumed_from_step"] == 6


@pytest.mark.slow
def test_sigusr1_checkpoints_exits_75_and_resumes_exactly(resumable, tmp_path):
    make_config, runs = resumable
    config_path = make_config("preempted")
    run_dir = runs / "preempted"
    process = start_training(config_path, tmp_path)
    # Sent while the model is still loading: the handler is already in place, training stops after step 1.
    wait_for_file(run_dir / "manifest.json", process)
    process.send_signal(signal.SIGUSR1)
    assert process.wait(timeout=120) == EXIT_PREEMPTED
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["status"] == "preempted"
    assert [p.parent.name for p in (run_dir / "checkpoints").glob("checkpoint-*/.complete")] == ["checkpoint-1"]

    changed = run_cli("train", str(config_path), "training.learning_rate=0.5")
    assert changed.returncode == EXIT_USER_ERROR
    assert "was started with a different config (training.learning_rate changed)" in changed.stderr

    resumed = run_cli("train", str(config_path))
    assert resumed.returncode == 0, resumed.stderr
    assert_identical_runs(run_dir, runs / "reference")
    # What a user who cancelled the job reads: the exact command (the name pinned) that resumes this run.
    assert (f"sft: preempted; a requeued job resumes by itself, or resume with: sft train {config_path} "
            f"output.name=preempted\n") in (tmp_path / "stdout.log").read_text()


@pytest.mark.slow
def test_a_resume_may_change_settings_that_do_not_change_what_is_trained(resumable, tmp_path):
    """Waits, caches, tokenizer processes, logging, eval batches, checkpoints kept (sft's own errors ask to raise
    some of them): the resumed run applies them, records them, and trains the same model; a learning-rate setting
    is still refused."""
    make_config, runs = resumable
    config_path = make_config("resettled")
    run_dir = runs / "resettled"
    killed = run_cli("train", str(config_path), env={**os.environ, "PYTHONPATH": str(REPO / "tests" / "hooks"),
                                                    "SFT_TEST_KILL_AT": "step:8"})
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    harmless = {"training.ddp_timeout": 900, "data.wait_minutes": 5, "data.num_proc": 1,
                "data.cache_dir": str(tmp_path / "cache"), "training.logging_steps": 2, "training.eval_batch_size": 2,
                "training.save_total_limit": 9}
    overrides = [f"{key}={value}" for key, value in harmless.items()]

    refused = run_cli("train", str(config_path), *overrides, "training.warmup_ratio=0.1")
    assert refused.returncode == EXIT_USER_ERROR
    assert "was started with a different config (training.warmup_ratio changed)" in refused.stderr

    resumed = run_cli("train", str(config_path), *overrides)
    assert resumed.returncode == 0, resumed.stderr
    from safetensors.torch import load_file

    expected, actual = (load_file(d / "final" / "model.safetensors") for d in (runs / "reference", run_dir))
    assert expected.keys() == actual.keys() and all((expected[name] == actual[name]).all() for name in expected)
    # logging_steps 2 applies after checkpoint-6 (plus the log forced before each checkpoint, every 3 steps).
    assert [step for step, _ in train_losses(run_dir)] == [*range(1, 7), 8, 9, 10, 12, 14, 15, 16, 18, 20, 21, 22, 24]
    manifest = json.loads((run_dir / "manifest.json").read_text())
    changed = manifest["restarts"][0]["changed_settings"]
    assert {key: change["to"] for key, change in changed.items()} == harmless
    assert changed["training.ddp_timeout"]["from"] == 1800
    assert load_config(run_dir / "config.yaml").training.logging_steps == 2
    assert (tmp_path / "cache" / "tokenized").is_dir()


def test_a_resume_may_change_a_sql_sources_timeout_but_not_its_query(tiny_causal_lm, tiny_chat_data, tmp_path,
                                                                     write_config):
    """Settings are named as everywhere else (data.train[1].timeout); only a SQL source's timeout may change."""
    from sft.errors import UserError
    from sft.training.resume import write_run_config

    def config(**sql):
        raw = tiny_lm_config(tiny_causal_lm, tiny_chat_data, tmp_path / "runs")
        raw["data"]["train"] = [str(tiny_chat_data), {"database": "sqlite:///rows.db", "query": "SELECT 1", **sql}]
        return load_config(write_config(raw))

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    write_run_config(run_dir, config(timeout=60), must_match=False)
    with pytest.raises(UserError, match=r"different config \(data\.train\[1\]\.query changed\)"):
        write_run_config(run_dir, config(timeout=60, query="SELECT 2"), must_match=True)
    changes = write_run_config(run_dir, config(timeout=120), must_match=True)
    assert changes == {"data.train[1].timeout": {"from": 60, "to": 120}}
    assert load_config(run_dir / "config.yaml").data.train[1].timeout == 120


@pytest.mark.slow
def test_a_resume_on_changed_data_is_refused_unless_allowed_and_the_manifest_keeps_both(tiny_causal_lm, tiny_chat_data,
                                                                                       tmp_path, write_config):
    import shutil

    data = shutil.copy(tiny_chat_data, tmp_path / "chat.jsonl")
    config_path = write_config(tiny_lm_config(tiny_causal_lm, data, tmp_path / "runs", max_steps=8, save_steps=3))
    killed = run_cli("train", str(config_path), env={**os.environ, "PYTHONPATH": str(REPO / "tests" / "hooks"),
                                                    "SFT_TEST_KILL_AT": "step:5"})
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    run_dir = tmp_path / "runs" / "tiny"
    started_on = json.loads((run_dir / "manifest.json").read_text())["data"]
    with open(data, "a") as f:  # the file is edited while the job waits in the queue
        f.write(Path(data).read_text().splitlines()[0] + "\n")

    refused = run_cli("train", str(config_path))
    assert refused.returncode == EXIT_USER_ERROR, refused.stderr[-3000:]
    message = refused.stderr.strip().splitlines()[-1]
    assert message.startswith(f"sft: error: data: the data changed since {run_dir} started ({data} (sha256 ")
    assert "--allow-data-change" in message and "Traceback" not in refused.stderr
    assert json.loads((run_dir / "manifest.json").read_text())["data"] == started_on

    allowed = run_cli("train", str(config_path), "--allow-data-change")
    assert allowed.returncode == 0, allowed.stderr[-3000:]
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["status"] == "finished" and manifest["data"] == started_on
    now = manifest["restarts"][-1]
    assert now["resumed_from_step"] == 3 and now["data_change_allowed"]
    assert now["data"]["files"][0]["sha256"] != started_on["files"][0]["sha256"]
    assert now["data"]["train_examples"] == started_on["train_examples"] + 1


@pytest.mark.slow
def test_stop_at_checkpoints_before_the_end_exits_75_and_resumes_exactly(resumable, tmp_path):
    """No signal, no Slurm: training.stop_at 20 s after the start is already within the guard's margin when the
    first step ends, so it saves a checkpoint there and stops for a requeue, as SIGUSR1 would."""
    make_config, runs = resumable
    config_path = make_config("stop-at")
    run_dir = runs / "stop-at"
    env = {name: value for name, value in os.environ.items() if not name.startswith("SLURM_")}
    stopped = run_cli("train", str(config_path), "training.stop_at=20s", env=env)
    assert stopped.returncode == EXIT_PREEMPTED, stopped.stderr[-3000:]
    assert "stopped by the wall-time guard at step 1" in stopped.stderr
    assert "cannot fit a checkpoint save and stop (by estimate" in " ".join(stopped.stderr.split())  # said at start
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["status"] == "preempted"
    assert [p.parent.name for p in (run_dir / "checkpoints").glob("checkpoint-*/.complete")] == ["checkpoint-1"]
    [session] = manifest["sessions"]
    assert session["ended_by"] == "wall-time guard" and len(session["checkpoint_saves_s"]) == 1  # the stop's save

    # The next session has its own end: stop_at may change between sessions without refusing the resume.
    resumed = run_cli("train", str(config_path), "training.stop_at=1h", env=env)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_identical_runs(run_dir, runs / "reference")
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert [s["ended_by"] for s in manifest["sessions"]] == ["wall-time guard", "finished"]
    # Measured, not guessed: a tiny model's saves take milliseconds, so 0.0 s (rounded) is a real measurement here.
    assert len(manifest["sessions"][1]["checkpoint_saves_s"]) == 8 and manifest["sessions"][1]["final_save_s"] >= 0


def signal_in_step(step: int):
    """Trainer.training_step that sends this process SIGUSR1 while it computes optimizer step STEP, as Slurm's
    warning would: deterministic where a signal from outside lands at whatever step is running."""
    from transformers import Trainer

    training_step = Trainer.training_step

    def signalled(self, *args, **kwargs):
        loss = training_step(self, *args, **kwargs)
        if self.state.global_step + 1 == step:
            os.kill(os.getpid(), signal.SIGUSR1)
        return loss

    return signalled


def evaluations(run_dir: Path) -> list[tuple[int, float]]:
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(line["step"], line["eval_loss"]) for line in lines if "eval_loss" in line]


@pytest.fixture(scope="module")
def evaluated_each_epoch(tiny_causal_lm, tmp_path_factory):
    """A config of 3 epochs of 4 steps, evaluated at each epoch's end and checkpointed every 3 steps (so epoch
    ends and checkpoints do not line up), and its uninterrupted run: (make_config, runs folder)."""
    from conftest import CHAT_ROWS, write_jsonl

    from sft.training.trainer import run_training

    folder = tmp_path_factory.mktemp("evaluated")
    train, evaluation = (write_jsonl(folder / f"{name}.jsonl", rows)
                         for name, rows in (("train", CHAT_ROWS[:16]), ("eval", CHAT_ROWS[16:])))
    config = tiny_lm_config(tiny_causal_lm, train, folder / "runs", epochs=3, eval_strategy="epoch",
                            save_steps=3, save_total_limit=10)
    config["data"]["eval"] = str(evaluation)
    make = functools.partial(write_named_config, folder, config)
    run_training(load_config(make("reference")))
    return make, folder / "runs"


@pytest.mark.slow
@pytest.mark.parametrize("step", [2, 4, 12], ids=["mid-epoch", "last-step-of-an-epoch", "last-step-of-the-run"])
def test_a_signal_at_any_step_keeps_every_evaluation(evaluated_each_epoch, monkeypatch, step):
    """SIGUSR1 in step 2 (mid-epoch), in step 4 (the last of epoch 1: its evaluation is still due, and the resumed
    run starts at epoch 2) or in step 12 (the run's last): stopped and resumed, the run evaluates at the same steps
    with the same results as the uninterrupted one, and finishes with its metrics."""
    from transformers import Trainer

    from sft.training.trainer import Preempted, run_training

    make_config, runs = evaluated_each_epoch
    config_path, run_dir = make_config(f"signal-in-step-{step}"), runs / f"signal-in-step-{step}"
    monkeypatch.setattr(Trainer, "training_step", signal_in_step(step))
    if step < 12:
        with pytest.raises(Preempted):
            run_training(load_config(config_path))
        assert json.loads((run_dir / "manifest.json").read_text())["status"] == "preempted"
        complete = run_checkpoints.complete_checkpoints(run_dir / "checkpoints")
        assert [p.name for p in complete][-1] == f"checkpoint-{step}"
        monkeypatch.undo()
        run_training(load_config(config_path))  # the requeued job
    else:
        run_training(load_config(config_path))  # nothing left to resume: it finishes

    reference = runs / "reference"
    assert [step for step, _ in evaluations(reference)] == [4, 8, 12]
    assert evaluations(run_dir) == evaluations(reference)
    assert_identical_runs(run_dir, reference)
    results = [json.loads((d / "manifest.json").read_text())["results"] for d in (run_dir, reference)]
    assert results[0]["eval_loss"] == results[1]["eval_loss"] and results[0]["steps"] == 12


@pytest.mark.slow
def test_a_signal_in_the_step_whose_evaluation_stops_early_finishes_the_run(tiny_causal_lm, tmp_path, write_config,
                                                                           monkeypatch):
    """Patience 2 and a threshold no evaluation beats stop the run after its third evaluation, at step 12 of 24
    (as in test_a_run_killed_while_early_stopping_counts_resumes_to_the_same_stop). SIGUSR1 in step 12: that
    evaluation still runs, stops the run, and the run finishes there instead of waiting for a requeue that would
    train one more epoch before its next evaluation."""
    from conftest import CHAT_ROWS, write_jsonl
    from transformers import Trainer

    from sft.training.trainer import run_training

    train, evaluation = (write_jsonl(tmp_path / f"{name}.jsonl", rows)
                         for name, rows in (("train", CHAT_ROWS[:16]), ("eval", CHAT_ROWS[16:])))
    config = tiny_lm_config(tiny_causal_lm, train, tmp_path / "runs", epochs=6, eval_strategy="epoch",
                            save_strategy="epoch", save_total_limit=5, learning_rate=3e-3,
                            early_stopping={"patience": 2, "threshold": 100.0, "metric": "eval_token_accuracy"})
    config["data"]["eval"] = str(evaluation)
    monkeypatch.setattr(Trainer, "training_step", signal_in_step(12))
    result = run_training(load_config(write_config(config)))

    manifest = json.loads((result.run_dir / "manifest.json").read_text())
    assert manifest["status"] == "finished" and manifest["results"]["steps"] == 12
    assert [step for step, _ in evaluations(result.run_dir)] == [4, 8, 12]


@pytest.mark.slow
def test_a_preemption_checkpoint_without_save_strategy_is_removed_once_the_run_finishes(tiny_causal_lm,
                                                                                        tiny_chat_data, tmp_path,
                                                                                        write_config, monkeypatch):
    """training.save_strategy no: SIGUSR1 still writes a checkpoint (the requeued job resumes from it), and the
    finished run does not keep it."""
    from transformers import Trainer

    from sft.training.trainer import Preempted, run_training

    config_path = write_config(tiny_lm_config(tiny_causal_lm, tiny_chat_data, tmp_path / "runs", max_steps=4,
                                              save_strategy="no"))
    checkpoints = tmp_path / "runs" / "tiny" / "checkpoints"
    monkeypatch.setattr(Trainer, "training_step", signal_in_step(2))
    with pytest.raises(Preempted):
        run_training(load_config(config_path))
    assert [p.name for p in run_checkpoints.complete_checkpoints(checkpoints)] == ["checkpoint-2"]

    monkeypatch.undo()
    result = run_training(load_config(config_path))
    manifest = json.loads((result.run_dir / "manifest.json").read_text())
    assert manifest["status"] == "finished" and manifest["restarts"][0]["resumed_from_step"] == 2
    assert (result.run_dir / "final" / ".complete").is_file()
    assert list(checkpoints.iterdir()) == []


def test_a_run_that_failed_before_any_checkpoint_restarts_with_a_corrected_config(tiny_causal_lm, tiny_chat_data,
                                                                                  tmp_path, write_config):
    config = tiny_lm_config(tmp_path / "no-such-model", tiny_chat_data, tmp_path / "runs", max_steps=2)
    failed = run_cli("train", str(write_config(config)))
    assert failed.returncode == EXIT_USER_ERROR and "model.name" in failed.stderr
    manifest = json.loads((tmp_path / "runs" / "tiny" / "manifest.json").read_text())
    assert manifest["status"] == "failed" and manifest["stopped"]
    assert manifest["error"] == "UserError: " + failed.stderr.splitlines()[-1].removeprefix("sft: error: ")

    config["model"]["name"] = str(tiny_causal_lm)
    fixed = run_cli("train", str(write_config(config)))
    assert fixed.returncode == 0, fixed.stderr
    manifest = json.loads((tmp_path / "runs" / "tiny" / "manifest.json").read_text())
    assert manifest["status"] == "finished" and "error" not in manifest
    assert manifest["restarts"][0]["previous"]["status"] == "failed"


def test_a_run_that_raised_gives_its_directory_back(tiny_causal_lm, tiny_chat_data, tmp_path, write_config):
    """The lock is released on the way out of an exception, not when the process ends (a notebook lives on)."""
    from sft.errors import UserError
    from sft.training.trainer import run_training

    config = tiny_lm_config(tmp_path / "no-such-model", tiny_chat_data, tmp_path / "runs", max_steps=2)
    with pytest.raises(UserError) as failed:  # keeps the failed run's frames, and whatever they hold, alive
        run_training(load_config(write_config(config)))
    config["model"]["name"] = str(tiny_causal_lm)
    assert run_training(load_config(write_config(config))).run_dir == tmp_path / "runs" / "tiny"
    assert failed.traceback


def test_ctrl_c_says_whether_a_complete_checkpoint_exists_to_resume_from(tiny_causal_lm, tiny_chat_data, tmp_path,
                                                                        write_config, monkeypatch):
    from sft.run import checkpoints as run_checkpoints
    from sft.training.trainer import Interrupted, run_training

    def ctrl_c(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr("sft.training.trainer._train", ctrl_c)
    config = load_config(write_config(tiny_lm_config(tiny_causal_lm, tiny_chat_data, tmp_path / "runs")))
    with pytest.raises(Interrupted) as stopped:
        run_training(config)
    assert not stopped.value.has_checkpoint and "output.name=tiny" in stopped.value.resume_command
    checkpoint = tmp_path / "runs" / "tiny" / "checkpoints" / "checkpoint-2"
    checkpoint.mkdir(parents=True)
    run_checkpoints.mark_complete(checkpoint)
    with pytest.raises(Interrupted) as stopped:
        run_training(config)
    assert stopped.value.has_checkpoint


def snapshot(folder: Path) -> dict:
    return {p.relative_to(folder): (p.read_bytes(), p.stat().st_mtime_ns) for p in folder.rglob("*") if p.is_file()}


@pytest.mark.slow
def test_a_second_job_is_refused_while_the_first_runs_and_its_requeue_resumes(tiny_causal_lm, tiny_chat_data,
                                                                              tmp_path, write_config):
    config_path = write_config(tiny_lm_config(tiny_causal_lm, tiny_chat_data, tmp_path / "runs", max_steps=30))
    run_dir = tmp_path / "runs" / "tiny"
    with (tmp_path / "first.log").open("w") as log:
        first = subprocess.Popen([sys.executable, str(REPO / "entrypoint.py"), "train", str(config_path)],
                                 stdout=log, stderr=subprocess.STDOUT, env=in_job("1001"))
    try:
        wait_until(lambda: _status(run_dir) == "running", first, "the run started")
        first.send_signal(signal.SIGSTOP)  # alive, and writing nothing while the second job tries
        before = snapshot(run_dir)
        second = run_cli("train", str(config_path), env=in_job("1002"))
        assert second.returncode == EXIT_USER_ERROR and second.stderr.count("\n") == 1, second.stderr
        assert f"pid {first.pid}, Slurm job 1001" in second.stderr and "scancel 1001" in second.stderr
        assert snapshot(run_dir) == before, "the refused job wrote into the live run's directory"
    finally:
        first.kill()
        first.wait()

    requeued = run_cli("train", str(config_path), env=in_job("1001"))
    assert requeued.returncode == 0, requeued.stderr
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["status"] == "finished" and manifest["slurm_job"] == "1001"
    assert [restart["slurm_job"] for restart in manifest["restarts"]] == ["1001"]


def in_job(job: str) -> dict:
    return {**os.environ, "SLURM_JOB_ID": job}


def _status(run_dir: Path) -> str | None:
    try:
        return json.loads((run_dir / "manifest.json").read_text())["status"]
    except (OSError, ValueError, KeyError):
        return None


@pytest.mark.slow
def test_ctrl_c_prints_the_command_that_resumes_the_same_run(tiny_causal_lm, tiny_chat_data, tmp_path,
                                                             write_config):
    sft_on_path = Path(sys.executable).parent / "sft"
    assert sft_on_path.is_file(), "the venv's `sft` script (make venv installs it)"
    # Long enough (about 10 s) that the run is still going when Ctrl-C lands, even on a loaded machine.
    config = tiny_lm_config(tiny_causal_lm, "${CHAT_DATA}", tmp_path / "runs", max_steps=300, save_strategy="steps",
                            save_steps=3, save_total_limit=2)
    config["output"]["name"] = "{config}-{time}"
    config_path = write_config(config, "chat run.yaml")  # a space, for the quoting
    (tmp_path / "chat.env").write_text(f"CHAT_DATA={tiny_chat_data}\n")
    # A shell without job control starts background commands with SIGINT ignored (CI may run us so), and Python
    # then never raises KeyboardInterrupt: give the run the default disposition a terminal's Ctrl-C meets.
    process = subprocess.Popen([sys.executable, str(REPO / "entrypoint.py"), "train", str(config_path),
                                "--env-file", "chat.env", "training.learning_rate=0.002"],
                               cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    runs = tmp_path / "runs"
    wait_until(lambda: any(runs.glob("*/checkpoints/checkpoint-3/.complete")), process, "checkpoint 3")
    process.send_signal(signal.SIGINT)
    stderr = process.communicate(timeout=120)[1]
    assert process.returncode == 130, stderr
    [run_dir] = runs.iterdir()
    assert json.loads((run_dir / "manifest.json").read_text())["status"] == "interrupted"
    command = stderr.split("sft: interrupted; resume from the newest complete checkpoint with: ")[1].strip()

    time.sleep(1.1)  # {time} now names another directory: only the command's output.name finds this one again
    resumed = subprocess.run(command, shell=True, cwd=tmp_path, capture_output=True, text=True, timeout=600,
                             env={**os.environ, "PATH": f"{sft_on_path.parent}:{os.environ['PATH']}"})
    assert resumed.returncode == 0, (command, resumed.stderr)
    assert list(runs.iterdir()) == [run_dir]
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["status"] == "finished" and manifest["restarts"][0]["previous"]["status"] == "interrupted"
    assert manifest["restarts"][0]["resumed_from_step"] >= 3


def test_python_api_takes_dotted_or_nested_overrides(tiny_causal_lm, tiny_chat_data, tmp_path, write_config):
    import sft

    config_path = write_config(tiny_lm_config(tiny_causal_lm, tiny_chat_data, tmp_path / "runs"))
    result = sft.train(str(config_path), **{"training.max_steps": 2}, output={"name": "from-notebook"})
    assert result.run_dir == tmp_path / "runs" / "from-notebook" and result.metrics["steps"] == 2


@pytest.mark.slow
@pytest.mark.parametrize("dtype,method", [("bfloat16", "full"),
                                          pytest.param("bfloat16", "lora", marks=pytest.mark.gpu),
                                          pytest.param("float16", "full", marks=pytest.mark.gpu)])
def test_mixed_precision_autocasts_over_fp32_weights(tiny_causal_lm, tiny_chat_data, tmp_path, write_config,
                                                     monkeypatch, dtype, method):
    """bf16 runs on CPU here (and on the GPU where there is one); fp16 needs the loss scaler, which refuses fp16
    gradients: trained weights must be fp32 for it to work."""
    import torch

    from sft.model import loading
    from sft.training.trainer import run_training

    seen = {}
    load_model = loading.load_model

    def load_and_watch(*args, **kwargs):
        model = load_model(*args, **kwargs)
        projection = next(module for name, module in model.named_modules() if name.endswith("0.self_attn.q_proj"))
        projection.register_forward_hook(lambda module, inputs, output: seen.update(dtype=output.dtype,
                                                                                     device=output.device.type))
        return model

    monkeypatch.setattr(loading, "load_model", load_and_watch)
    config = tiny_lm_config(tiny_causal_lm, tiny_chat_data, tmp_path / "runs", max_steps=2)
    config["model"]["dtype"] = dtype
    config["method"] = {"name": method}
    result = run_training(load_config(write_config(config)))
    assert seen == {"dtype": getattr(torch, dtype), "device": "cuda" if torch.cuda.is_available() else "cpu"}
    assert {tensor.dtype for tensor in final_weights(result.run_dir).values()} == {torch.float32}
    assert all(math.isfinite(loss) for _, loss in train_losses(result.run_dir))


@pytest.mark.slow
def test_old_checkpoint_survives_until_its_successor_is_complete(tiny_causal_lm, tiny_chat_data, tmp_path,
                                                                 write_config, monkeypatch):
    """save_total_limit 1 with a kill just before checkpoint-2 is marked complete: checkpoint-1 must still be there
    to resume from (Trainer's own rotation deletes it before the marker is written)."""
    from sft.run import checkpoints as run_checkpoints
    from sft.training.trainer import run_training

    class Killed(Exception):
        pass

    mark_complete = run_checkpoints.mark_complete

    def killed_at_step_2(checkpoint: Path) -> None:
        if checkpoint.name == "checkpoint-2":
            raise Killed
        mark_complete(checkpoint)

    config_path = write_config(tiny_lm_config(tiny_causal_lm, tiny_chat_data, tmp_path / "runs", max_steps=4,
                                              save_steps=1, save_total_limit=1))
    checkpoints = tmp_path / "runs" / "tiny" / "checkpoints"
    monkeypatch.setattr(run_checkpoints, "mark_complete", killed_at_step_2)
    with pytest.raises(Killed):
        run_training(load_config(config_path))
    assert [p.name for p in run_checkpoints.complete_checkpoints(checkpoints)] == ["checkpoint-1"]

    monkeypatch.setattr(run_checkpoints, "mark_complete", mark_complete)
    result = run_training(load_config(config_path))
    assert result.metrics["steps"] == 4
    assert [p.name for p in checkpoints.iterdir()] == ["checkpoint-4"]


@pytest.mark.slow
def test_preempted_classifier_resumes_exactly(tmp_path, write_config):
    """The demo's classifier (dropout on, so the RNG state matters) preempted with SIGUSR1 mid-epoch, then resumed,
    equals an uninterrupted run."""
    config = minilm_config(tmp_path / "runs", max_steps=6, batch_size=4, logging_steps=1, eval_strategy="no",
                           save_steps=2, save_total_limit=10)
    reference = run_cli("train", str(write_config(config, "reference.yaml")))
    assert reference.returncode == 0, reference.stderr

    config["output"]["name"] = "preempted"
    config_path = write_config(config, "preempted.yaml")
    run_dir = tmp_path / "runs" / "preempted"
    process = start_training(config_path, tmp_path)
    wait_for_file(run_dir / "checkpoints" / "checkpoint-2" / ".complete", process)
    process.send_signal(signal.SIGUSR1)
    assert process.wait(timeout=120) == EXIT_PREEMPTED
    assert not (run_dir / "final").exists()
    resumed = run_cli("train", str(config_path))
    assert resumed.returncode == 0, resumed.stderr
    assert 2 <= json.loads((run_dir / "manifest.json").read_text())["restarts"][0]["resumed_from_step"] < 6
    assert_identical_runs(run_dir, tmp_path / "runs" / "minilm")


def test_fsdp_settings_that_cannot_work_are_refused(tiny_causal_lm, tiny_chat_data, tmp_path, write_config):
    from sft.errors import UserError
    from sft.training.trainer import _check_fsdp_settings

    config = tiny_lm_config(tiny_causal_lm, tiny_chat_data, tmp_path / "runs", fsdp="full_shard auto_wrap")
    _check_fsdp_settings(load_config(write_config(config)), num_processes=2)
    with pytest.raises(UserError, match="training.fsdp: FSDP shards the model across processes"):
        _check_fsdp_settings(load_config(write_config(config)), num_processes=1)
    config["method"] = {"name": "lora", "merge": True}
    with pytest.raises(UserError, match="method.merge: under training.fsdp no process holds the whole"):
        _check_fsdp_settings(load_config(write_config(config)), num_processes=2)


def test_early_stopping_stops_and_the_best_checkpoint_becomes_the_final_model(tiny_causal_lm, tmp_path,
                                                                               write_config):
    """A threshold no evaluation can beat stops training after patience + 1 evaluations; the final model is the
    best checkpoint (the first: answer-token accuracy does not improve on it here), which the rotation kept despite
    save_total_limit 1, and the final metrics are its own."""
    from conftest import CHAT_ROWS, write_jsonl
    from safetensors.torch import load_file

    from sft.training.trainer import run_training

    train, evaluation = (write_jsonl(tmp_path / f"{name}.jsonl", rows)
                         for name, rows in (("train", CHAT_ROWS[:16]), ("eval", CHAT_ROWS[16:])))
    config = tiny_lm_config(tiny_causal_lm, train, tmp_path / "runs", epochs=6, eval_strategy="epoch",
                            save_strategy="epoch", save_total_limit=1, learning_rate=3e-3,
                            early_stopping={"patience": 1, "threshold": 100.0, "metric": "eval_token_accuracy"},
                            load_best_model_at_end=True)
    config["data"]["eval"] = str(evaluation)
    result = run_training(load_config(write_config(config)))

    assert result.metrics["steps"] == 8  # 2 of 6 epochs, 4 steps each
    logged = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    evaluations = [r for r in logged if "eval_loss" in r]
    first, second = evaluations[:2]
    assert second["eval_token_accuracy"] <= first["eval_token_accuracy"]
    assert result.metrics["best_checkpoint"] == "checkpoint-4"
    checkpoints = result.run_dir / "checkpoints"
    final, best, last = (load_file(folder / "model.safetensors") for folder in
                         (result.run_dir / "final", checkpoints / "checkpoint-4", checkpoints / "checkpoint-8"))
    assert final.keys() == best.keys() and all((final[k] == best[k]).all() for k in final)
    assert not all((final[k] == last[k]).all() for k in final)
    # The last evaluation is of the final model: it repeats the best checkpoint's numbers.
    assert len(evaluations) == 3 and evaluations[-1]["eval_loss"] == pytest.approx(first["eval_loss"], rel=1e-6)
    assert result.metrics["eval_loss"] == evaluations[-1]["eval_loss"]


def test_rotation_keeps_the_best_checkpoint_of_an_overfitting_run(tiny_causal_lm, tmp_path, write_config):
    """Evaluating and saving each epoch, with neither early stopping nor load_best_model_at_end: the epoch with the
    lowest eval loss keeps its checkpoint through save_total_limit 1, though later epochs overfit."""
    from conftest import CHAT_ROWS, write_jsonl

    from sft.training.trainer import run_training

    # The eval set asks the training questions with another answer: eval loss falls while the model learns the
    # answer's wording, then rises as it memorises the training answers.
    other_answers = [{"messages": [row["messages"][0], {"role": "assistant", "content": "the answer is 9"}]}
                     for row in CHAT_ROWS[:4]]
    train, evaluation = (write_jsonl(tmp_path / f"{name}.jsonl", rows)
                         for name, rows in (("train", CHAT_ROWS[:4]), ("eval", other_answers)))
    config = tiny_lm_config(tiny_causal_lm, train, tmp_path / "runs", epochs=30, eval_steps=5, save_steps=5,
                            save_total_limit=1, learning_rate=3e-2)
    config["data"]["eval"] = str(evaluation)
    result = run_training(load_config(write_config(config)))

    logged = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    eval_losses = {r["step"]: r["eval_loss"] for r in logged if "eval_loss" in r}
    best_step = min(eval_losses, key=eval_losses.get)
    assert best_step < max(eval_losses), f"eval loss never rose: {eval_losses}"  # it overfit
    kept = sorted(p.name for p in (result.run_dir / "checkpoints").glob("checkpoint-*"))
    assert kept == sorted([f"checkpoint-{best_step}", f"checkpoint-{max(eval_losses)}"])
    assert result.metrics["best_checkpoint"] == f"checkpoint-{best_step}"


@pytest.mark.slow
def test_a_run_killed_while_early_stopping_counts_resumes_to_the_same_stop(tiny_causal_lm, tmp_path):
    """The patience count survives a kill: resumed from the checkpoint after the first evaluation without
    improvement, the run stops at the same step with the same final model as the uninterrupted run."""
    from conftest import CHAT_ROWS, write_jsonl
    from safetensors.torch import load_file

    train, evaluation = (write_jsonl(tmp_path / f"{name}.jsonl", rows)
                         for name, rows in (("train", CHAT_ROWS[:16]), ("eval", CHAT_ROWS[16:])))

    def config_path(name: str) -> Path:
        # No evaluation beats the first by 100: patience 2 stops after the third, at step 12 of 24.
        config = tiny_lm_config(tiny_causal_lm, train, tmp_path / "runs", epochs=6, eval_strategy="epoch",
                                save_strategy="epoch", save_total_limit=5, learning_rate=3e-3,
                                early_stopping={"patience": 2, "threshold": 100.0, "metric": "eval_token_accuracy"})
        config["data"]["eval"] = str(evaluation)
        config["output"]["name"] = name
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(config))
        return path

    reference = run_cli("train", str(config_path("reference")))
    assert reference.returncode == 0, reference.stderr[-3000:]
    killed_config = config_path("killed")
    # Killed in step 10: after checkpoint-8, whose evaluation was the first without improvement.
    killed = run_cli("train", str(killed_config), env={**os.environ, "PYTHONPATH": str(REPO / "tests" / "hooks"),
                                                      "SFT_TEST_KILL_AT": "step:10"})
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    resumed = run_cli("train", str(killed_config))
    assert resumed.returncode == 0, resumed.stderr[-3000:]

    runs = tmp_path / "runs"
    manifests = [json.loads((runs / name / "manifest.json").read_text()) for name in ("reference", "killed")]
    assert manifests[0]["results"]["steps"] == 12
    assert manifests[1]["results"]["steps"] == 12 and manifests[1]["restarts"][0]["resumed_from_step"] == 8
    expected, actual = (load_file(runs / name / "final" / "model.safetensors") for name in ("reference", "killed"))
    assert all((expected[k] == actual[k]).all() for k in expected)


@pytest.mark.parametrize("training,message", [
    ({"early_stopping": {"metric": "eval_macro_f1"}},
     "training.early_stopping.metric: eval_macro_f1 is not an eval metric of causal_lm; use one of eval_loss, "
     "eval_token_accuracy"),
    ({"early_stopping": {"patience": 2}, "eval_strategy": "no"}, "training.early_stopping: needs evaluations"),
    ({"load_best_model_at_end": True, "eval_strategy": "epoch", "save_strategy": "no"},
     "training.load_best_model_at_end: save_strategy (no) must equal eval_strategy (epoch)"),
    ({"load_best_model_at_end": True, "eval_steps": 4, "save_steps": 6},
     "training.load_best_model_at_end: save_steps (6) must be a multiple of eval_steps (4)"),
])
def test_best_model_settings_that_cannot_work_are_refused(tiny_causal_lm, tiny_chat_data, tmp_path, write_config,
                                                          training, message):
    from sft.errors import UserError

    config = tiny_lm_config(tiny_causal_lm, tiny_chat_data, tmp_path / "runs",
                            **{"eval_strategy": "epoch", **training})
    config["data"]["eval_fraction"] = 0.25
    with pytest.raises(UserError) as refused:
        load_config(write_config(config))
    assert message in str(refused.value)
