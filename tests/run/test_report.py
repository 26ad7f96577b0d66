"""Outputs people look at: eval metrics against independent references, plots (PNG files whose drawn data equals
metrics.jsonl), report.md, `sft report`. Two tiny runs, trained once per module, serve every test."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import CHAT_ROWS, REPO, tiny_lm_config, write_jsonl

from sft.config import load_config

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
LABELS = ["negative", "neutral", "positive"]  # "neutral" is trained on but absent from the eval set
REVIEWS = [{"text": f"{word} {thing}", "label": label} for thing in ("fox", "dog", "model", "answer", "job", "slurm")
           for word, label in (("quick", "positive"), ("lazy", "negative"), ("capital", "positive"))]


def records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def classification_run(tiny_causal_lm, tmp_path_factory) -> Path:
    """The tiny Llama with a new 3-class head (one class only in the training set), 2 epochs, evaluated each epoch."""
    from sft.training.trainer import run_training

    folder = tmp_path_factory.mktemp("classification")
    train = write_jsonl(folder / "train.jsonl", REVIEWS[:12] + [{"text": f"plain {thing}", "label": "neutral"}
                                                                for thing in ("fox", "dog")])
    evaluation = write_jsonl(folder / "eval.jsonl", REVIEWS[12:])
    config = tiny_lm_config(tiny_causal_lm, train, folder / "runs", epochs=2, eval_strategy="epoch")
    config["task"] = "classification"
    config["data"] = {"train": str(train), "eval": str(evaluation), "label_names": LABELS, "max_length": 16}
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return run_training(load_config(path)).run_dir


@pytest.fixture(scope="module")
def causal_lm_run(tiny_causal_lm, tmp_path_factory) -> Path:
    from sft.training.trainer import run_training

    folder = tmp_path_factory.mktemp("causal")
    train = write_jsonl(folder / "train.jsonl", CHAT_ROWS[:16])
    evaluation = write_jsonl(folder / "eval.jsonl", CHAT_ROWS[16:])
    config = tiny_lm_config(tiny_causal_lm, train, folder / "runs", epochs=2, eval_strategy="epoch",
                            learning_rate=3e-3)
    config["data"]["eval"] = str(evaluation)
    config["output"]["samples"] = 2  # of 8 eval conversations
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return run_training(load_config(path)).run_dir


def test_classification_eval_metrics_equal_scikit_learn_on_the_final_model(classification_run):
    """eval_metrics.json against scikit-learn on predictions recomputed here, one example at a time, by the saved
    model: every declared class has a row and a column, the absent one included."""
    import torch
    from sklearn.metrics import confusion_matrix, f1_score
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(classification_run / "final").eval()
    tokenizer = AutoTokenizer.from_pretrained(classification_run / "final")
    truth, predicted = [], []
    with torch.no_grad():
        for row in REVIEWS[12:]:
            logits = model(**tokenizer(row["text"], return_tensors="pt")).logits
            predicted.append(int(logits.argmax()))
            truth.append(LABELS.index(row["label"]))
    saved = json.loads((classification_run / "eval_metrics.json").read_text())
    assert saved["label_names"] == LABELS and saved["step"] == records(classification_run)[-1]["step"]
    assert saved["confusion_matrix"] == confusion_matrix(truth, predicted, labels=[0, 1, 2]).tolist()
    assert saved["eval_macro_f1"] == pytest.approx(f1_score(truth, predicted, labels=[0, 1, 2], average="macro",
                                                            zero_division=0))
    assert saved["per_class"]["neutral"]["support"] == 0
    assert [r for r in records(classification_run) if "eval_macro_f1" in r][-1]["eval_macro_f1"] == \
        saved["eval_macro_f1"]


def test_causal_lm_token_accuracy_equals_an_independent_count(causal_lm_run, tiny_causal_lm):
    """Answer-token accuracy from packed eval batches equals a count over each eval conversation run alone."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sft.data import tokenize_messages

    model = AutoModelForCausalLM.from_pretrained(causal_lm_run / "final", attn_implementation="eager").eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_causal_lm)
    right = total = 0
    with torch.no_grad():
        for row in CHAT_ROWS[16:]:
            example = tokenize_messages(tokenizer, row["messages"], 64)
            ids, labels = torch.tensor([example["input_ids"]]), torch.tensor(example["labels"])
            predicted = model(input_ids=ids).logits[0].argmax(-1)[:-1]
            answer = labels[1:] != -100
            right += int((predicted[answer] == labels[1:][answer]).sum())
            total += int(answer.sum())
    saved = json.loads((causal_lm_run / "eval_metrics.json").read_text())
    assert total > 0 and saved["eval_token_accuracy"] == pytest.approx(right / total)
    assert saved["eval_perplexity"] == pytest.approx(2.718281828 ** saved["eval_loss"], rel=1e-6)


@pytest.mark.parametrize("run", ["classification_run", "causal_lm_run"])
def test_plots_are_pngs_of_the_logged_series(run, request):
    run_dir = request.getfixturevalue(run)
    plots = run_dir / "plots"
    logged = records(run_dir)
    drawn = json.loads((plots / "plots.json").read_text())
    expected = {"loss.png", "learning_rate.png", "throughput.png"} | \
        ({"confusion_matrix.png"} if run == "classification_run" else set())
    assert set(drawn) == expected
    for name in expected:
        assert (plots / name).read_bytes()[:8] == PNG_MAGIC

    def series(key):
        points = [(r["step"], r[key]) for r in logged if key in r]
        return {"x": [float(x) for x, _ in points], "y": [float(y) for _, y in points]}

    assert drawn["loss.png"] == {"train loss": series("loss"), "eval loss": series("eval_loss")}
    assert len(drawn["loss.png"]["eval loss"]["x"]) == 2 and len(drawn["loss.png"]["train loss"]["x"]) >= 4
    assert drawn["learning_rate.png"] == {"learning rate": series("learning_rate")}
    assert drawn["throughput.png"] == {"real tokens / s (all processes)": series("real_tokens_per_s")}
    if run == "classification_run":
        matrix = json.loads((run_dir / "eval_metrics.json").read_text())["confusion_matrix"]
        assert drawn["confusion_matrix.png"]["matrix"] == matrix


def test_throughput_is_plotted_when_logged(tmp_path):
    from sft.run.plots import write_plots

    logged = [{"step": 1, "loss": 2.0, "real_tokens_per_s": 900.0},
              {"step": 2, "loss": 1.5, "real_tokens_per_s": 1100.0}]
    written = write_plots(tmp_path, logged, None)
    assert set(written) == {"loss", "throughput"}
    assert written["throughput"].read_bytes()[:8] == PNG_MAGIC
    drawn = json.loads((tmp_path / "plots" / "plots.json").read_text())
    assert drawn["throughput.png"] == {"real tokens / s (all processes)": {"x": [1.0, 2.0], "y": [900.0, 1100.0]}}


def test_report_md_summarises_the_run(classification_run):
    text = (classification_run / "report.md").read_text()
    manifest = json.loads((classification_run / "manifest.json").read_text())
    assert text.startswith("# tiny\n") and "| status | finished |" in text
    assert "## Results" in text and f"| eval_macro_f1 | {manifest['results']['eval_macro_f1']:.4g} |" in text
    assert "| class | precision | recall | F1 | support |" in text and "| neutral | 0 | 0 | 0 | 0 |" in text
    for image in ("plots/loss.png", "plots/learning_rate.png", "plots/confusion_matrix.png"):
        assert f"]({image})" in text and (classification_run / image).is_file()
    assert "| model | " in text and "| method | full |" in text and "| attention | sdpa |" in text
    assert "| classes | negative, neutral, positive |" in text and "| training examples | 14 |" in text
    assert f"| torch | {manifest['versions']['torch']} |" in text and "| wall time | " in text


def test_sft_report_rewrites_the_report_and_refuses_a_folder_that_is_no_run(classification_run, tmp_path, capsys):
    from sft.cli import main

    (classification_run / "report.md").unlink()
    assert main(["report", str(classification_run)]) == 0
    assert (classification_run / "report.md").read_text().startswith("# tiny\n")
    assert main(["report", str(tmp_path)]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "not an sft run directory (no manifest.json)" in error


def tensorboard_scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar series in the run's TensorBoard events, read back as TensorBoard itself reads them."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def test_tensorboard_events_hold_the_logged_losses(causal_lm_run):
    scalars = tensorboard_scalars(causal_lm_run)
    logged = records(causal_lm_run)
    # TensorBoard stores float32.
    assert scalars["train/loss"] == [(r["step"], pytest.approx(r["loss"], rel=1e-6)) for r in logged if "loss" in r]
    assert scalars["eval/loss"] == [(r["step"], pytest.approx(r["eval_loss"], rel=1e-6)) for r in logged
                                    if "eval_loss" in r]
    assert "eval/token_accuracy" in scalars and "train/learning_rate" in scalars
    assert not (causal_lm_run / "checkpoints" / "runs").exists()


def test_run_start_table_names_the_settings_a_user_checks_first(tiny_causal_lm, tiny_chat_data, tmp_path, capsys):
    from types import SimpleNamespace

    from sft.logs import setup_terminal
    from sft.training.progress import print_run_start

    config = tiny_lm_config(tiny_causal_lm, tiny_chat_data, tmp_path, max_tokens_per_batch=256,
                            gradient_accumulation_steps=2)
    config["model"]["attn_implementation"] = "flex_attention"
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    prepared = SimpleNamespace(data_format="messages", train=[0] * 7, eval=[0] * 3)
    setup_terminal()
    print_run_start(load_config(path), prepared, tmp_path / "tiny", "bfloat16", 2)
    shown = capsys.readouterr().err
    for expected in (str(tiny_causal_lm), "causal_lm / full fine-tuning",
                     "messages: 7 training token-budget batches, 3 eval",
                     "256 tokens per process x 2 processes x 2 accumulation steps", "1 epochs", "bfloat16",
                     "flex_attention", str(tmp_path / "tiny")):
        assert expected in shown, expected


def test_causal_lm_samples_are_greedy_answers_of_the_base_and_final_model(causal_lm_run, tiny_causal_lm):
    """samples.json against transformers' own greedy generation from the chat-template prompt, with the base model
    (before) and the saved final model (after)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sft.training.samples import MAX_NEW_TOKENS

    tokenizer = AutoTokenizer.from_pretrained(tiny_causal_lm)
    samples = json.loads((causal_lm_run / "samples.json").read_text())
    rows = CHAT_ROWS[16:18]
    prompts = [tokenizer.apply_chat_template(row["messages"][:1], add_generation_prompt=True, tokenize=True,
                                             return_dict=False) for row in rows]
    assert samples["prompts"] == [tokenizer.decode(ids, skip_special_tokens=True) for ids in prompts]
    assert samples["references"][0].startswith(rows[0]["messages"][1]["content"])
    for stage, folder in (("before", tiny_causal_lm), ("after", causal_lm_run / "final")):
        model = AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager").eval()
        with torch.no_grad():
            expected = [tokenizer.decode(model.generate(torch.tensor([ids]), do_sample=False,
                                                        max_new_tokens=MAX_NEW_TOKENS,
                                                        pad_token_id=tokenizer.pad_token_id)[0, len(ids):],
                                         skip_special_tokens=True) for ids in prompts]
        assert samples[stage] == expected, stage
    assert samples["before"] != samples["after"]
    report = (causal_lm_run / "report.md").read_text()
    assert "## Samples" in report and f"```text\n{samples['after'][0]}\n```" in report


def test_plots_in_a_read_only_home_use_a_temp_matplotlib_folder_without_warnings(tmp_path):
    """As in the read-only image: matplotlib cannot create ~/.config/matplotlib (here HOME lies under a file, which
    even root cannot write into), so sft points MPLCONFIGDIR at a temp folder and matplotlib imports silently."""
    (tmp_path / "a_file").write_text("")
    env = {key: value for key, value in os.environ.items()
           if key not in ("MPLCONFIGDIR", "XDG_CONFIG_HOME", "XDG_CACHE_HOME")}
    env["HOME"] = str(tmp_path / "a_file" / "home")
    script = ("import os, sys; from pathlib import Path; from sft.run.plots import write_plots; "
              "write_plots(Path(sys.argv[1]), [{'step': 1, 'loss': 2.0}], None); print(os.environ['MPLCONFIGDIR'])")
    result = subprocess.run([sys.executable, "-c", script, str(tmp_path)], env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "mkdir -p failed" not in result.stderr and "Matplotlib" not in result.stderr, result.stderr
    assert Path(result.stdout.strip()).is_dir() and (tmp_path / "plots" / "loss.png").is_file()


def test_readme_run_directory_table_names_everything_a_run_holds(classification_run, causal_lm_run):
    """Every file and folder these finished runs hold (evaluated, with samples, report and plots) has a line in
    README.md's run-directory table."""
    readme = (REPO / "README.md").read_text()
    table = readme[readme.index("## The run directory"):]
    table = table[:table.index("```", table.index("```") + 3)]
    listed = {line.split()[0].split("/")[0].replace("YYYYmmdd_HHMMSS", "*") for line in table.splitlines()
              if line and not line.startswith((" ", "`"))}
    missing = {entry.name for run_dir in (classification_run, causal_lm_run) for entry in run_dir.iterdir()
               if not any(Path(entry.name).match(name) for name in listed)}
    assert not missing, f"README.md's run-directory table lacks {sorted(missing)}"

