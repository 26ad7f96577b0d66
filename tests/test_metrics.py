"""Metrics: scikit-learn over every declared class, answer-token accuracy against hand-computed references."""
import numpy as np
import pytest

from sft.metrics import ClassificationMetrics, CausalLMMetrics, answer_token_accuracy, eval_record


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

    from sft.metrics import predicted_token_ids

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
