"""Throughput counting: real (non-padding) tokens, token efficiency and MFU from the batches a model really sees."""
from types import SimpleNamespace

import pytest
import torch

from sft.training.throughput import ThroughputCallback, flops_per_token, gpu_peak_flops


class Tiny(torch.nn.Module):
    """Stands in for a model: ThroughputCallback only hooks its forward and counts its parameters."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(3))

    def forward(self, input_ids=None, attention_mask=None, position_ids=None):
        return input_ids


def test_real_tokens_are_the_non_padding_tokens_of_padded_and_flattened_batches():
    from transformers import DataCollatorWithFlattening

    examples = [[5, 6, 7], [8, 9], [1, 2, 3, 4, 5, 6], [7]]
    model = Tiny()
    callback = ThroughputCallback()
    args = SimpleNamespace(world_size=1, bf16=False, fp16=False)
    callback.on_train_begin(args, None, None, model=model)
    model.train()
    # Two padded batches (pad to the longest, as DataCollatorWithPadding does)...
    for batch in (examples[:2], examples[2:]):
        width = max(map(len, batch))
        ids = torch.tensor([e + [0] * (width - len(e)) for e in batch])
        mask = torch.tensor([[1] * len(e) + [0] * (width - len(e)) for e in batch])
        model(input_ids=ids, attention_mask=mask)
    # ...one flattened batch (padding-free), and an evaluation forward that must not count.
    flat = DataCollatorWithFlattening(return_position_ids=True)([{"input_ids": e} for e in examples])
    model(input_ids=flat["input_ids"], position_ids=flat["position_ids"])
    model.eval()
    model(input_ids=flat["input_ids"], position_ids=flat["position_ids"])

    real, processed, counted_examples = callback._read(args)
    lengths = sum(map(len, examples))
    assert real == 2 * lengths  # each example once padded, once flattened
    assert processed == (2 * 3 + 2 * 6) + lengths  # padded widths x rows, plus the flattened tokens
    assert counted_examples == 2 * len(examples)
    rates = callback._rates((0.0, [0, 0, 0]), 2.0, [real, processed, counted_examples])
    assert rates == {"real_tokens_per_s": real / 2.0, "token_efficiency": real / processed}  # no MFU on CPU


def test_mfu_uses_the_gpu_peak_and_counts_weight_gradients_of_trained_parameters_only():
    assert gpu_peak_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert gpu_peak_flops("NVIDIA H100 PCIe") == 756e12
    assert gpu_peak_flops("NVIDIA A100-SXM4-80GB") == 312e12
    assert gpu_peak_flops("Some Future GPU") is None
    # Full fine-tuning: 6N plus attention; LoRA (nothing of the base trained): 4N plus attention.
    assert flops_per_token(100, 100, 2, 8, 10) == 600 + 12 * 2 * 8 * 10
    assert flops_per_token(100, 0, 2, 8, 10) == 400 + 12 * 2 * 8 * 10


def test_mfu_is_per_gpu_when_the_tokens_are_summed_over_processes(tmp_path):
    """Four processes: the token totals are summed over all of them, the peak is one GPU's."""
    import torch.distributed as dist

    # A one-process group stands in for the four (all_reduce of one process is the identity).
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        callback = ThroughputCallback()
        args = SimpleNamespace(world_size=4, bf16=False, fp16=False)
        callback.on_train_begin(args, None, None, model=Tiny())
        callback.peak = 1e12
        summed_tokens, examples, seconds = 4 * 1000, 4 * 10, 2.0
        rates = callback._rates((0.0, [0, 0, 0]), seconds, [summed_tokens, summed_tokens, examples])
    finally:
        dist.destroy_process_group()
    one_gpu_flops = flops_per_token(3, 3, 0, 0, 100) * 1000 / seconds
    assert rates["mfu"] == pytest.approx(one_gpu_flops / 1e12)


class Params4bit(torch.nn.Parameter):
    """Stands in for bitsandbytes' 4-bit weight: two values packed per uint8 element, the real shape in quant_state."""


def test_4bit_packed_weights_count_their_real_number_of_parameters():
    model = torch.nn.Sequential(torch.nn.Linear(8, 6, bias=False), torch.nn.Linear(6, 2))
    packed = Params4bit(torch.zeros(8 * 6 // 2, 1, dtype=torch.uint8), requires_grad=False)
    packed.quant_state = SimpleNamespace(shape=torch.Size([6, 8]))
    model[0].weight = packed
    callback = ThroughputCallback()
    callback.on_train_begin(SimpleNamespace(world_size=1, bf16=False, fp16=False), None, None, model=model)
    total, trainable, _, _ = callback.shape
    assert (total, trainable) == (8 * 6 + 6 * 2 + 2, 6 * 2 + 2)
