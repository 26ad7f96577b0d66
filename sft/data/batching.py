"""Token-budget batching: examples grouped so each batch holds about the same number of tokens, served straight
from the memory-mapped tokenized data, and the collator that flattens such a batch for padding-free training."""
from typing import Any, Sequence


def group_by_tokens(lengths: Sequence[int], max_tokens: int) -> list[list[int]]:
    """Pack example indices into batches of at most max_tokens tokens (best-fit decreasing).

    Every batch then does about the same work, which keeps a GPU busy where fixed example counts would not.
    Trainer's sampler shuffles the batches each epoch."""
    import bisect

    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    batches: list[list[int]] = []
    room: list[tuple[int, int]] = []  # (free tokens, batch index), sorted
    for index in order:
        slot = bisect.bisect_left(room, (lengths[index], -1))
        if slot < len(room):
            free, batch = room.pop(slot)
        else:
            free, batch = max_tokens, len(batches)
            batches.append([])
        batches[batch].append(index)
        bisect.insort(room, (free - lengths[index], batch))
    return batches


def example_lengths(examples) -> Any:
    """Tokens per example as a numpy array, read from the Arrow list offsets (no token is copied)."""
    import numpy as np
    import pyarrow.compute as pc

    return np.asarray(pc.list_value_length(examples.data.column("input_ids")).to_numpy(), dtype=np.int64)


class TokenBudgetBatches:
    """A dataset whose item i is batch i: its examples' input_ids and labels, read from the tokenized data on
    demand. The batch plan is two integer arrays, so nothing is copied per token."""

    def __init__(self, examples, max_tokens: int):
        import numpy as np

        self.examples = examples
        batches = group_by_tokens(example_lengths(examples).tolist(), max_tokens)
        self.order = np.fromiter((i for batch in batches for i in batch), dtype=np.int64)
        self.starts = np.cumsum([0] + [len(batch) for batch in batches])

    def __len__(self) -> int:
        return len(self.starts) - 1

    def __getitem__(self, index: int) -> dict:
        rows = self.examples[self.order[self.starts[index]:self.starts[index + 1]].tolist()]
        return {"input_ids": rows["input_ids"], "labels": rows["labels"]}


class TokenBudgetCollator:
    """Unpacks a token-budget batch (one dataset row holding several examples) into a flattened batch."""

    def __init__(self, flatten):
        self.flatten = flatten

    def __call__(self, rows: list[dict]) -> dict:
        examples = [{"input_ids": ids, "labels": labels}
                    for row in rows for ids, labels in zip(row["input_ids"], row["labels"])]
        return self.flatten(examples)
