"""Preflight memory estimate: within 15% of measured peaks (the H100 table of ../shared/bench/NOTES.md and a CPU
run measured here), the fit verdict, the change that makes a run fit, and `sft check` reading config.json only."""
import json
import os
import subprocess
import sys

import pytest
from conftest import REPO

from sft.check.memory import parse_memory
from sft.model.estimate import GIB, estimate_memory, fits, shape_from_config

QWEN2_05B = {"model_type": "qwen2", "hidden_size": 896, "intermediate_size": 4864, "num_hidden_layers": 24,
             "num_attention_heads": 14, "num_key_value_heads": 2, "vocab_size": 151936, "tie_word_embeddings": True,
             "hidden_act": "silu"}
QWEN2_15B = {**QWEN2_05B, "hidden_size": 1536, "intermediate_size": 8960, "num_hidden_layers": 28,
             "num_attention_heads": 12}


def largest_batch(batch_size: int, steps: int = 40) -> int:
    """Tokens in the largest of `steps` random batches of the NOTES.md data (its generator: 4,000 log-normal
    lengths, mean ~330, clamped to 32..1024): what a batch-size run's peak memory depends on."""
    import torch

    lengths = torch.exp(torch.randn(4000, generator=torch.Generator().manual_seed(1)) * 0.8 + 5.5).clamp(32, 1024)
    order = torch.Generator().manual_seed(42)
    return max(int(lengths.long()[torch.randperm(4000, generator=order)[:batch_size]].sum()) for _ in range(steps))


def test_parameter_counts_from_config_json_match_the_models():
    assert round(shape_from_config(QWEN2_05B).params / 1e6) == 494  # NOTES.md: 494 M
    assert round(shape_from_config(QWEN2_15B).params / 1e6) == 1544  # 1,544 M


@pytest.mark.parametrize("model, tokens, measured_gib", [
    (QWEN2_05B, 8 * 1024, 33.6),  # classic: every example padded to 1024, batch 8
    (QWEN2_05B, "b8", 21.5),  # padding-free, batch 8
    (QWEN2_05B, "b24", 42.9),  # padding-free, batch 24, flex_attention
])
def test_estimate_is_within_15_percent_of_the_measured_h100_peaks(model, tokens, measured_gib):
    tokens = largest_batch(int(tokens[1:])) if isinstance(tokens, str) else tokens
    estimate = estimate_memory(shape_from_config(model), "full", tokens)
    assert estimate.total / GIB == pytest.approx(measured_gib, rel=0.15)


def test_1_5b_full_fine_tune_at_batch_24_does_not_fit_80gb_and_the_estimate_names_what_would():
    from sft.config import Config
    from sft.model.estimate import what_fits

    gpu = parse_memory("80GB")
    tokens = largest_batch(24)
    assert fits(estimate_memory(shape_from_config(QWEN2_05B), "full", tokens), gpu)  # measured 42.9 GiB
    shape = shape_from_config(QWEN2_15B)
    assert not fits(estimate_memory(shape, "full", tokens), gpu)  # measured: out of memory
    config = Config.model_validate({"task": "causal_lm", "model": {"name": "m"}, "data": {"train": "t",
                                                                                           "max_length": 1024},
                                    "method": {"name": "full"}})
    change = what_fits(config, shape, tokens, gpu)
    assert change.startswith("training.gradient_checkpointing=true")
    # LoRA and QLoRA shrink weights, gradients and optimizer states; activations and logits stay.
    full, lora, qlora = (estimate_memory(shape, method, tokens) for method in ("full", "lora", "qlora"))
    assert qlora.parts["weights"] < lora.parts["weights"] < full.parts["weights"]
    assert lora.parts["optimizer states"] < full.parts["optimizer states"] / 50
    assert qlora.parts["logits"] == lora.parts["logits"] == full.parts["logits"]
    # The chunked loss (training.chunked_loss: auto, on for qwen2) drops most of the logits: the run fits as it is.
    # Estimated only: no GPU has run it yet.
    chunked = estimate_memory(shape, "full", tokens, chunked_loss=True)
    assert fits(chunked, gpu) and chunked.parts["logits"] < full.parts["logits"] / 10


MEASURE_CPU_PEAK = """
import json, sys
import torch
from transformers import LlamaConfig, LlamaForCausalLM
from sft.model.loss import use_chunked_loss

torch.manual_seed(0)
def train(model, tokens, steps):
    optimizer = torch.optim.AdamW(model.parameters())
    ids = torch.randint(0, model.config.vocab_size, (1, tokens))
    positions = torch.cat([torch.arange(tokens // 4)] * 4)[None]  # four packed examples
    for _ in range(steps):
        model(input_ids=ids, labels=ids, position_ids=positions).loss.backward()
        optimizer.step()
        optimizer.zero_grad()

def rss():
    return int(open("/proc/self/statm").read().split()[1]) * 4096

def peak_rss():
    # This process's own peak. Not ru_maxrss: Linux carries the RSS of the process that started this one across exec,
    # so a test worker grown past 1 GB by earlier tests set the "peak" here (seen: 695 MB measured for 312 MB).
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:")) * 1024

# Warm the libraries up on a tiny model first, so the baseline holds torch's own one-off buffers.
chunked = sys.argv[3] == "chunked"
def build(config):
    model = LlamaForCausalLM(config)
    if chunked:
        use_chunked_loss(model)
    return model

train(build(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                        num_attention_heads=2, attn_implementation="eager")), 16, 2)
baseline = rss()
train(build(LlamaConfig(**json.loads(sys.argv[1]), attn_implementation="eager")), int(sys.argv[2]), 2)
print(peak_rss() - baseline)
"""


@pytest.mark.parametrize("loss, vocab, tokens", [
    ("own", 16000, 1024),
    ("chunked", 64000, 2048),  # two chunks of 1,048 tokens: measured 0.9 GiB, 1.8 GiB with the model's own loss
    ("chunked", 151936, 2048),  # Qwen2's vocabulary, five chunks of 441 tokens: 1.2 GiB, 4.1 GiB with its own
])
def test_estimate_is_within_15_percent_of_a_measured_cpu_peak(loss, vocab, tokens):
    """fp32 full fine-tuning of a small Llama on CPU (eager attention, which holds the tokens² attention scores)."""
    model = {"model_type": "llama", "vocab_size": vocab, "hidden_size": 128, "intermediate_size": 344,
             "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 4,
             "max_position_embeddings": 4096, "tie_word_embeddings": False}
    # A fixed mmap threshold makes freed tensors leave the process, so peak RSS tracks live tensors.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    measured = int(subprocess.run([sys.executable, "-c", MEASURE_CPU_PEAK, json.dumps(model), str(tokens), loss],
                                  env=env, capture_output=True, text=True, check=True, timeout=300).stdout.split()[-1])
    estimate = estimate_memory(shape_from_config(model), "full", tokens, half_precision=False,
                               score_entries=tokens**2, chunked_loss=loss == "chunked")
    assert estimate.total == pytest.approx(measured, rel=0.15)


def test_sft_check_reports_the_estimate_and_the_fit_from_config_json_alone(tiny_causal_lm, tiny_chat_data, tmp_path,
                                                                         write_config):
    from conftest import tiny_lm_config

    config = write_config(tiny_lm_config(tiny_causal_lm, tiny_chat_data, tmp_path / "runs"))
    wide = {**os.environ, "COLUMNS": "300"}  # one table row per line
    check = subprocess.run([sys.executable, str(REPO / "entrypoint.py"), "check", str(config), "--gpu-mem", "80GB"],
                           capture_output=True, text=True, timeout=300, env=wide)
    assert check.returncode == 0, check.stderr
    assert "memory estimate" in check.stdout and "fits in 80.0 GiB" in check.stdout
    assert "logits (chunked loss)" in check.stdout  # a Llama: training.chunked_loss auto is on
    tiny = subprocess.run([sys.executable, str(REPO / "entrypoint.py"), "check", str(config), "--gpu-mem", "2MB"],
                          capture_output=True, text=True, timeout=300, env=wide)
    assert "does not fit in 2 MiB" in tiny.stdout
    assert tiny.returncode == 2 and tiny.stderr.startswith("sft: error: --gpu-mem 2MB: memory estimate: ")
    assert tiny.stderr.count("\n") == 1 and "does not fit in 2 MiB" in tiny.stderr
    bad = subprocess.run([sys.executable, str(REPO / "entrypoint.py"), "check", str(config), "--gpu-mem", "lots"],
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "--gpu-mem lots: expected a size like 80GB" in bad.stderr


def test_auto_token_budget_on_a_gpu_shrinks_until_the_estimate_fits(tmp_path):
    from sft.config import Config
    from sft.model.device import gpu_token_budget
    from sft.model.estimate import GPU_TOKEN_BUDGET

    (tmp_path / "config.json").write_text(json.dumps(QWEN2_15B))
    config = Config.model_validate({"task": "causal_lm", "model": {"name": str(tmp_path)},
                                    "data": {"train": "t", "max_length": 1024}, "method": {"name": "full"}})
    assert gpu_token_budget(config, parse_memory("141GB")) == GPU_TOKEN_BUDGET  # H200
    budget = gpu_token_budget(config, parse_memory("40GB"))  # A100 40GB
    assert budget < GPU_TOKEN_BUDGET
    def estimate(tokens):  # qwen2 trains with the chunked loss by default (training.chunked_loss: auto)
        return estimate_memory(shape_from_config(QWEN2_15B), "full", tokens, chunked_loss=True)

    assert fits(estimate(budget), parse_memory("40GB"))
    assert not fits(estimate(budget * 2), parse_memory("40GB"))
