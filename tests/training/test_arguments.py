"""Trainer's arguments as `sft train` and `sft check` build them (sft/training/arguments.py)."""
import yaml
from conftest import tiny_lm_config

from sft.config import load_config
from sft.training.arguments import training_arguments


def test_unset_steps_keep_trainers_defaults_and_the_run_trains(tiny_causal_lm, tiny_chat_data, tmp_path):
    """save_strategy/eval_strategy steps without save_steps/eval_steps: what TrainingArguments alone chooses (500, and
    logging_steps). Passed on as None, save_steps made TrainingArguments fail with a TypeError after the data and
    the model had loaded."""
    from transformers import TrainingArguments

    from sft.training.trainer import run_training

    raw = tiny_lm_config(tiny_causal_lm, tiny_chat_data, tmp_path / "runs", max_steps=2, save_strategy="steps",
                         eval_strategy="steps")
    raw["data"]["eval_fraction"] = 0.25
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(raw))
    config = load_config(path)
    args = training_arguments(config, tmp_path / "out")
    alone = TrainingArguments(output_dir=str(tmp_path / "alone"), save_strategy="steps", eval_strategy="steps",
                              logging_steps=1, use_cpu=True, report_to="none")
    assert (args.save_steps, args.eval_steps) == (alone.save_steps, alone.eval_steps) == (500, 1)
    assert run_training(config).metrics["steps"] == 2
