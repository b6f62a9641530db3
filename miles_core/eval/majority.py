"""maj@k: is the most common answer among k samples the correct one?

Self-consistency voting is how many users deploy a model, so it is reported beside pass@k.
maj@k uses the first k samples of a prompt (by sample_index): samples are i.i.d., so the first
k are a fair draw, and the answer is reproducible. Samples without an extractable answer do not
vote; a tie goes to the answer seen first; the voted answer is correct when its first sample is.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

__all__ = ["maj_at_k", "majority_vote"]


def majority_vote(keys: Sequence[str | None]) -> str | None:
    """The most frequent non-None key (ties: the earliest), or None when nothing voted."""
    counts = Counter(k for k in keys if k is not None)
    if not counts:
        return None
    best = max(counts.values())
    return next(k for k in keys if k is not None and counts[k] == best)


def maj_at_k(keys: Sequence[str | None], correct: Sequence[bool], k: int) -> float:
    """1.0 if the majority answer of the first `k` samples is correct, else 0.0."""
    if not 1 <= k <= len(keys):
        raise ValueError(f"maj@{k} needs at least {k} samples, got {len(keys)}")
    winner = majority_vote(keys[:k])
    if winner is None:
        return 0.0
    return 1.0 if correct[list(keys[:k]).index(winner)] else 0.0
