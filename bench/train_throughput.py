"""Training-throughput benchmark (`make bench`): the classic recipe, TRL's SFTTrainer (packing and padding-free)
and sft with its defaults, on the same model and the same tokenized data, in one invocation.

    make bench                                        # CPU: ~5 min on 2 cores; a GPU when one is visible
    .venv/bin/python bench/train_throughput.py --rows 300 --out bench

Recipes (one epoch over the same examples each, so each trains on the same real tokens):
  classic      HF Trainer, every example padded to max_length 1024, batch 8, Trainer defaults (the SOP script)
  trl_packing  TRL SFTTrainer, packing=True (best-fit decreasing), completion-only loss; batch 8 packed rows on a
               GPU, 1 on CPU (without flash attention a batch of packed rows is one flattened sequence whose
               attention costs (sum of lengths)^2: batch 8 measured 75 real tok/s here, issue 10)
  trl_padfree  TRL SFTTrainer, padding_free=True without packing, batch 8, completion-only loss
TRL gets the attention kernel sft's `auto` picks on the device (its best; eager on CPU), gradient checkpointing off.
  sft          `sft train` with its defaults (method full, like the others: same trained weights and optimizer)
  sft_own_loss the same with training.chunked_loss: false (the model's own cross-entropy): the chunked loss's lever
  sft_compile  the same with training.compile: true (torch.compile); Inductor compiles in the first step and
               recompiles for dynamic shapes in the second, both before the clock starts
Each runs in its own process (a fresh memory peak; nothing warmed by the previous recipe). One token counter (a
forward pre-hook counting non-padding input tokens) and one clock (from the start of optimizer step WARMUP_STEPS
to the end of the last step) measure all of them, so the numbers compare like with like.

CPU case: a 4-layer Llama (hidden 256, vocab 8k, random init), chat examples with log-normal lengths (mean ~170
tokens, max_length 1024). GPU case (untested here): the Qwen2 0.5B (default) and 1.5B shapes of ../shared/bench
(`--shape 1.5b`; tied embeddings as in Qwen2), mean ~330 tokens.
Writes bench/throughput.md and bench/throughput.json; the last line printed is one JSON object.
"""
import argparse
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

MAX_LENGTH = 1024
BATCH = 8
WARMUP_STEPS = 2
PAD_ID = 0  # never drawn as a content token, so "non-padding" = "!= PAD_ID" for every recipe
RECIPES = ("sft", "sft_own_loss", "sft_compile", "trl_padfree", "trl_packing", "classic")
# Llama/Qwen2 shapes: small enough for 2 CPU cores, and the GPU table's 0.5B and 1.5B models.
SHAPES = {
    "cpu": {"vocab": 8192, "hidden_size": 256, "intermediate_size": 688, "num_hidden_layers": 4,
            "num_attention_heads": 4, "num_key_value_heads": 4, "tie_word_embeddings": False,
            "mean_tokens": 170, "rows": 160},
    "0.5b": {"vocab": 151936, "hidden_size": 896, "intermediate_size": 4864, "num_hidden_layers": 24,
             "num_attention_heads": 14, "num_key_value_heads": 2, "tie_word_embeddings": True,
             "mean_tokens": 330, "rows": 4000},
    "1.5b": {"vocab": 151936, "hidden_size": 1536, "intermediate_size": 8960, "num_hidden_layers": 28,
             "num_attention_heads": 12, "num_key_value_heads": 2, "tie_word_embeddings": True,
             "mean_tokens": 330, "rows": 4000},
}


# Assets: tokenizer, model and data, written once and read by every recipe's process

def build_assets(folder: Path, shape_name: str, rows: int, seed: int = 0) -> None:
    """A word-level tokenizer (one word = one token, so lengths are exact) with a ChatML template, a random-init
    model, chat examples with log-normal lengths, and their token ids/labels as sft tokenizes them."""
    import random

    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    shape = SHAPES[shape_name]
    specials = ["<pad>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
    words = ["user", "assistant", "system"] + [f"w{i}" for i in range(shape["vocab"] - len(specials) - 3)]
    vocab = {token: i for i, token in enumerate(specials + words)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                        additional_special_tokens=specials[3:])
    tokenizer.chat_template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                               "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    tokenizer.save_pretrained(folder / "model")
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(vocab), max_position_embeddings=MAX_LENGTH * 2,
                         bos_token_id=1, eos_token_id=2, pad_token_id=PAD_ID,
                         **{k: v for k, v in shape.items() if k not in ("vocab", "mean_tokens", "rows")})
    LlamaForCausalLM(config).save_pretrained(folder / "model")

    # Log-normal total lengths (sigma 0.8, mean ~ shape's mean), 40% prompt / 60% answer; 10 template tokens.
    generator = random.Random(seed)
    mu = math.log(shape["mean_tokens"]) - 0.8 ** 2 / 2
    conversations = []
    for _ in range(rows):
        length = min(MAX_LENGTH, max(16, round(generator.lognormvariate(mu, 0.8)))) - 10
        prompt = max(1, int(length * 0.4))
        text = [f"w{generator.randrange(len(words) - 3)}" for _ in range(length)]
        conversations.append([{"role": "user", "content": " ".join(text[:prompt])},
                              {"role": "assistant", "content": " ".join(text[prompt:])}])
    with open(folder / "chat.jsonl", "w") as f:
        f.writelines(json.dumps({"messages": c}) + "\n" for c in conversations)

    from sft.data.formats import tokenize_conversations

    examples = tokenize_conversations(tokenizer, conversations, MAX_LENGTH)
    assert all(PAD_ID not in e["input_ids"] for e in examples)
    (folder / "tokens.json").write_text(json.dumps(examples))


# One recipe, in its own process

def run_recipe(recipe: str, assets: Path, device: str) -> dict:
    import torch

    counts: list[tuple[int, int]] = []  # (non-padding tokens, tokens) per training forward
    marks: dict = {}

    def count_tokens(_module, args, kwargs):
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        if _module.training:
            counts.append((int((input_ids != PAD_ID).sum()), input_ids.numel()))

    def synchronize():
        if device == "cuda":
            torch.cuda.synchronize()

    from transformers import TrainerCallback

    class Clock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step == WARMUP_STEPS:
                synchronize()
                marks["start"], marks["first"] = time.perf_counter(), len(counts)

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == state.max_steps:
                synchronize()
                marks["end"], marks["last"], marks["steps"] = time.perf_counter(), len(counts), state.max_steps

    def instrument(trainer):
        # Eager under torch.compile (sft_compile): a traced int() would break the graph the recipe measures.
        trainer.model.register_forward_pre_hook(torch.compiler.disable(count_tokens), with_kwargs=True)
        trainer.add_callback(Clock())
        return trainer

    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    manifest = None
    if recipe.startswith("sft"):
        manifest = train_sft(assets, instrument, recipe)
    else:
        examples = json.loads((assets / "tokens.json").read_text())
        trainer = classic_trainer(assets, examples, device) if recipe == "classic" else \
            trl_trainer(assets, examples, device, packing=recipe == "trl_packing")
        instrument(trainer).train()
    timed = counts[marks["first"]:marks["last"]]
    real, processed = sum(c[0] for c in timed), sum(c[1] for c in timed)
    seconds = marks["end"] - marks["start"]
    peak_mb = torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else peak_rss_mb()
    result = {"recipe": recipe, "real_tok_s": real / seconds, "token_efficiency": real / processed,
              "timed_steps": marks["steps"] - WARMUP_STEPS, "steps": marks["steps"], "timed_seconds": seconds,
              "real_tokens_timed": real, "real_tokens_total": sum(c[0] for c in counts), "peak_mb": peak_mb}
    if manifest is not None:  # sft's own throughput record, beside the bench's independent count
        result["sft_own_count"] = {k: manifest["results"].get(k) for k in ("real_tokens", "token_efficiency")}
        result.update({f"sft_{k}": v for k, v in manifest["performance"].items()})
    return result


def peak_rss_mb() -> float:
    """This process's own peak RSS (VmHWM). Not ru_maxrss: Linux carries the RSS of the process that started this one
    across exec, so the bench's parent (which built the model and data) would set the floor of every recipe's peak."""
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmHWM:")) / 1024


def classic_trainer(assets: Path, examples: list[dict], device: str):
    """The SOP script: padding="max_length" to 1024, batch 8, Trainer defaults (bf16 on GPUs, as the GPU table)."""
    import torch
    from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

    def pad_to_max_length(batch: list[dict]) -> dict:
        input_ids = torch.full((len(batch), MAX_LENGTH), PAD_ID)
        labels = torch.full((len(batch), MAX_LENGTH), -100)
        attention_mask = torch.zeros((len(batch), MAX_LENGTH), dtype=torch.long)
        for row, example in enumerate(batch):
            n = len(example["input_ids"])
            input_ids[row, :n] = torch.tensor(example["input_ids"])
            labels[row, :n] = torch.tensor(example["labels"])
            attention_mask[row, :n] = 1
        return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}

    model = AutoModelForCausalLM.from_pretrained(assets / "model")
    args = TrainingArguments(output_dir=str(assets / "out-classic"), num_train_epochs=1,
                             per_device_train_batch_size=BATCH, save_strategy="no", logging_steps=1000,
                             report_to="none", disable_tqdm=True, bf16=device == "cuda", use_cpu=device == "cpu",
                             remove_unused_columns=False)
    return Trainer(model=model, args=args, train_dataset=examples, data_collator=pad_to_max_length)


def trl_trainer(assets: Path, examples: list[dict], device: str, packing: bool):
    """TRL's SFTTrainer on the same token ids, loss on the answer only (completion_mask), gradient checkpointing
    off (TRL turns it on by default; it only saves memory), bf16 on GPUs only (fp32 is faster on CPUs)."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    rows = Dataset.from_list([{"input_ids": e["input_ids"],
                               "completion_mask": [int(label != -100) for label in e["labels"]]} for e in examples])
    batch = 1 if packing and device == "cpu" else BATCH
    config = SFTConfig(output_dir=str(assets / "out-trl"), num_train_epochs=1, per_device_train_batch_size=batch,
                       packing=packing, padding_free=not packing, completion_only_loss=True,
                       # Packing cuts rows at max_length; without packing TRL refuses to enforce it (the examples
                       # are already truncated to MAX_LENGTH by sft's tokenization, as for every recipe).
                       max_length=MAX_LENGTH if packing else None,
                       gradient_checkpointing=False, bf16=device == "cuda", use_cpu=device == "cpu",
                       save_strategy="no", logging_steps=1000, report_to="none", disable_tqdm=True)
    model = AutoModelForCausalLM.from_pretrained(assets / "model", attn_implementation=sft_attention())
    return SFTTrainer(model=model, args=config, train_dataset=rows,
                      processing_class=AutoTokenizer.from_pretrained(assets / "model"))


def sft_attention() -> str:
    from sft.config import Config
    from sft.model.device import choose_attention

    config = Config.model_validate({"task": "causal_lm", "model": {"name": "m"}, "data": {"train": "t"}})
    return choose_attention(config)[0]


def train_sft(assets: Path, instrument, recipe: str) -> dict:
    """`sft train` on the chat file with the defaults, method full (sft_own_loss: training.chunked_loss false;
    sft_compile: training.compile true). The bench wraps sft's build_trainer to attach its counter and clock to the
    Trainer sft builds; nothing else about the run changes."""
    import yaml

    import sft.training.trainer
    from sft.config import load_config

    config_path = assets / "sft.yaml"
    config_path.write_text(yaml.safe_dump({
        "task": "causal_lm", "model": {"name": str(assets / "model")},
        "data": {"train": str(assets / "chat.jsonl"), "eval_fraction": 0.0, "max_length": MAX_LENGTH},
        "method": {"name": "full"},
        "training": {"epochs": 1, "save_strategy": "no", "eval_strategy": "no", "logging_steps": 1000,
                     **{"sft_own_loss": {"chunked_loss": False}, "sft_compile": {"compile": True}}.get(recipe, {})},
        "output": {"dir": str(assets / "runs"), "name": recipe}}))
    build_trainer = sft.training.trainer.build_trainer
    sft.training.trainer.build_trainer = lambda *args, **kwargs: instrument(build_trainer(*args, **kwargs))
    result = sft.training.trainer.run_training(load_config(config_path))
    return json.loads((result.run_dir / "manifest.json").read_text())


# The whole benchmark

def versions() -> dict:
    from importlib import metadata

    names = ("torch", "transformers", "trl", "accelerate", "datasets")
    return {"python": platform.python_version(), **{name: metadata.version(name) for name in names}}


def describe_device(device: str) -> str:
    import torch

    if device == "cuda":
        return torch.cuda.get_device_name()
    return f"CPU: {platform.processor() or platform.machine()}, {len(os.sched_getaffinity(0))} cores, " \
           f"{torch.get_num_threads()} torch threads"


def write_reports(out: Path, summary: dict, results: list[dict]) -> None:
    (out / "throughput.json").write_text(json.dumps({"summary": summary, "recipes": results}, indent=2) + "\n")
    lines = [f"# Training throughput ({summary['date']})", "",
             f"Device: {summary['device_name']}. Model: {summary['model']}. Data: {summary['data']}.",
             f"Versions: {', '.join(f'{k} {v}' for k, v in summary['versions'].items())}. "
             f"Load average at start / end: {summary['load_start']} / {summary['load_end']}.", "",
             "| recipe | real tok/s | token efficiency | timed steps | timed s | peak MB | x classic |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    seed = next(r for r in results if r["recipe"] == "classic")["real_tok_s"]
    for r in results:
        lines.append(f"| {r['recipe']} | {r['real_tok_s']:,.0f} | {r['token_efficiency']:.3f} | {r['timed_steps']} "
                     f"| {r['timed_seconds']:.1f} | {r['peak_mb']:,.0f} | {r['real_tok_s'] / seed:.2f} |")
    # `--recipes` may leave some out (e.g. TRL on a short GPU session): say only what was measured.
    findings = []
    if summary["ratio_vs_seed"] is not None:
        findings.append(f"sft vs classic: **{summary['ratio_vs_seed']:.2f}x**")
    if summary["ratio_vs_trl"] is not None:
        findings.append(f"vs TRL's best ({summary['trl_best']}): **{summary['ratio_vs_trl']:.2f}x**")
    if summary["sft_tok_s"] is not None:
        findings.append(f"sft token efficiency {summary['token_efficiency']:.3f}; sft's attention kernel: "
                        f"{summary['sft_attention']}, tokens per batch: {summary['sft_max_tokens_per_batch']}, "
                        f"chunked loss: {summary['sft_chunked_loss']}")
    if summary["chunked_vs_own_loss"] is not None:
        findings.append(f"chunked loss {summary['chunked_vs_own_loss']}x the same run with the model's own loss, "
                        f"peak {summary['sft_peak_mb']} vs {summary['own_loss_peak_mb']} MB")
    if summary["compile_vs_eager"] is not None:
        findings.append(f"training.compile: {summary['compile_vs_eager']}x sft's defaults")
    lines += ["", "; ".join(findings) + ".", ""]
    (out / "throughput.md").write_text("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=SHAPES, help="model shape (default: cpu on a CPU, 0.5b on a GPU)")
    parser.add_argument("--rows", type=int, help="chat examples (default: 160 for cpu, 4000 for 0.5b and 1.5b)")
    parser.add_argument("--out", default=str(Path(__file__).parent), help="where throughput.md/.json go")
    parser.add_argument("--recipes", default=",".join(RECIPES), help="comma-separated subset of " + ", ".join(RECIPES))
    parser.add_argument("--run", choices=RECIPES, help=argparse.SUPPRESS)  # internal: one recipe, in a child process
    parser.add_argument("--assets", help=argparse.SUPPRESS)
    args = parser.parse_args()
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.run:
        print(json.dumps(run_recipe(args.run, Path(args.assets), device)))
        return

    started = datetime.now(timezone.utc)
    load_start = round(os.getloadavg()[0], 1)
    shape_name = args.shape or ("0.5b" if device == "cuda" else "cpu")
    shape = SHAPES[shape_name]
    rows = args.rows or shape["rows"]
    with tempfile.TemporaryDirectory(prefix="sft-bench-") as work:
        assets = Path(work)
        build_assets(assets, shape_name, rows)
        results = []
        for recipe in args.recipes.split(","):
            # A fresh HF_HOME: sft's tokenized-data cache (and any hub cache) starts empty and goes away afterwards.
            env = {**os.environ, "HF_HOME": str(assets / "hf"), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
            child = subprocess.run([sys.executable, __file__, "--run", recipe, "--assets", str(assets)], env=env,
                                   capture_output=True, text=True)
            if child.returncode != 0:
                sys.exit(f"{recipe} failed:\n{child.stderr[-4000:]}")
            results.append(json.loads(child.stdout.strip().splitlines()[-1]))
            # Partial results survive a recipe that fails or a job that is killed.
            (Path(args.out) / "throughput.partial.json").write_text(json.dumps(results, indent=2) + "\n")
            print(f"{recipe}: {results[-1]['real_tok_s']:,.0f} real tok/s, efficiency "
                  f"{results[-1]['token_efficiency']:.3f}, peak {results[-1]['peak_mb']:,.0f} MB", file=sys.stderr)
        lengths = [len(e["input_ids"]) for e in json.loads((assets / "tokens.json").read_text())]
    by_recipe = {r["recipe"]: r for r in results}
    trl = [r for r in results if r["recipe"].startswith("trl")]
    best_trl = max(trl, key=lambda r: r["real_tok_s"]) if trl else None
    sft, seed = by_recipe.get("sft"), by_recipe.get("classic")
    summary = {
        "device": device, "device_name": describe_device(device), "date": started.isoformat(timespec="seconds"),
        "shape": shape_name,
        "sft_tok_s": round(sft["real_tok_s"]) if sft else None,
        "seed_tok_s": round(seed["real_tok_s"]) if seed else None,
        "trl_tok_s": round(best_trl["real_tok_s"]) if best_trl else None,
        "trl_best": best_trl["recipe"] if best_trl else None,
        "ratio_vs_seed": round(sft["real_tok_s"] / seed["real_tok_s"], 2) if sft and seed else None,
        "ratio_vs_trl": round(sft["real_tok_s"] / best_trl["real_tok_s"], 2) if sft and best_trl else None,
        "token_efficiency": round(sft["token_efficiency"], 4) if sft else None,
        "sft_peak_mb": round(sft["peak_mb"]) if sft else None,
        "sft_attention": sft.get("sft_attention") if sft else None,
        "sft_max_tokens_per_batch": sft.get("sft_max_tokens_per_batch") if sft else None,
        "sft_chunked_loss": sft.get("sft_chunked_loss") if sft else None,
        # The chunked loss's lever, same run: sft's defaults against the same run with the model's own loss.
        "chunked_vs_own_loss": round(sft["real_tok_s"] / by_recipe["sft_own_loss"]["real_tok_s"], 2)
        if sft and "sft_own_loss" in by_recipe else None,
        "own_loss_peak_mb": round(by_recipe["sft_own_loss"]["peak_mb"]) if "sft_own_loss" in by_recipe else None,
        "compile_vs_eager": round(by_recipe["sft_compile"]["real_tok_s"] / sft["real_tok_s"], 2)
        if sft and "sft_compile" in by_recipe else None,
        "model": f"Llama-shaped ({shape_name}), {shape['num_hidden_layers']} layers, hidden {shape['hidden_size']}, "
                 f"vocab {shape['vocab']}, {'tied' if shape['tie_word_embeddings'] else 'untied'} embeddings, "
                 f"random init",
        "data": f"{rows} chat examples, log-normal lengths, mean {sum(lengths) / len(lengths):.0f} tokens, "
                f"max {max(lengths)}, max_length {MAX_LENGTH}, {sum(lengths):,} tokens",
        "versions": versions(), "load_start": load_start, "load_end": round(os.getloadavg()[0], 1),
        "wall_seconds": round((datetime.now(timezone.utc) - started).total_seconds()),
    }
    out = Path(args.out)
    if seed:
        write_reports(out, summary, results)
        (out / "throughput.partial.json").unlink(missing_ok=True)  # the reports hold every result now
    print(json.dumps({k: v for k, v in summary.items() if k not in ("versions", "model", "data")}))


if __name__ == "__main__":
    main()
