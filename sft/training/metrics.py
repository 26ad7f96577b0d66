"""Evaluation metrics: scikit-learn over every declared class for classification, loss / perplexity / answer-token
accuracy for causal LMs; the latest evaluation in full (per-class table, confusion matrix) in eval_metrics.json."""
import math


def classification_report(labels, predicted, label_names: list[str]) -> dict:
    """Accuracy, macro/weighted F1, per-class precision/recall/F1/support and the confusion matrix, over every
    declared class: a class the eval set lacks but the model predicts still counts (scikit-learn with `labels=`)."""
    from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, precision_recall_fscore_support

    classes = list(range(len(label_names)))
    precision, recall, f1, support = precision_recall_fscore_support(labels, predicted, labels=classes,
                                                                     zero_division=0)
    return {"accuracy": float(accuracy_score(labels, predicted)),
            "macro_f1": float(f1_score(labels, predicted, labels=classes, average="macro", zero_division=0)),
            "weighted_f1": float(f1_score(labels, predicted, labels=classes, average="weighted", zero_division=0)),
            "per_class": {name: {"precision": float(precision[i]), "recall": float(recall[i]), "f1": float(f1[i]),
                                 "support": int(support[i])} for i, name in enumerate(label_names)},
            # Rows: true class, columns: predicted class, both in label_names order.
            "confusion_matrix": confusion_matrix(labels, predicted, labels=classes).tolist(),
            "label_names": list(label_names)}


class ClassificationMetrics:
    """Trainer's compute_metrics: logs the scalars and keeps the latest evaluation's full report."""

    def __init__(self, label_names: list[str]):
        self.label_names = label_names
        self.latest: dict = {}

    def __call__(self, prediction) -> dict:
        import numpy as np

        logits = prediction.predictions[0] if isinstance(prediction.predictions, tuple) else prediction.predictions
        self.latest = classification_report(prediction.label_ids, np.argmax(logits, axis=-1), self.label_names)
        return {k: v for k, v in self.latest.items() if isinstance(v, float)}


def predicted_token_ids(logits, labels):
    """Trainer's preprocess_logits_for_metrics: keep the argmax token only, not vocabulary-wide logits for every
    eval token (gigabytes for a real vocabulary)."""
    return (logits[0] if isinstance(logits, tuple) else logits).argmax(dim=-1)


class CausalLMMetrics:
    """Trainer's compute_metrics for causal LMs: the share of answer tokens (labels != -100, i.e. what the loss
    is computed on) that the model predicts exactly. Eval loss and perplexity come from Trainer's loss."""

    def __init__(self):
        self.latest: dict = {}

    def __call__(self, prediction) -> dict:
        self.latest = {"token_accuracy": answer_token_accuracy(prediction.predictions, prediction.label_ids)}
        return dict(self.latest)


def answer_token_accuracy(predicted_ids, labels) -> float:
    """Position i predicts token i+1; the labels' -100 (prompt, padding, the first token of each packed example)
    leave those positions out. Trainer pads predictions and labels with -100 alike when it concatenates batches."""
    import numpy as np

    predicted, target = np.asarray(predicted_ids)[:, :-1], np.asarray(labels)[:, 1:]
    answer = target != -100
    return float((predicted[answer] == target[answer]).mean()) if answer.any() else 0.0


def perplexity(eval_loss: float) -> float:
    return math.exp(min(eval_loss, 50))  # capped: an untrained model's loss would overflow to inf


def eval_record(step: int, epoch: float, trainer_metrics: dict, compute_metrics) -> dict:
    """One evaluation in full: Trainer's scalars (timings left out), perplexity for causal LMs, and the per-class
    table and confusion matrix that compute_metrics kept."""
    record = {"step": step, "epoch": round(epoch, 4),
              **{k: v for k, v in trainer_metrics.items() if not k.endswith(("runtime", "per_second"))}}
    if "eval_loss" in trainer_metrics and not isinstance(compute_metrics, ClassificationMetrics):
        record["eval_perplexity"] = perplexity(trainer_metrics["eval_loss"])
    if compute_metrics is not None:
        record.update({k: v for k, v in compute_metrics.latest.items() if not isinstance(v, float)})
    return record


def overfitting_streak(records: list[dict]) -> int:
    """How many of the latest evaluations in a row saw eval loss rise while the mean training loss logged since the
    previous evaluation fell. Records as in metrics.jsonl, oldest first."""
    intervals, train = [], []  # per evaluation: (eval loss, mean training loss since the previous one)
    for record in records:
        if "loss" in record:
            train.append(record["loss"])
        if "eval_loss" in record:
            intervals.append((record["eval_loss"], sum(train) / len(train) if train else None))
            train = []
    streak = 0
    for (eval_before, train_before), (eval_now, train_now) in zip(intervals, intervals[1:]):
        overfitting = (eval_now > eval_before and train_before is not None and train_now is not None
                       and train_now < train_before)
        streak = streak + 1 if overfitting else 0
    return streak
