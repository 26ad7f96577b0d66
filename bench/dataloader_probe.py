"""Probe (not a test): can dataloader workers speed sft's training up? They overlap batch loading with the step, so
they save at most the loading time. This measures it on sft's own path: the tokenized cache, token-budget batches
of the GPU default size (8,192 tokens) and sft's collator, in the main process (training.py: num_workers 0).

    .venv/bin/python bench/dataloader_probe.py        # prints ms per batch and loading throughput in tokens/s

Data: `make bench`'s GPU case (4,000 chat examples, log-normal lengths, mean ~330 tokens, max_length 1024) with the
CPU-sized tokenizer; loading cost depends on token counts, not on the model.
"""
import statistics
import sys
import tempfile
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).parent))
from train_throughput import MAX_LENGTH, SHAPES, build_assets  # noqa: E402

BUDGET, PASSES = 8192, 3


def main() -> None:
    from torch.utils.data import DataLoader

    from sft import data
    from sft.config import load_config
    from sft.model.loading import load_tokenizer
    from sft.training.trainer import make_collator

    with tempfile.TemporaryDirectory(prefix="sft-loader-") as work:
        folder = Path(work)
        SHAPES["cpu"] = {**SHAPES["cpu"], "mean_tokens": SHAPES["cuda"]["mean_tokens"]}
        build_assets(folder, "cpu", SHAPES["cuda"]["rows"])
        config_path = folder / "sft.yaml"
        config_path.write_text(yaml.safe_dump({
            "task": "causal_lm", "model": {"name": str(folder / "model")},
            "data": {"train": str(folder / "chat.jsonl"), "eval_fraction": 0.0, "max_length": MAX_LENGTH,
                     "cache_dir": str(folder / "cache")},
            "training": {"max_tokens_per_batch": BUDGET}}))
        config = load_config(config_path)
        tokenizer = load_tokenizer(config)
        prepared = data.in_token_budget_batches(data.prepare(config, lambda: tokenizer), BUDGET)
        loader = DataLoader(prepared.train, batch_size=1, collate_fn=make_collator(config, tokenizer), num_workers=0)
        for n in range(PASSES):
            tokens, started = 0, time.perf_counter()
            per_batch = []
            for batch in loader:
                per_batch.append(time.perf_counter() - started - sum(per_batch))
                tokens += batch["input_ids"].numel()
            seconds = time.perf_counter() - started
            print(f"pass {n + 1}: {len(loader)} batches, {tokens:,} tokens in {seconds:.2f} s: "
                  f"{tokens / seconds:,.0f} tokens/s, median {1000 * statistics.median(per_batch):.2f} ms a batch, "
                  f"max {1000 * max(per_batch):.2f} ms")


if __name__ == "__main__":
    main()
