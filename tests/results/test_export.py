"""sft export: the exported folder loads with plain from_pretrained and gives the run's outputs (LoRA merged vs
unmerged logits close), holds only safetensors weights and no pickle, carries label names, never overwrites."""
import json
import os

import pytest

from sft.cli import main
from sft.errors import UserError
from sft.results.export import export
from sft.results.finished_run import load_model, open_trained_run

IDS = [[1, 20, 30, 40, 50], [1, 70, 80, 90, 95]]
WEIGHT_SUFFIXES = {".safetensors"}
# What transformers and tokenizers write besides weights: JSON, the chat template, and a model card.
OTHER_SUFFIXES = {".json", ".jinja", ".md", ".txt", ".model"}


def assert_no_pickle(folder) -> None:
    """Only safetensors weights; no file a loader would unpickle (torch.save writes a zip or a raw pickle)."""
    files = [f for f in folder.rglob("*") if f.is_file()]
    assert any(f.suffix == ".safetensors" for f in files)
    for file in files:
        assert file.suffix in WEIGHT_SUFFIXES | OTHER_SUFFIXES, file
        head = file.read_bytes()[:4]
        assert not head.startswith(b"\x80") and head != b"PK\x03\x04", f"{file} looks like a pickle"


def run_logits(run_dir, ids):
    """Logits of the run's own model as sft loads it (LoRA: adapter on the base, unmerged)."""
    import torch

    model = load_model(open_trained_run(run_dir), dtype=torch.float32)
    with torch.no_grad():
        return model(input_ids=torch.tensor(ids)).logits


@pytest.mark.parametrize("method", ["full", "lora"])
def test_exported_causal_lm_loads_standalone_and_gives_the_runs_logits(finished_runs, tmp_path, method):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run_dir = finished_runs["causal_lm", method]
    target = export(str(run_dir), merge=method == "lora", to=str(tmp_path / "model"))
    assert target == tmp_path / "model"
    assert_no_pickle(target)
    assert not (target / "adapter_config.json").exists()
    umask = os.umask(0)
    os.umask(umask)
    assert {f.stat().st_mode & 0o777 for f in target.iterdir()} == {0o666 & ~umask}  # readable by collaborators
    assert target.stat().st_mode & 0o777 == 0o777 & ~umask  # not mkdtemp's private 0700

    exported = AutoModelForCausalLM.from_pretrained(target)
    assert not any("lora" in name for name, _ in exported.named_parameters())
    with torch.no_grad():
        logits = exported(input_ids=torch.tensor(IDS)).logits
    expected = run_logits(run_dir, IDS)
    if method == "full":
        assert torch.equal(logits, expected)  # the same weights, bit for bit
    else:
        torch.testing.assert_close(logits, expected, atol=1e-5, rtol=1e-4)  # merging reorders the sums
    tokenizer, trained = AutoTokenizer.from_pretrained(target), AutoTokenizer.from_pretrained(run_dir / "final")
    assert tokenizer.chat_template == trained.chat_template and tokenizer.chat_template
    assert tokenizer("add 2 and 3")["input_ids"] == trained("add 2 and 3")["input_ids"]


def test_exported_lora_classifier_carries_label_names_and_its_trained_head(finished_runs, tmp_path):
    import torch
    from transformers import AutoModelForSequenceClassification

    run_dir = finished_runs["classification", "lora"]
    assert main(["export", str(run_dir), "--merge"]) == 0
    target = run_dir / "export"
    assert_no_pickle(target)
    label_names = json.loads((run_dir / "manifest.json").read_text())["data"]["label_names"]
    exported, info = AutoModelForSequenceClassification.from_pretrained(target, output_loading_info=True)
    assert not info["missing_keys"], info  # the trained score head is in the file, not re-initialised
    assert exported.config.id2label == dict(enumerate(label_names))
    assert exported.config.label2id == {name: i for i, name in enumerate(label_names)}
    with torch.no_grad():
        logits = exported(input_ids=torch.tensor(IDS)).logits
    torch.testing.assert_close(logits, run_logits(run_dir, IDS), atol=1e-5, rtol=1e-4)

    # A second export to the same folder is refused and leaves the first intact.
    before = {f: f.read_bytes() for f in target.rglob("*") if f.is_file()}
    with pytest.raises(UserError, match="already exists and is not empty"):
        export(str(run_dir), merge=True, to=None)
    assert {f: f.read_bytes() for f in target.rglob("*") if f.is_file()} == before


def test_lora_without_merge_and_a_non_empty_folder_are_refused(finished_runs, tmp_path):
    with pytest.raises(UserError, match="pass --merge"):
        export(str(finished_runs["causal_lm", "lora"]), merge=False, to=str(tmp_path / "x"))
    assert not (tmp_path / "x").exists()
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match=f"--to {occupied}: already exists"):
        export(str(finished_runs["causal_lm", "full"]), merge=False, to=str(occupied))
    assert [p.name for p in occupied.iterdir()] == ["notes.txt"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no half-built folder left behind
