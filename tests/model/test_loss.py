"""Chunked cross-entropy: the loss and every gradient equal the model's own loss (logits, then ForCausalLMLoss) on a
packed batch, for each architecture it is enabled for, with LoRA, under bf16 and fp16 autocast, never holding the
logits; and it stays off where it would not be exact."""
import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, DataCollatorWithFlattening

from sft.model import loss as losses

EXAMPLES = [{"input_ids": [1, 20, 30, 40, 50, 60], "labels": [-100, -100, 30, 40, 50, 60]},
            {"input_ids": [1, 70, 80, 90], "labels": [-100, 70, 80, 90]},
            {"input_ids": [1, 25, 35, 45, 55, 65, 75, 85], "labels": [-100, -100, -100, 45, 55, 65, 75, 85]}]


def tiny_model(model_type: str, vocab_size: int = 300, tie_word_embeddings: bool = False):
    torch.manual_seed(0)
    config = AutoConfig.for_model(model_type, vocab_size=vocab_size, hidden_size=32, intermediate_size=64,
                                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                  max_position_embeddings=64, tie_word_embeddings=tie_word_embeddings, pad_token_id=0)
    return AutoModelForCausalLM.from_config(config, attn_implementation="eager").train()


def loss_and_gradients(model, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    output = model(**batch)
    output.loss.backward()
    return output, {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def packed_batch(num_items_in_batch: int | None = None) -> dict:
    batch = DataCollatorWithFlattening(return_position_ids=True)(EXAMPLES)
    return batch if num_items_in_batch is None else {**batch, "num_items_in_batch": torch.tensor(num_items_in_batch)}


@pytest.mark.parametrize("model_type", losses.PLAIN_LM_HEAD)
@pytest.mark.parametrize("num_items_in_batch", [None, 40])  # 40: the step's count when accumulating several batches
# Tied: the output head is the input embedding (Qwen2.5 up to 3B, Llama 3.2, SmolLM), so its gradient is the sum of
# the chunked loss's and the embedding lookup's.
@pytest.mark.parametrize("tied", [False, True])
def test_chunked_loss_and_gradients_equal_the_models_own(model_type, num_items_in_batch, tied, monkeypatch):
    monkeypatch.setattr(losses, "CHUNK_BYTES", 4 * 300 * 5)  # 5 tokens a chunk: 3 chunks and a part
    reference = tiny_model(model_type, tie_word_embeddings=tied)
    chunked = tiny_model(model_type, tie_word_embeddings=tied)
    assert (chunked.lm_head.weight is chunked.get_input_embeddings().weight) == tied
    losses.use_chunked_loss(chunked)
    expected, expected_gradients = loss_and_gradients(reference, packed_batch(num_items_in_batch))
    output, gradients = loss_and_gradients(chunked, packed_batch(num_items_in_batch))
    assert output.logits.shape[1] == 0  # the chunked path ran: no logits were computed in the forward
    torch.testing.assert_close(output.loss, expected.loss, atol=1e-6, rtol=1e-5)
    assert gradients.keys() == expected_gradients.keys()
    for name, gradient in gradients.items():
        torch.testing.assert_close(gradient, expected_gradients[name], atol=1e-6, rtol=1e-4, msg=name)


def test_evaluation_keeps_the_models_own_forward_and_logits():
    model = tiny_model("llama")
    reference = tiny_model("llama").eval()
    losses.use_chunked_loss(model)
    model.eval()
    with torch.no_grad():
        output, expected = model(**packed_batch()), reference(**packed_batch())
    assert output.logits.shape == expected.logits.shape
    torch.testing.assert_close(output.loss, expected.loss)


def test_a_training_forward_that_raised_leaves_no_labels_for_the_next_forward():
    """Out of memory mid-forward, caught in a notebook: the next (evaluation) forward must not pick up the failed
    batch's labels and return a chunked loss for them."""
    model = tiny_model("llama")
    losses.use_chunked_loss(model)

    def out_of_memory(*_):
        raise RuntimeError("out of memory")

    hook = model.model.layers[0].register_forward_pre_hook(out_of_memory)
    with pytest.raises(RuntimeError, match="out of memory"):
        model(**packed_batch())
    hook.remove()
    model.eval()
    with torch.no_grad():
        output = model(input_ids=packed_batch()["input_ids"])
    assert output.loss is None and output.logits.shape[1] == packed_batch()["input_ids"].shape[1]


def test_lora_adapters_get_the_same_gradients_with_a_frozen_lm_head():
    from peft import LoraConfig, get_peft_model

    def lora(model):
        return get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                                init_lora_weights=False))

    torch.manual_seed(1)
    reference = lora(tiny_model("llama"))
    torch.manual_seed(1)
    chunked = lora(tiny_model("llama"))
    losses.use_chunked_loss(chunked)
    expected, expected_gradients = loss_and_gradients(reference, packed_batch())
    output, gradients = loss_and_gradients(chunked, packed_batch())
    assert output.logits.shape[1] == 0
    assert gradients and all("lora_" in name for name in gradients)
    torch.testing.assert_close(output.loss, expected.loss)
    for name, gradient in gradients.items():
        torch.testing.assert_close(gradient, expected_gradients[name], atol=1e-6, rtol=1e-4, msg=name)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_bf16_autocast_matches_the_models_own_loss_to_bf16_precision(device):
    reference = tiny_model("qwen2", vocab_size=5000).to(device)
    chunked = tiny_model("qwen2", vocab_size=5000).to(device)
    losses.use_chunked_loss(chunked)
    batch = {name: value.to(device) for name, value in packed_batch().items()}
    with torch.autocast(device, dtype=torch.bfloat16):
        expected, expected_gradients = loss_and_gradients(reference, batch)
        output, gradients = loss_and_gradients(chunked, batch)
    torch.testing.assert_close(output.loss, expected.loss, atol=1e-2, rtol=1e-2)
    for name, gradient in gradients.items():
        assert gradient.dtype == torch.float32, name  # fp32 trained weights keep fp32 gradients
        torch.testing.assert_close(gradient, expected_gradients[name], atol=2e-3, rtol=5e-2, msg=name)


def test_models_with_scaled_or_capped_logits_keep_their_own_loss():
    from sft.config import Config

    config = Config.model_validate({"task": "causal_lm", "model": {"name": "m"}, "data": {"train": "t"}})
    gemma2 = AutoConfig.for_model("gemma2")
    assert gemma2.final_logit_softcapping  # logits = cap * tanh(logits / cap): not a plain lm_head
    assert "gemma2 models are not among those checked" in losses.off_reason(config, "gemma2")
    assert losses.off_reason(config, "qwen2") is None
    config.training.chunked_loss = False
    assert losses.off_reason(config, "qwen2") == "training.chunked_loss is false"


def test_fp16_gradients_survive_a_large_token_count_under_loss_scaling():
    """fp16 training scales the loss (GradScaler) so small gradients survive half precision. Over a step's 100k
    tokens each softmax entry's share is ~1e-8, below fp16's range: it must be divided only in fp32, and cast to
    fp16 only after the scale multiplies it."""
    reference, chunked = tiny_model("llama"), tiny_model("llama")
    losses.use_chunked_loss(chunked)
    batch = packed_batch(num_items_in_batch=100_000)
    gradients = []
    for model in (reference, chunked):
        model.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.float16):  # fp32 weights, fp16 products: sft's model.dtype float16
            loss = model(**batch).loss
        (loss * 2.0**16).backward()
        gradients.append({name: p.grad / 2.0**16 for name, p in model.named_parameters()})
    expected, chunked_gradients = gradients
    for name, gradient in chunked_gradients.items():
        largest = expected[name].abs().max()
        assert largest > 0, name
        torch.testing.assert_close(gradient, expected[name], atol=1e-2 * largest, rtol=0, msg=name)


def test_a_lora_adapted_output_head_keeps_the_models_own_loss():
    """With lm_head among LoRA's target modules the head is a LoRA layer: the chunked loss would read its base weight
    alone and miss the adapter, so auto turns it off and true refuses."""
    from peft import LoraConfig, get_peft_model

    from sft.config import Config
    from sft.errors import UserError

    model = get_peft_model(tiny_model("llama"), LoraConfig(r=4, target_modules=["q_proj", "lm_head"]))
    config = Config.model_validate({"task": "causal_lm", "model": {"name": "m"}, "data": {"train": "t"}})
    assert losses.apply_to(config, model) is False
    assert model(**packed_batch()).logits.shape[1] > 0  # the model's own forward and loss
    config.training.chunked_loss = True
    with pytest.raises(UserError, match="training.chunked_loss: the output head is a peft.tuners.lora.layer.Linear"):
        losses.apply_to(config, model)
    plain = get_peft_model(tiny_model("llama"), LoraConfig(r=4, target_modules="all-linear"))
    assert losses.apply_to(config, plain) is True
