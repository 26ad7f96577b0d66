"""Benchmark of the data stage (not a test): `sft prepare` against a plain batched `datasets.map(num_proc=2)`
chat-template tokenization of the same rows, measured in the same run.

    make bench-data                                   # 200,000 rows
    .venv/bin/python bench/data_prepare.py --rows 20000 --work /tmp/bench-data

It writes ROWS synthetic chat conversations with skewed (log-normal) lengths, trains a byte-level BPE tokenizer
(vocabulary 8,000, ChatML template without generation markers, like many base models) on a sample, then runs, each
in its own process: (1) the plain map, (2) `sft prepare` (cold cache), (3) `sft prepare` again (warm cache).
For each: wall time, the peak resident memory of the whole process tree (sampled every 0.1 s; pages shared by the
tokenizer workers, e.g. of memory-mapped files and imported libraries, count once per process, so this overstates)
and the peak of its largest single process (each process's own high-water mark, VmHWM, read with the samples).
Resident memory is also split as /proc/PID/status does: anonymous (RssAnon: Python objects, heaps; what a login
node's memory limit stops) and file-backed (RssFile: memory-mapped Arrow files and libraries, which the kernel
reclaims under pressure); the peaks of both are sampled for the main process and summed over the tree.
Targets (issue 9): sft rows/s >= 0.8x the plain map, peak RSS <= 1.5 GB, warm prepare <= 10% of cold; (issue 19)
the main process's peak anonymous memory at 1,000,000 rows within 1.2x of the 200,000-row figure.
"""
import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parent.parent
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
WORDS = ("the model learns to answer questions about data slurm jobs checkpoints gpu cluster token batch loss "
         "training evaluation prompt completion assistant user system cache arrow memory disk node queue").split()

PLAIN_MAP = textwrap.dedent("""
    import sys, time
    import datasets
    from datasets import load_dataset
    from transformers import AutoTokenizer
    datasets.disable_progress_bars()
    data, tokenizer_dir, cache = sys.argv[1:4]
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    started = time.monotonic()
    rows = load_dataset("json", data_files=data, split="train", cache_dir=cache)
    def tokenize(batch):
        return {"input_ids": tokenizer.apply_chat_template(batch["messages"], tokenize=True, return_dict=True)["input_ids"]}
    tokenized = rows.map(tokenize, batched=True, num_proc=2, remove_columns=rows.column_names)
    print(len(tokenized), time.monotonic() - started)
""")


def write_rows(path: Path, count: int, seed: int = 0) -> None:
    """Chat rows whose lengths follow a log-normal: most short, a long tail (a few thousand words)."""
    rng = random.Random(seed)

    def text(mean_words: float) -> str:
        n = max(1, min(4000, int(rng.lognormvariate(0, 1.0) * mean_words)))
        return " ".join(rng.choice(WORDS) for _ in range(n))

    with path.open("w") as f:
        for _ in range(count):
            turns = [{"role": "system", "content": "answer briefly"}] if rng.random() < 0.3 else []
            for _ in range(1 if rng.random() < 0.8 else 2):
                turns += [{"role": "user", "content": text(20)}, {"role": "assistant", "content": text(60)}]
            f.write(json.dumps({"messages": turns}) + "\n")


def build_tokenizer(folder: Path, data: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    sample = [json.loads(line)["messages"][-1]["content"] for _, line in zip(range(2000), data.open())]
    bpe = Tokenizer(models.BPE(unk_token=None))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    specials = ["<pad>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
    bpe.train_from_iterator(sample, trainers.BpeTrainer(vocab_size=8000, special_tokens=specials,
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(folder)


def measure(command: list[str]) -> tuple[float, float, float, float, dict, str]:
    """(seconds, CPU seconds, peak RSS of the whole process tree in GB, peak RSS of its largest process in GB,
    peaks of anonymous and file-backed memory in GB, output)."""
    started = time.monotonic()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    root, tree_peak, largest_peak = psutil.Process(process.pid), 0, 0
    split_peaks = dict.fromkeys(("main_anon_gb", "main_file_gb", "tree_anon_gb", "tree_file_gb"), 0.0)
    while True:
        # wait4 (not poll) so the child's own rusage comes back: the CPU time of it and its reaped workers.
        pid, status, usage = os.wait4(process.pid, os.WNOHANG)
        if pid:
            break
        try:
            tree = [root] + root.children(recursive=True)
            tree_peak = max(tree_peak, sum(p.memory_info().rss for p in tree))
            largest_peak = max(largest_peak, *map(high_water_mark, tree))
            split = [resident_split(p) for p in tree]
            for name, value in (("main_anon_gb", split[0][0]), ("main_file_gb", split[0][1]),
                                ("tree_anon_gb", sum(anon for anon, _ in split)),
                                ("tree_file_gb", sum(file for _, file in split))):
                split_peaks[name] = max(split_peaks[name], round(value / 1e9, 3))
        except (psutil.Error, OSError):  # a worker that exited between the listing and the reads
            pass
        time.sleep(0.1)
    output = process.stdout.read()
    if os.waitstatus_to_exitcode(status) != 0:
        sys.exit(f"{' '.join(command)} failed:\n{output[-3000:]}")
    # CPU seconds of the process and its reaped workers: steadier than wall time on a shared machine.
    return (time.monotonic() - started, usage.ru_utime + usage.ru_stime, tree_peak / 1e9, largest_peak / 1e9,
            split_peaks, output)


def high_water_mark(process: psutil.Process) -> int:
    """A process's own peak RSS in bytes. Not wait4's ru_maxrss: Linux carries the RSS of the process that started
    it across exec, so this script's own memory would set the floor of every child's peak."""
    with open(f"/proc/{process.pid}/status") as status:
        # A process that exited and is not reaped yet has no VmHWM line.
        return next((int(line.split()[1]) for line in status if line.startswith("VmHWM:")), 0) * 1024


def resident_split(process: psutil.Process) -> tuple[int, int]:
    """(anonymous, file-backed) resident bytes of a process, from RssAnon and RssFile in /proc/PID/status (absent
    for a process that has exited and not been reaped yet: 0)."""
    with open(f"/proc/{process.pid}/status") as status:
        fields = dict(line.split(":", 1) for line in status if line.startswith(("RssAnon:", "RssFile:")))
    return tuple(int(fields.get(name, "0").split()[0]) * 1024 for name in ("RssAnon", "RssFile"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--work", type=Path, default=REPO / "bench" / ".work")
    args = parser.parse_args()
    shutil.rmtree(args.work, ignore_errors=True)
    args.work.mkdir(parents=True)
    data, tokenizer_dir = args.work / "chat.jsonl", args.work / "tokenizer"
    write_rows(data, args.rows)
    build_tokenizer(tokenizer_dir, data)
    config = args.work / "bench.yaml"
    config.write_text(json.dumps({"task": "causal_lm", "model": {"name": str(tokenizer_dir)},
                                  "data": {"train": str(data), "eval_fraction": 0.01, "max_length": 2048,
                                           "num_proc": 2, "cache_dir": str(args.work / "cache")}}))
    python = sys.executable
    runs = {"plain_map": [python, "-c", PLAIN_MAP, str(data), str(tokenizer_dir), str(args.work / "hf")],
            "sft_prepare_cold": [python, str(REPO / "entrypoint.py"), "prepare", str(config)],
            "sft_prepare_warm": [python, str(REPO / "entrypoint.py"), "prepare", str(config)]}
    results: dict = {"rows": args.rows, "jsonl_mb": round(data.stat().st_size / 1e6, 1)}
    for name, command in runs.items():
        # The machine is shared: the 1-minute load average before each run says how far to trust its wall time.
        load_before = round(os.getloadavg()[0], 1)
        seconds, cpu_seconds, tree_gb, largest_gb, split_peaks, output = measure(command)
        results[name] = {"load_average_before": load_before, "seconds": round(seconds, 1),
                         "rows_per_s": round(args.rows / seconds),
                         "cpu_seconds": round(cpu_seconds, 1),
                         "peak_rss_tree_gb": round(tree_gb, 2), "peak_rss_largest_process_gb": round(largest_gb, 2),
                         **{f"peak_{name}": value for name, value in split_peaks.items()}}
        if name == "sft_prepare_cold":
            sft_out = output
    results["sft_vs_plain_speed"] = round(results["plain_map"]["seconds"] / results["sft_prepare_cold"]["seconds"], 2)
    results["sft_vs_plain_cpu"] = round(results["plain_map"]["cpu_seconds"] / results["sft_prepare_cold"]["cpu_seconds"], 2)
    results["warm_vs_cold_time"] = round(results["sft_prepare_warm"]["seconds"] / results["sft_prepare_cold"]["seconds"], 3)
    print(sft_out[-2500:])
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
