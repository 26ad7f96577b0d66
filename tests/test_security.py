"""Secure by default: no model code runs unless allowed, weights load and save as safetensors (pickles refused unless
allowed, checkpoints read back with torch's tensors-only unpickler), files follow the user's umask, and nothing is
written into the data directory."""
import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import CHAT_ROWS, REPO, tiny_lm_config, write_jsonl

from sft.config import load_config
from sft.errors import UserError

CUSTOM_CODE = """from pathlib import Path
Path({marker!r}).write_text("the model's own code ran")
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
class CustomConfig(LlamaConfig):
    model_type = "custom_llama"
class CustomModel(LlamaForCausalLM):
    config_class = CustomConfig
class CustomTokenizer(PreTrainedTokenizerFast):
    pass
"""


def model_with_its_own_code(tiny_causal_lm: Path, folder: Path, marker: Path) -> Path:
    """The tiny model as a hub repository that ships Python code (auto_map) for its model and tokenizer."""
    shutil.copytree(tiny_causal_lm, folder)
    (folder / "custom.py").write_text(CUSTOM_CODE.format(marker=str(marker)))
    for file, auto_map in (("config.json", {"AutoConfig": "custom.CustomConfig",
                                            "AutoModelForCausalLM": "custom.CustomModel"}),
                           ("tokenizer_config.json", {"AutoTokenizer": [None, "custom.CustomTokenizer"]})):
        settings = json.loads((folder / file).read_text())
        settings["auto_map"] = auto_map
        if file == "config.json":
            settings["model_type"] = "custom_llama"
        (folder / file).write_text(json.dumps(settings))
    return folder


def test_model_code_runs_only_when_trust_remote_code_is_set(tiny_causal_lm, tiny_chat_data, tmp_path, write_config,
                                                            monkeypatch):
    from sft.model.loading import load_model, load_tokenizer

    monkeypatch.setenv("HF_MODULES_CACHE", str(tmp_path / "modules"))
    marker = tmp_path / "marker"
    model = model_with_its_own_code(tiny_causal_lm, tmp_path / "model", marker)
    config = load_config(write_config(tiny_lm_config(model, tiny_chat_data, tmp_path / "runs")))
    assert type(load_tokenizer(config)).__name__ != "CustomTokenizer"
    with pytest.raises(UserError, match=r"^model.name: .*model brings its own Python code, which would run on load; "
                                        r"set model.trust_remote_code: true only if you trust its authors$"):
        load_model(config)
    assert not marker.exists()

    config.model.trust_remote_code = True
    assert type(load_tokenizer(config)).__name__ == "CustomTokenizer"
    assert type(load_model(config)).__name__ == "CustomModel" and marker.exists()


def test_pickle_weights_are_refused_unless_allowed(tiny_causal_lm, tiny_chat_data, tmp_path, write_config,
                                                   monkeypatch):
    """A model folder with only pytorch_model.bin: refused before the file is opened; model.allow_pickle loads it."""
    import torch
    from safetensors.torch import load_file

    from sft.model.loading import load_model

    model = tmp_path / "model"
    shutil.copytree(tiny_causal_lm, model)
    weights = load_file(model / "model.safetensors")
    torch.save(weights, model / "pytorch_model.bin")
    (model / "model.safetensors").unlink()
    config = load_config(write_config(tiny_lm_config(model, tiny_chat_data, tmp_path / "runs")))
    opened = []
    torch_load = torch.load
    monkeypatch.setattr(torch, "load", lambda *args, **kwargs: opened.append(args[0]) or torch_load(*args, **kwargs))

    with pytest.raises(UserError, match=r"^model.name: .* has its weights only as pickle files \(e.g. "
                                        r"pytorch_model.bin\), which can run code when loaded; convert them to "
                                        r"safetensors, or set model.allow_pickle: true if you trust them$"):
        load_model(config)
    assert opened == []

    config.model.allow_pickle = True
    loaded = load_model(config)
    assert [Path(path).name for path in opened] == ["pytorch_model.bin"]
    assert all(torch.equal(loaded.get_parameter(name), tensor) for name, tensor in weights.items())


def test_resume_reads_checkpoints_with_the_tensors_only_unpickler(tiny_causal_lm, tiny_chat_data, tmp_path,
                                                                   write_config, monkeypatch):
    """Trainer's checkpoints hold torch.save pickles (optimizer, scheduler, RNG state): sft's own files in the run
    directory, and read back on resume only with weights_only=True (tensors and plain types, no code)."""
    import torch

    from sft.training.trainer import run_training

    config_path = write_config(tiny_lm_config(tiny_causal_lm, tiny_chat_data, tmp_path / "runs", max_steps=2,
                                              save_steps=2))
    run_dir = run_training(load_config(config_path)).run_dir
    manifest = json.loads((run_dir / "manifest.json").read_text())
    (run_dir / "manifest.json").write_text(json.dumps({**manifest, "status": "running"}))  # as if killed at the end
    calls = []
    torch_load = torch.load

    def watched_load(file, *args, **kwargs):
        calls.append((Path(file).name, kwargs.get("weights_only")))
        return torch_load(file, *args, **kwargs)

    monkeypatch.setattr(torch, "load", watched_load)
    run_training(load_config(config_path))
    assert {name for name, _ in calls} >= {"optimizer.pt", "scheduler.pt", "rng_state.pth"}
    assert all(weights_only is True for _, weights_only in calls), calls


def tree(folder: Path) -> dict:
    """Every entry below folder with its content and modification time."""
    return {p.relative_to(folder): (p.read_bytes() if p.is_file() else None, p.stat().st_mtime_ns)
            for p in folder.rglob("*")}


@pytest.fixture(scope="module")
def run_under_umask_027(tiny_causal_lm, tmp_path_factory):
    """`sft check`, `sft prepare` and `sft train` under umask 027, the data (a JSONL file and a datasets
    save_to_disk folder) in one directory: (data directory before, data directory, run directory, cache)."""
    from datasets import Dataset

    folder = tmp_path_factory.mktemp("umask")
    data = folder / "data"
    data.mkdir()
    write_jsonl(data / "chat.jsonl", CHAT_ROWS[:12])
    Dataset.from_list(CHAT_ROWS[12:]).save_to_disk(str(data / "saved"))
    before = tree(data)
    config = tiny_lm_config(tiny_causal_lm, data / "chat.jsonl", folder / "runs", max_steps=3, save_steps=2)
    config["data"]["train"] = [str(data / "chat.jsonl"), str(data / "saved")]
    config["data"]["eval_fraction"] = 0.25
    config["data"]["cache_dir"] = str(folder / "cache")
    config_path = folder / "config.yaml"
    config_path.write_text(yaml.safe_dump(config))
    for command in ("check", "prepare", "train"):
        result = subprocess.run([sys.executable, str(REPO / "entrypoint.py"), command, str(config_path)],
                                capture_output=True, text=True, timeout=600, cwd=folder,
                                preexec_fn=lambda: os.umask(0o027))
        assert result.returncode == 0, (command, result.stderr[-3000:])
    return before, data, folder / "runs" / "tiny", folder / "cache"


def test_nothing_is_written_into_the_data_directory(run_under_umask_027):
    before, data, _, _ = run_under_umask_027
    assert tree(data) == before


def test_run_and_cache_files_follow_the_umask(run_under_umask_027):
    """Under umask 027 every file is rw-r----- and every folder rwxr-x---: nothing more open (no chmod 0777),
    nor closed to the group that shares the project directory (no 0600 temp files)."""
    _, _, run_dir, cache = run_under_umask_027
    modes = {path: stat.S_IMODE(path.stat().st_mode) for folder in (run_dir, cache)
             for path in [folder, *folder.rglob("*")]}
    wrong = {str(path): oct(mode) for path, mode in modes.items() if mode != (0o750 if path.is_dir() else 0o640)}
    assert not wrong and len(modes) > 20


def test_the_final_model_holds_safetensors_and_no_pickle(run_under_umask_027):
    _, _, run_dir, _ = run_under_umask_027
    files = {p.name for p in (run_dir / "final").iterdir()}
    assert "model.safetensors" in files and (run_dir / "final" / ".complete").is_file()
    assert not {name for name in files if name.endswith((".bin", ".pt", ".pth", ".pkl", ".ckpt"))}, files
