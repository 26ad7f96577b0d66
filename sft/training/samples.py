"""Causal-LM samples: the first few eval prompts answered greedily before and after training (samples.json, shown in
report.md), so a reader sees what the fine-tuning changed."""
import logging
from pathlib import Path

from sft.files import write_json_atomic
from sft.run.records import SAMPLES, read_samples

log = logging.getLogger("sft")
MAX_NEW_TOKENS = 64  # enough to judge an answer; a few seconds even for a large model


def prompts_of(eval_dataset, count: int) -> list[dict]:
    """Prompt and reference answer (token ids) of the first `count` eval examples: the tokens before the first
    one that carries loss, and those after. Text examples carry loss from the start: their first half prompts."""
    examples = getattr(eval_dataset, "examples", eval_dataset)  # token-budget batches keep the examples beside
    prompts = []
    for index in range(min(count, len(examples) if examples is not None else 0)):
        input_ids, labels = examples[index]["input_ids"], examples[index]["labels"]
        start = next((i for i, label in enumerate(labels) if label != -100), len(labels))
        if start <= 1:
            start = max(1, len(input_ids) // 2)
        prompts.append({"prompt": list(input_ids[:start]), "reference": list(input_ids[start:])})
    return prompts


def generate(model, tokenizer, prompts: list[dict]) -> list[str]:
    """Greedy answers, one prompt at a time (no padding to get wrong). flex_attention is for packed training
    batches: generation runs on sdpa and the model goes back to its kernel afterwards."""
    import torch

    kernel = model.config._attn_implementation
    if kernel not in ("sdpa", "eager"):
        model.set_attn_implementation("sdpa")
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    answers = []
    try:
        with torch.no_grad():
            for item in prompts:
                ids = torch.tensor([item["prompt"]], device=device)
                output = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                        max_new_tokens=MAX_NEW_TOKENS, pad_token_id=tokenizer.pad_token_id,
                                        use_cache=True)
                answers.append(tokenizer.decode(output[0, ids.shape[1]:], skip_special_tokens=True))
    finally:
        model.train(was_training)
        if kernel not in ("sdpa", "eager"):
            model.set_attn_implementation(kernel)
    return answers


def record(run_dir: Path, model, tokenizer, prompts: list[dict], stage: str) -> None:
    """Add the answers of `stage` (before / after) to samples.json; a resumed run keeps its first 'before'."""
    path = run_dir / SAMPLES
    samples = read_samples(run_dir) or {
        "prompts": [tokenizer.decode(item["prompt"], skip_special_tokens=True) for item in prompts],
        "references": [tokenizer.decode(item["reference"], skip_special_tokens=True) for item in prompts],
        "max_new_tokens": MAX_NEW_TOKENS}
    if stage in samples:
        return
    samples[stage] = generate(model, tokenizer, prompts)
    write_json_atomic(path, samples)
    log.info("samples: %d eval prompts answered %s training (%s)", len(prompts), stage, path.name)
