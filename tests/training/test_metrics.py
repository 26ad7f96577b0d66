"""Metrics: scikit-learn over every declared class, answer-token accuracy against hand-computed references."""
import numpy as np
import pytest

from sft.training.metrics import CausalLMMetrics, ClassificationMetrics, answer_token_accuracy, eval_record


def test_classification_metrics_count_every_declared_class():
    """The model predicts class 2, which the eval set lacks: every metric must still cover all three classes."""
    from sklearn.metrics import confusion_matrix, f1_score, precision_recall_fscore_support
    from transformers import EvalPrediction

    labels = np.array([0, 0, 1, 1, 1, 0])
    predicted = np.array([0, 2, 1, 1, 0, 0])
    compute = ClassificationMetrics(["cat", "dog", "bird"])
    scalars = compute(EvalPrediction(predictions=np.eye(3)[predicted], label_ids=labels))
    assert scalars == {"accuracy": 4 / 6,
                       "macro_f1": f1_score(labels, predicted, labels=[0, 1, 2], average="macro", zero_division=0),
                       "weighted_f1": f1_score(labels, predicted, labels=[0, 1, 2], average="weighted",
                                               zero_division=0)}
    # Averaging over the classes present in the eval set only (the old hand-computed F1) gives another number.
    assert scalars["macro_f1"] != f1_score(labels, predicted, labels=[0, 1], average="macro", zero_division=0)

    report = compute.latest
    precision, recall, f1, support = precision_recall_fscore_support(labels, predicted, labels=[0, 1, 2],
                                                                     zero_division=0)
    assert list(report["per_class"]) == ["cat", "dog", "bird"]
    for i, name in enumerate(["cat", "dog", "bird"]):
        assert report["per_class"][name] == {"precision": precision[i], "recall": recall[i], "f1": f1[i],
                                             "support": support[i]}
    assert report["per_class"]["bird"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0}
    assert report["confusion_matrix"] == confusion_matrix(labels, predicted, labels=[0, 1, 2]).tolist()
    assert report["confusion_matrix"] == [[2, 0, 1], [1, 2, 0], [0, 0, 0]]  # rows: true class, columns: predicted

    record = eval_record(12, 1.0, {"eval_loss": 0.5, "eval_accuracy": 4 / 6, "eval_runtime": 1.2}, compute)
    assert record["step"] == 12 and "eval_runtime" not in record and "eval_perplexity" not in record
    assert record["confusion_matrix"] == report["confusion_matrix"] and record["label_names"] == ["cat", "dog", "bird"]


def test_answer_token_accuracy_counts_answer_tokens_only():
    """Position i predicts token i+1. Row 1: prompt (-100) then answer 7, 3; row 2: padded by Trainer with -100 in
    predictions and labels alike. Answer positions: 7 right, 3 wrong (9), 4 right, 6 wrong (8) → 2 of 4."""
    predicted = np.array([[5, 7, 9, 2, 1],
                          [4, 8, 0, -100, -100]])
    labels = np.array([[-100, -100, 7, 3, -100],
                       [-100, 4, 6, -100, -100]])
    assert answer_token_accuracy(predicted, labels) == 0.5


def test_causal_lm_metrics_from_logits():
    """The whole path as Trainer runs it: logits → argmax per token (preprocess_logits_for_metrics) → accuracy."""
    import torch
    from transformers import EvalPrediction

    from sft.training.metrics import predicted_token_ids

    labels = torch.tensor([[-100, 2, 1, 3]])
    logits = torch.full((1, 4, 5), -1.0)
    for position, token in enumerate([2, 0, 3, 4]):  # predicts 2 (right), 0 (wrong: 1), 3 (right); last unused
        logits[0, position, token] = 1.0
    compute = CausalLMMetrics()
    ids = predicted_token_ids(logits, labels)
    assert compute(EvalPrediction(predictions=ids.numpy(), label_ids=labels.numpy())) == {
        "token_accuracy": pytest.approx(2 / 3)}
    record = eval_record(3, 0.5, {"eval_loss": 2.0}, compute)
    assert record["eval_perplexity"] == pytest.approx(np.exp(2.0))


def test_overfitting_streak_counts_evaluations_where_eval_loss_rose_while_training_loss_fell():
    def run(*intervals):  # (training losses since the previous evaluation, eval loss)
        return [record for train, eval_loss in intervals
                for record in [{"loss": loss} for loss in train] + [{"eval_loss": eval_loss}]]

    from sft.training.metrics import overfitting_streak

    assert overfitting_streak(run(([3, 2], 2.0), ([1.5], 1.8), ([1.0], 1.9), ([0.5], 2.2))) == 2
    assert overfitting_streak(run(([3, 2], 2.0), ([1.5], 2.1), ([1.0], 2.0), ([0.5], 2.2))) == 1  # fell in between
    assert overfitting_streak(run(([3, 2], 2.0), ([2.5], 2.1), ([3.0], 2.2))) == 0  # training loss rose too
    assert overfitting_streak(run(([3, 2], 2.0))) == 0


def test_overfitting_warning_is_logged_once_the_streak_is_long_enough(tmp_path, caplog):
    import logging
    from types import SimpleNamespace

    from sft.training.callbacks import OverfittingWarningCallback

    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 3.0}\n{"step": 1, "eval_loss": 2.0}\n')
    callback = OverfittingWarningCallback(tmp_path, evaluations=2)
    state = SimpleNamespace(is_world_process_zero=True)
    callback.on_train_begin(None, state, None)  # a resumed run: the first evaluation is in metrics.jsonl
    logger = logging.getLogger("sft")
    logger.addHandler(caplog.handler)
    try:
        for logs in ({"loss": 2.0}, {"eval_loss": 2.1}, {"loss": 1.0}, {"eval_loss": 2.2}):
            before = len(caplog.records)
            callback.on_log(None, state, None, logs=logs)
            warned = [r.getMessage() for r in caplog.records[before:] if r.levelno == logging.WARNING]
            if logs.get("eval_loss") == 2.2:
                assert warned and "eval loss has risen for 2 evaluations in a row while training loss fell" in warned[0]
            else:
                assert not warned
    finally:
        logger.removeHandler(caplog.handler)
