"""Probe (not a test, not sft's training path): does `torch.compile` speed up training steps of the `make bench`
model on this machine? A plain loop of AdamW steps over padding-free batches (examples of log-normal length, mean
~170 tokens, flattened into batches of at most 1,024 tokens with position ids restarting per example), eager
attention, first eagerly, then compiled (`dynamic=True`: every batch has another length), then eagerly again.

    .venv/bin/python bench/compile_probe.py        # prints tokens/s of each pass and the compiled pass's warm-up

The first batches of each pass are warm-up (compilation for the compiled one) and are timed apart.
"""
import math
import random
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from train_throughput import MAX_LENGTH, SHAPES

WARMUP_BATCHES, TIMED_BATCHES = 5, 35


def packed_batches(count: int, vocab: int, mean_tokens: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    rng = random.Random(0)
    batches = []
    for _ in range(count):
        lengths = []
        while True:
            length = max(8, min(MAX_LENGTH, int(rng.lognormvariate(math.log(mean_tokens), 0.6))))
            if sum(lengths) + length > MAX_LENGTH:
                break
            lengths.append(length)
        input_ids = torch.randint(5, vocab, (1, sum(lengths)), generator=torch.Generator().manual_seed(len(batches)))
        position_ids = torch.cat([torch.arange(length) for length in lengths])[None]
        batches.append((input_ids, position_ids))
    return batches


def tokens_per_s(compiled: bool, batches: list) -> tuple[float, float]:
    """(tokens/s over the timed batches, seconds of the warm-up batches)."""
    shape = SHAPES["cpu"]
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=shape["vocab"], max_position_embeddings=2 * MAX_LENGTH, tie_word_embeddings=False,
        attn_implementation="eager", **{k: v for k, v in shape.items() if k not in ("vocab", "mean_tokens", "rows")}))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    step = torch.compile(model, dynamic=True) if compiled else model

    def train(part: list) -> float:
        started = time.monotonic()
        for input_ids, position_ids in part:
            step(input_ids=input_ids, position_ids=position_ids, labels=input_ids).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
        return time.monotonic() - started

    warmup = train(batches[:WARMUP_BATCHES])
    timed = batches[WARMUP_BATCHES:]
    return sum(ids.numel() for ids, _ in timed) / train(timed), warmup


def main() -> None:
    batches = packed_batches(WARMUP_BATCHES + TIMED_BATCHES, SHAPES["cpu"]["vocab"], SHAPES["cpu"]["mean_tokens"])
    results = [(name, *tokens_per_s(name == "compiled", batches)) for name in ("eager", "compiled", "eager again")]
    for name, rate, warmup in results:
        print(f"{name:12s} {rate:7.0f} tokens/s (warm-up {warmup:.1f} s)")
    eager = (results[0][1] + results[2][1]) / 2
    print(f"compiled / eager: {results[1][1] / eager:.2f}x")


if __name__ == "__main__":
    main()
