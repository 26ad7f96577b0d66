"""Shared test assets, all built locally and offline: a tiny BPE tokenizer + Llama model, and small datasets."""
import json
import os
import shutil
import tempfile
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
# The tokenized-data cache and hub caches of every test (and of the runs they start) live in one fresh folder:
# never the user's ~/.cache, and never a cache left by an earlier version of the code.
os.environ["HF_HOME"] = tempfile.mkdtemp(prefix="sft-tests-hf-")
REPO = Path(__file__).resolve().parent.parent

# ChatML-style, deliberately without {% generation %} markers: exercises the render-and-diff masking route.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CORPUS = [
    "the quick brown fox jumps over the lazy dog", "what is the capital of france ? paris is the capital",
    "add two and three : the answer is five", "translate hello to german : hallo", "slurm jobs get preempted",
    "checkpoints make training resumable", "the model learns to answer questions", "user assistant system",
]


def pytest_sessionfinish(session, exitstatus):
    import shutil

    shutil.rmtree(os.environ["HF_HOME"], ignore_errors=True)


# The files that take most of the suite's time: collected first, so that `make test`'s two workers run them side by
# side instead of one after the other at the end.
SLOWEST_FILES = ("test_container.py", "test_slurm.py")


def pytest_collection_modifyitems(config, items):
    """Slowest files first; GPU tests run wherever CUDA is visible (`make test` on a GPU node, `make gpu-check`) and
    show up as skipped, with the reason, everywhere else."""
    import torch

    items.sort(key=lambda item: item.path.name not in SLOWEST_FILES)  # stable: keeps the order within each file

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (none visible); run `make gpu-check` on a GPU node")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def environment_restored():
    """A run in the test process sets variables (CUBLAS_WORKSPACE_CONFIG for training.deterministic, ...) that a
    later test in the same worker would otherwise see: each test ends with the environment it started with."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def build_tiny_tokenizer(folder: Path, chat_template: str | None = CHAT_TEMPLATE):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
    bpe = Tokenizer(models.BPE(unk_token=None))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(CORPUS * 20, trainers.BpeTrainer(vocab_size=400, special_tokens=specials,
                                                             initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    from tokenizers import processors

    # Prepend BOS like Llama tokenizers do, so prompt masking covers a special token too.
    tokenizer._tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", tokenizer.bos_token_id)])
    tokenizer.chat_template = chat_template
    tokenizer.save_pretrained(folder)
    tokenizer.name_or_path = str(folder)  # as if loaded from there
    return tokenizer


@pytest.fixture(scope="session")
def tiny_causal_lm(tmp_path_factory) -> Path:
    """A 2-layer Llama (~100 k parameters) with its BPE tokenizer, saved like a hub checkpoint."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = tmp_path_factory.mktemp("tiny-llama")
    tokenizer = build_tiny_tokenizer(folder)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False)
    LlamaForCausalLM(config).save_pretrained(folder)
    return folder


CHAT_ROWS = [
    {"messages": [{"role": "user", "content": f"add {a} and {b}"},
                  {"role": "assistant", "content": f"the answer is {a + b}"}]}
    for a in range(6) for b in range(4)
]


@pytest.fixture(scope="session")
def tiny_chat_data(tmp_path_factory) -> Path:
    """24 short chat conversations (JSONL, `messages` format)."""
    return write_jsonl(tmp_path_factory.mktemp("chat") / "chat.jsonl", CHAT_ROWS)


@pytest.fixture
def write_config(tmp_path):
    """Write a YAML config into tmp_path and return its path."""
    import yaml

    def write(config: dict, name: str = "config.yaml") -> Path:
        path = tmp_path / name
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        return path

    return write


def put_in_hub_cache(model: Path, hub_cache: Path, repo_id: str = "org/tiny", commit: str = "abc123") -> Path:
    """MODEL's files where `sft fetch REPO_ID` leaves them in HUB_CACHE (a snapshot and refs/main); its folder."""
    repo = hub_cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / commit
    shutil.copytree(model, snapshot)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    return snapshot


def tiny_lm_config(model: Path, data: Path, output: Path, **training) -> dict:
    """A causal-LM config that trains the tiny model in seconds."""
    return {"task": "causal_lm", "model": {"name": str(model)},
            "data": {"train": str(data), "eval_fraction": 0.0, "max_length": 64},
            "method": {"name": "full"},
            # Batches of batch_size examples (not the token-budget default): tests count steps per example.
            "training": {"epochs": 1, "batch_size": 4, "max_tokens_per_batch": None, "learning_rate": 1e-3,
                         "logging_steps": 1,
                         "eval_strategy": "no", "save_strategy": "no", "seed": 42, **training},
            "output": {"dir": str(output), "name": "tiny"}}


@pytest.fixture(scope="session")
def finished_runs(tiny_causal_lm, tiny_chat_data, tmp_path_factory) -> dict[tuple[str, str], Path]:
    """Four finished tiny runs, (task, method) → run directory, each with two complete checkpoints: causal LM on the
    chat data and a 3-class classifier (the tiny Llama with a new score head), each fully fine-tuned and with LoRA.
    Shared by the predict, export and clean tests (which copy a run before changing it)."""
    import yaml

    from sft.config import load_config
    from sft.training.trainer import run_training

    folder = tmp_path_factory.mktemp("finished-runs")
    classes = write_jsonl(folder / "classes.jsonl", [{"text": f"add {a} and {b}", "label": SIZES[min((a + b) // 3, 2)]}
                                                     for a in range(6) for b in range(4)])
    runs = {}
    for task, data in (("causal_lm", tiny_chat_data), ("classification", classes)):
        for method in ("full", "lora"):
            config = tiny_lm_config(tiny_causal_lm, data, folder / "runs", max_steps=6, save_strategy="steps",
                                    save_steps=3, learning_rate=3e-3 if method == "full" else 2e-2)
            config |= {"task": task, "method": {"name": method, "lora": {"r": 8, "alpha": 32}}}
            config["output"]["name"] = f"{task}-{method}"
            path = folder / f"{task}-{method}.yaml"
            path.write_text(yaml.safe_dump(config))
            runs[task, method] = run_training(load_config(path)).run_dir
    return runs


SIZES = ["small", "big", "huge"]  # the classifier's labels in finished_runs (sorted: big, huge, small)


# Owns a run directory as a live run's rank 0 does (flock on run.lock, owner recorded inside) until killed.
RUN_OWNER = """
import sys, time
from pathlib import Path
from sft.run.directory import take_over

run = take_over(Path(sys.argv[1]))
print("owner", flush=True)
time.sleep(600)
"""


@pytest.fixture
def owner_processes():
    """start(script, *args, env=None): a Python process running `script`, which prints "owner" once it owns a run
    directory; returned once it does, killed when the test ends."""
    import subprocess
    import sys

    started: list[subprocess.Popen] = []

    def start(script: str, *args: str, env: dict | None = None) -> subprocess.Popen:
        process = subprocess.Popen([sys.executable, "-c", script, *args], stdout=subprocess.PIPE, text=True,
                                   cwd=REPO, env=env)
        started.append(process)
        assert process.stdout.readline() == "owner\n"
        return process

    yield start
    for process in started:
        process.kill()
        process.wait()


@pytest.fixture
def run_owner(owner_processes):
    """run_owner(run_dir): a live process (outside any Slurm job) that owns the run directory until the test ends."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    return lambda run_dir: owner_processes(RUN_OWNER, str(run_dir), env=env)


@pytest.fixture(scope="module")
def slurm_cluster(tmp_path_factory):
    """A real single-node Slurm cluster (tests/slurm_cluster.py) for one test file; skips where it cannot start."""
    from slurm_cluster import SlurmCluster, SlurmUnavailable

    cluster = SlurmCluster(tmp_path_factory.mktemp("slurm"))
    try:
        cluster.start()
    except SlurmUnavailable as error:
        pytest.skip(f"no Slurm cluster: {error}")
    yield cluster
    cluster.stop()
