"""Partial rollout: rounds with a budget, unfinished samples carried into the next round.

Long responses dominate a rollout's tail: most slots sit idle while a few samples run to their
max length. A round with a budget (generated tokens, or seconds) stops there instead; every
sample still running is evicted with everything it has (prefix, per-token log-probs, experts,
the weight version of each token) and marked `aborted`. The next round, perhaps under newer
weights, resumes those samples *first*: their prompt + partial response is prefilled again (under
the weights of that round) and decoding continues. Each token keeps the version that produced
it (`Sample.versions`, the `logprob_versions` column), so training can mask or importance-correct
the old-policy tokens (`miles_core.rl.off_policy.stale_tokens` / `correct_stale`).

A GRPO group is emitted only when all its samples are finished, since its advantages need every
reward of the group; finished members of an unfinished group wait with it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from miles_core.errors import MilesError
from miles_core.rollout.sequence import Request, Sample

__all__ = ["Budget", "PartialRollout", "RoundResult"]


@dataclass(frozen=True)
class Budget:
    """A round stops when it has generated `tokens` tokens or run `seconds` seconds (whichever first)."""

    tokens: int | None = None
    seconds: float | None = None

    @classmethod
    def parse(cls, text: str | None) -> Budget | None:
        """`2000` (tokens), `2000t`, `30s`, `5m` -> a Budget; None or empty -> None."""
        if not text:
            return None
        t = text.strip().lower()
        try:
            if t.endswith("s"):
                return cls(seconds=float(t[:-1]))
            if t.endswith("m"):
                return cls(seconds=60 * float(t[:-1]))
            return cls(tokens=int(t.rstrip("t")))
        except ValueError:
            raise MilesError(f"budget must look like 2000 (tokens), 30s or 5m, got {text!r}") from None

    def clock(self) -> BudgetClock:
        return BudgetClock(self)


@dataclass
class BudgetClock:
    budget: Budget
    start: float = field(default_factory=time.monotonic)
    tokens: int = 0

    def spend(self, tokens: int) -> None:
        self.tokens += tokens

    @property
    def exhausted(self) -> bool:
        b = self.budget
        if b.tokens is not None and self.tokens >= b.tokens:
            return True
        return b.seconds is not None and time.monotonic() - self.start >= b.seconds


@dataclass
class RoundResult:
    groups: list[list[Sample]]  # finished groups, every sample completed or truncated
    aborted: list[Sample]  # samples interrupted this round (snapshots are the Sample objects themselves)
    carried: int  # samples (finished or not) waiting for the next round


class PartialRollout:
    """Runs rounds on an engine; keeps unfinished groups and resumes their samples first."""

    def __init__(self, engine, budget: Budget | None):
        self.engine, self.budget = engine, budget
        self._groups: dict[int, list[Sample]] = {}  # id(request) -> its samples, in arrival order
        self._pending: list[Sample] = []  # unfinished samples, resumed first

    def submit(self, requests: list[Request]) -> None:
        samples = self.engine.samples_for(requests)
        for s in samples:
            self._groups.setdefault(id(s.request), []).append(s)
        self._pending.extend(samples)

    def state(self) -> list[Sample]:
        """Every carried sample (unfinished ones and finished members of unfinished groups): what a
        later PartialRollout, perhaps in another process, needs to `restore` and resume them."""
        return [s for group in self._groups.values() for s in group]

    def restore(self, samples: list[Sample]) -> None:
        """Carry `samples` from an earlier `state()` (e.g. unpickled) into this rollout; samples of one
        group must share their Request object, as they do in `state()`."""
        for s in samples:
            s.slot, s.fed = None, 0  # engine-internal; the resume prefills prompt + partial response
            self._groups.setdefault(id(s.request), []).append(s)
            if not s.finished:
                self._pending.append(s)

    @property
    def carried(self) -> int:
        return sum(len(g) for g in self._groups.values())

    def run_round(self, requests: list[Request] | None = None, on_step=None) -> RoundResult:
        """Resume carried samples first, then start `requests`; stop at the budget."""
        resumed = [s for s in self._pending if s.status == "aborted"]
        fresh = [s for s in self._pending if s.status != "aborted"]
        self._pending = []
        if requests:
            self.submit(requests)
            fresh += self._pending
            self._pending = []
        unfinished = self.engine.run(resumed + fresh, self.budget, on_step=on_step)
        self._pending = unfinished
        aborted = [s for s in unfinished if s.status == "aborted"]
        done = []
        for key, group in list(self._groups.items()):
            if all(s.finished for s in group):
                done.append(group)
                del self._groups[key]
        return RoundResult(groups=done, aborted=aborted, carried=self.carried)
