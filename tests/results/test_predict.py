"""sft predict: predictions equal a forward pass of the model loaded by hand, LoRA adapters stay unmerged, prompts are
tokenized as training tokenized them, and bad input is one line."""
import csv
import json
from pathlib import Path

import pytest
from conftest import CHAT_ROWS, write_jsonl

from sft.cli import main
from sft.config import Fields
from sft.data.formats import (IGNORE_INDEX, USUAL_ROLES, ChatFormat, prompt_ids, tokenize_instruction,
                              tokenize_messages, tokenize_prompt_completion, tokenize_text)
from sft.errors import UserError
from sft.results.finished_run import load_model, open_trained_run
from sft.results.predict import predict

REVIEWS = ["add 1 and 1", "add 5 and 3", "add 2 and 2 please", "add 4 and 0"]


@pytest.fixture
def on_cpu(monkeypatch):
    """Predict as on a CPU node (fp32), to compare with the fp32 reference: a visible GPU would mean bf16."""
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def reference_model(run_dir, auto_class):
    """The run's model loaded by hand with transformers/peft (LoRA merged here, so it is a different path)."""
    from peft import AutoPeftModelForCausalLM, AutoPeftModelForSequenceClassification
    from transformers import AutoModelForCausalLM

    if (run_dir / "final" / "adapter_config.json").is_file():
        peft_class = AutoPeftModelForCausalLM if auto_class is AutoModelForCausalLM \
            else AutoPeftModelForSequenceClassification
        extra = {} if auto_class is AutoModelForCausalLM else {"num_labels": 3}
        return peft_class.from_pretrained(run_dir / "final", attn_implementation="eager", **extra).merge_and_unload()
    return auto_class.from_pretrained(run_dir / "final", attn_implementation="eager").eval()


@pytest.mark.parametrize("method", ["full", "lora"])
def test_classifier_predictions_equal_a_forward_pass_per_row(finished_runs, tmp_path, on_cpu, method):
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    run_dir = finished_runs["classification", method]
    if method == "full":  # any format sft reads: CSV here, JSONL for LoRA
        source = tmp_path / "new.csv"
        with source.open("w", newline="") as f:
            csv.writer(f).writerows([["id", "text"]] + [[i, text] for i, text in enumerate(REVIEWS)])
    else:
        source = write_jsonl(tmp_path / "new.jsonl", [{"id": i, "text": text} for i, text in enumerate(REVIEWS)])
    assert predict(str(run_dir), str(source), str(tmp_path / "out.jsonl"), batch_size=3, max_new_tokens=1) == 4
    predictions = read_jsonl(tmp_path / "out.jsonl")

    label_names = json.loads((run_dir / "manifest.json").read_text())["data"]["label_names"]
    model = reference_model(run_dir, AutoModelForSequenceClassification)
    tokenizer = AutoTokenizer.from_pretrained(run_dir / "final")
    for i, (text, prediction) in enumerate(zip(REVIEWS, predictions)):
        assert prediction["text"] == text and str(prediction["id"]) == str(i)  # the row as read, then the prediction
        with torch.no_grad():
            expected = torch.softmax(model(**tokenizer(text, return_tensors="pt")).logits[0], -1)
        got = torch.tensor([prediction["probabilities"][name] for name in label_names])
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)
        assert prediction["predicted_label"] == label_names[int(expected.argmax())]
    # A trained classifier, not a uniform guess: the probabilities differ between rows.
    assert len({round(p["probabilities"][label_names[0]], 4) for p in predictions}) > 1


@pytest.mark.parametrize("method", ["full", "lora"])
def test_generated_text_equals_greedy_decoding_by_hand(finished_runs, tmp_path, on_cpu, method):
    """Batched, left-padded generate() against a token-by-token argmax loop over each prompt alone (eager
    attention, no KV cache). The rows keep their expected answers: predict leaves the trailing assistant turn out."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run_dir = finished_runs["causal_lm", method]
    rows = CHAT_ROWS[:2] + [{"messages": [{"role": "user", "content": "add 3 and 3"}]}] + CHAT_ROWS[9:10]
    source = write_jsonl(tmp_path / "prompts.jsonl", rows)
    predict(str(run_dir), str(source), str(tmp_path / "out.jsonl"), batch_size=4, max_new_tokens=6)
    predictions = read_jsonl(tmp_path / "out.jsonl")

    model = reference_model(run_dir, AutoModelForCausalLM)
    tokenizer = AutoTokenizer.from_pretrained(run_dir / "final")
    for row, prediction in zip(rows, predictions):
        assert prediction["messages"] == row["messages"]
        turns = [m for m in row["messages"] if m["role"] == "user"]
        text = tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=True)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        new = []
        with torch.no_grad():
            for _ in range(6):
                token = int(model(torch.tensor([ids + new])).logits[0, -1].argmax())
                if token == tokenizer.eos_token_id:
                    break
                new.append(token)
        assert prediction["generated"] == tokenizer.decode(new, skip_special_tokens=True)
    assert any(p["generated"] for p in predictions)


@pytest.mark.parametrize("task", ["classification", "causal_lm"])
def test_lora_adapters_are_applied_on_the_base_without_merging(finished_runs, tiny_causal_lm, task):
    """The model predict uses is a peft model whose LoRA layers are unmerged (the base weights are the original
    ones) and active (its outputs differ from the base model's)."""
    import torch
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer
    from transformers import AutoModelForCausalLM

    run = open_trained_run(finished_runs[task, "lora"])
    model = load_model(run, dtype=torch.float32)
    layers = [module for module in model.modules() if isinstance(module, LoraLayer)]
    assert isinstance(model, PeftModel) and layers and not any(layer.merged for layer in layers)
    base = AutoModelForCausalLM.from_pretrained(tiny_causal_lm)
    name = "model.layers.0.self_attn.q_proj.weight"
    assert torch.equal(model.get_base_model().get_parameter(name), base.get_parameter(name))
    ids = torch.tensor([[1, 20, 30, 40]])
    with torch.no_grad():
        adapted = model(input_ids=ids).logits
        with model.disable_adapter():
            plain = model(input_ids=ids).logits
    assert not torch.allclose(adapted, plain, atol=1e-4)


RECORDS = {
    "messages": {"messages": CHAT_ROWS[3]["messages"]},
    "prompt_completion": {"prompt": "add 2 and 3 :", "completion": "five"},
    "instruction": {"instruction": "add two and three", "input": "quickly", "output": "five"},
    "text": {"text": "the quick brown fox"},
}


@pytest.mark.parametrize("data_format,chat_template", [(f, True) for f in RECORDS] +
                         [(f, False) for f in RECORDS if f != "messages"])
def test_prompt_tokens_are_the_training_example_before_its_answer(tiny_causal_lm, data_format, chat_template):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_causal_lm)
    if not chat_template:  # instruction rows become the Alpaca prompt
        tokenizer.chat_template = None
    record = RECORDS[data_format]
    example = {"messages": lambda: tokenize_messages(tokenizer, record["messages"], None),
               "prompt_completion": lambda: tokenize_prompt_completion(tokenizer, record["prompt"],
                                                                       record["completion"], None),
               "instruction": lambda: tokenize_instruction(tokenizer, record["instruction"], record["input"],
                                                           record["output"], None),
               "text": lambda: tokenize_text(tokenizer, record["text"], None)}[data_format]()
    prompt = prompt_ids(tokenizer, record, data_format, Fields())
    if data_format == "text":  # nothing is held back: the whole text is continued (training adds only EOS)
        assert example["input_ids"] == prompt + [tokenizer.eos_token_id]
        return
    answer_starts = next(i for i, label in enumerate(example["labels"]) if label != IGNORE_INDEX)
    assert prompt == example["input_ids"][:answer_starts]


@pytest.mark.parametrize("data_format", ["messages", "instruction"])
def test_prompt_tokens_carry_the_system_prompt_and_roles_the_run_trained_with(tiny_causal_lm, data_format):
    """data.system_prompt and data.fields.roles shaped the training examples, so they shape the prompt too."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_causal_lm)
    chat = ChatFormat(roles={**USUAL_ROLES, "customer": "user"}, system_prompt="answer in words")
    record = {"messages": [{"role": "customer", "content": "add 2 and 3"}, {"role": "assistant", "content": "five"}],
              "instruction": "add two and three", "input": "", "output": "five"}
    if data_format == "messages":
        example = tokenize_messages(tokenizer, record["messages"], None, chat)
    else:
        example = tokenize_instruction(tokenizer, record["instruction"], "", record["output"], None,
                                       chat.system_prompt)
    prompt = prompt_ids(tokenizer, record, data_format, Fields(), chat)
    answer_starts = next(i for i, label in enumerate(example["labels"]) if label != IGNORE_INDEX)
    assert prompt == example["input_ids"][:answer_starts]
    assert "answer in words" in tokenizer.decode(prompt)


def test_bad_input_is_refused_in_one_line(finished_runs, tmp_path, capsys):
    run_dir = str(finished_runs["classification", "full"])
    no_text = write_jsonl(tmp_path / "no_text.jsonl", [{"review": "fine"}])
    with pytest.raises(UserError, match=r"no column 'text' \(columns: review\); the run trained on classification"):
        predict(run_dir, str(no_text), None, 8, 8)
    empty_rows = write_jsonl(tmp_path / "empty.jsonl", [{"text": "fine"}, {"text": ""}, {"text": 3}])
    with pytest.raises(UserError, match=rf"2 bad row\(s\): {tmp_path}/empty.jsonl:2: 'text' must be non-empty"):
        predict(run_dir, str(empty_rows), None, 8, 8)

    existing = tmp_path / "predictions.jsonl"
    existing.write_text("keep me\n")
    good = write_jsonl(tmp_path / "good.jsonl", [{"text": "fine"}])
    assert main(["predict", run_dir, str(good), "--output", str(existing)]) == 2
    assert existing.read_text() == "keep me\n"
    assert main(["predict", run_dir, str(tmp_path / "missing.jsonl")]) == 2
    unfinished = tmp_path / "runs" / "unfinished"
    unfinished.mkdir(parents=True)
    (unfinished / "manifest.json").write_text('{"status": "preempted"}')
    assert main(["predict", str(unfinished), str(good)]) == 2
    errors = capsys.readouterr().err.splitlines()
    assert len(errors) == 3 and all(line.startswith("sft: error: ") for line in errors), errors
    assert "the file exists" in errors[0] and "missing.jsonl does not exist" in errors[1]
    assert "the run is preempted, not finished" in errors[2]


@pytest.mark.gpu
@pytest.mark.parametrize("method", ["full", "lora"])
def test_predict_on_a_gpu_agrees_with_the_cpu(finished_runs, tmp_path, monkeypatch, method):
    """On a GPU predict runs in the compute dtype (bf16 where supported): probabilities within bf16 rounding of the
    CPU's fp32 ones, and generation produces text for every row."""
    import torch

    run_dir = finished_runs["classification", method]
    source = write_jsonl(tmp_path / "new.jsonl", [{"text": text} for text in REVIEWS])
    torch.cuda.reset_peak_memory_stats()
    predict(str(run_dir), str(source), str(tmp_path / "gpu.jsonl"), batch_size=4, max_new_tokens=1)
    assert torch.cuda.max_memory_allocated() > 0  # the model really ran on the GPU
    with monkeypatch.context() as cpu_only:
        cpu_only.setattr("torch.cuda.is_available", lambda: False)
        predict(str(run_dir), str(source), str(tmp_path / "cpu.jsonl"), batch_size=4, max_new_tokens=1)
    for gpu, cpu in zip(read_jsonl(tmp_path / "gpu.jsonl"), read_jsonl(tmp_path / "cpu.jsonl")):
        torch.testing.assert_close(torch.tensor(list(gpu["probabilities"].values())),
                                   torch.tensor(list(cpu["probabilities"].values())), atol=2e-2, rtol=0)
    chat = write_jsonl(tmp_path / "chat.jsonl", CHAT_ROWS[:3])
    predict(str(finished_runs["causal_lm", method]), str(chat), str(tmp_path / "chat-out.jsonl"), 4, 6)
    assert len(read_jsonl(tmp_path / "chat-out.jsonl")) == 3


@pytest.mark.slow
def test_minilm_lora_classifier_predicts_and_exports_like_the_model_loaded_by_hand(tmp_path, write_config, on_cpu):
    """The demo's real BERT-style model (token type ids, right padding over rows of different lengths) with a LoRA
    adapter and trained head: predict equals a per-row forward pass of peft's own loader, and the merged export
    gives the same probabilities through plain transformers."""
    import torch
    import yaml
    from conftest import REPO
    from peft import AutoPeftModelForSequenceClassification
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from sft.config import load_config
    from sft.results.export import export
    from sft.training.trainer import run_training

    rows = [json.loads(line) for line in (REPO / "data" / "demo" / "reviews.jsonl").read_text().splitlines()]
    config = yaml.safe_load((REPO / "configs" / "demo.yaml").read_text())
    config["data"] |= {"train": str(write_jsonl(tmp_path / "train.jsonl", rows[:16])), "eval_fraction": 0}
    config["training"].update(max_steps=2, eval_strategy="no", save_strategy="no", learning_rate=5e-3)
    config["method"] = {"name": "lora", "lora": {"r": 8, "alpha": 16}}
    config["output"] = {"dir": str(tmp_path / "runs"), "name": "minilm"}
    run_dir = run_training(load_config(write_config(config))).run_dir
    reviews = [row["text"] for row in rows[16:22]]
    source = write_jsonl(tmp_path / "reviews.jsonl", [{"text": text} for text in reviews])
    predict(str(run_dir), str(source), str(tmp_path / "out.jsonl"), batch_size=3, max_new_tokens=1)
    predictions = read_jsonl(tmp_path / "out.jsonl")

    label_names = ["negative", "positive"]
    tokenizer = AutoTokenizer.from_pretrained(run_dir / "final")
    by_hand = AutoPeftModelForSequenceClassification.from_pretrained(run_dir / "final", num_labels=2).eval()
    exported = AutoModelForSequenceClassification.from_pretrained(export(str(run_dir), True, None)).eval()
    assert exported.config.id2label == dict(enumerate(label_names))
    for text, prediction in zip(reviews, predictions):
        encoded = tokenizer(text, return_tensors="pt")
        with torch.no_grad():
            expected = torch.softmax(by_hand(**encoded).logits[0], -1)
            merged = torch.softmax(exported(**encoded).logits[0], -1)
        got = torch.tensor([prediction["probabilities"][name] for name in label_names])
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(merged, expected, atol=1e-5, rtol=1e-4)


def test_a_run_trained_with_flex_attention_predicts_with_sdpa(finished_runs, tmp_path, on_cpu, monkeypatch):
    """Flex attention is for packed training batches; predict pads its batches and loads the model with sdpa."""
    import shutil

    import yaml

    import sft.results.predict

    run_dir = shutil.copytree(finished_runs["causal_lm", "full"], tmp_path / "runs" / "flex")
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    config["model"]["attn_implementation"] = "flex_attention"
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config))
    loaded = []
    monkeypatch.setattr(sft.results.predict, "load_model",
                        lambda *a, **k: loaded.append(load_model(*a, **k)) or loaded[-1])
    predict(str(run_dir), str(write_jsonl(tmp_path / "p.jsonl", CHAT_ROWS[:2])), str(tmp_path / "o.jsonl"), 2, 3)
    assert loaded[0].config._attn_implementation == "sdpa"
    assert len(read_jsonl(tmp_path / "o.jsonl")) == 2


def test_a_model_setting_from_a_secret_variable_is_read_back_from_the_environment(finished_runs, tmp_path,
                                                                                    monkeypatch):
    """config.yaml records `${VAR}` for a value that came from a secret variable: using the run resolves it again,
    and says which variable to set when it is not."""
    import shutil

    import yaml

    run_dir = Path(shutil.copytree(finished_runs["causal_lm", "lora"], tmp_path / "run"))
    recorded = yaml.safe_load((run_dir / "config.yaml").read_text())
    base = recorded["model"]["name"]
    recorded["model"]["revision"] = "${MODEL_ACCESS_TOKEN}"  # as resolved_yaml writes a secret-derived value
    (run_dir / "config.yaml").write_text(yaml.safe_dump(recorded))
    monkeypatch.setenv("MODEL_ACCESS_TOKEN", "")  # so that teardown removes what reading .env sets below
    monkeypatch.delenv("MODEL_ACCESS_TOKEN")
    monkeypatch.chdir(tmp_path)  # no .env here
    with pytest.raises(UserError, match=r"config.yaml: model.revision comes from the secret variable "
                                        r"MODEL_ACCESS_TOKEN, which is not set here; export it or add it to .env"):
        open_trained_run(run_dir)
    (tmp_path / ".env").write_text("MODEL_ACCESS_TOKEN=main\n")
    run = open_trained_run(run_dir)
    assert (run.config.model.name, run.config.model.revision) == (base, "main")


def test_a_lora_base_with_only_pickle_weights_needs_allow_pickle_as_in_training(finished_runs, tiny_causal_lm,
                                                                                 tmp_path, on_cpu, capsys):
    """predict and export load a LoRA run's base by training's rules: pickle weights (pytorch_model.bin) only with
    model.allow_pickle in the run's config."""
    import shutil

    import torch
    import yaml
    from safetensors.torch import load_file

    pickled_base = tmp_path / "pickled-base"  # as older checkpoints ship: transformers 5 writes no pickle itself
    shutil.copytree(tiny_causal_lm, pickled_base, ignore=shutil.ignore_patterns("*.safetensors"))
    torch.save(load_file(tiny_causal_lm / "model.safetensors"), pickled_base / "pytorch_model.bin")
    assert (pickled_base / "pytorch_model.bin").is_file() and not list(pickled_base.glob("*.safetensors"))
    run_dir = Path(shutil.copytree(finished_runs["causal_lm", "lora"], tmp_path / "run"))
    recorded = yaml.safe_load((run_dir / "config.yaml").read_text())
    recorded["model"]["name"] = str(pickled_base)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(recorded))
    rows = write_jsonl(tmp_path / "rows.jsonl", [{"messages": CHAT_ROWS[0]["messages"][:1]}])

    assert main(["predict", str(run_dir), str(rows), "--output", str(tmp_path / "refused.jsonl")]) == 2
    assert main(["export", str(run_dir), "--merge", "--to", str(tmp_path / "refused")]) == 2
    errors = capsys.readouterr().err.splitlines()
    assert len(errors) == 2 and all(line.startswith("sft: error: model.name: ") and "pickle" in line
                                    and "model.allow_pickle: true" in line for line in errors), errors
    assert not (tmp_path / "refused.jsonl").exists() and not (tmp_path / "refused").exists()

    recorded["model"]["allow_pickle"] = True
    (run_dir / "config.yaml").write_text(yaml.safe_dump(recorded))
    assert main(["predict", str(run_dir), str(rows), "--output", str(tmp_path / "o.jsonl"),
                 "--max-new-tokens", "2"]) == 0
    assert len(read_jsonl(tmp_path / "o.jsonl")) == 1
    assert main(["export", str(run_dir), "--merge", "--to", str(tmp_path / "exported")]) == 0
    assert (tmp_path / "exported" / "model.safetensors").is_file()
