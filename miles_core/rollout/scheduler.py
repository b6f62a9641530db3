"""Continuous batching: which samples get a cache slot, and which prompts are prefilled this step.

Slots are the unit of admission. A waiting *unit* is a run of tokens to prefill plus the samples
that share it: a fresh group (n samples of one prompt) is one unit, prefilled once and copied into
its members' slots; a resumed partial sample is a unit of its own (prompt + partial response).
When fewer slots are free than a group has members, the group is split: the members that fit go
now (still sharing one prefill), the rest wait for the next free slots. Units are admitted in
queue order, resumed samples first, while slots are free and the step's padded prefill tokens
stay under `max_prefill_tokens` (at least one unit per step, so a long prompt always gets in).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from miles_core.rollout.sequence import Sample

__all__ = ["PrefillUnit", "Scheduler"]


@dataclass
class PrefillUnit:
    tokens: list[int]  # prompt, or prompt + partial response for a resumed sample
    samples: list[Sample]  # the samples whose cache starts from these tokens


def units_of(samples: list[Sample]) -> list[PrefillUnit]:
    """Adjacent fresh samples of the same request share a unit; a sample with progress is alone."""
    units: list[PrefillUnit] = []
    for s in samples:
        fresh = not s.response_tokens
        last = units[-1] if units else None
        if fresh and last is not None and last.samples[0].request is s.request and not last.samples[0].response_tokens:
            last.samples.append(s)
        else:
            units.append(PrefillUnit(list(s.prompt_tokens) + list(s.response_tokens), [s]))
    return units


class Scheduler:
    def __init__(self, slots: int, max_prefill_tokens: int):
        self.free: deque[int] = deque(range(slots))
        self.max_prefill_tokens = max_prefill_tokens
        self.waiting: deque[PrefillUnit] = deque()
        self.running: list[Sample] = []

    def enqueue(self, samples: list[Sample]) -> None:
        self.waiting.extend(units_of(samples))

    @property
    def idle(self) -> bool:
        return not self.waiting and not self.running

    def admit(self) -> list[PrefillUnit]:
        """Pop the units to prefill now and give each of their samples a slot."""
        units: list[PrefillUnit] = []
        longest = 0
        while self.waiting and self.free:
            unit = self.waiting[0]
            longest_if = max(longest, len(unit.tokens))
            if units and (len(units) + 1) * longest_if > self.max_prefill_tokens:
                break
            take = min(len(unit.samples), len(self.free))
            if take < len(unit.samples):  # split the group: these members now, the rest later
                self.waiting[0] = PrefillUnit(unit.tokens, unit.samples[take:])
                unit = PrefillUnit(unit.tokens, unit.samples[:take])
            else:
                self.waiting.popleft()
            for s in unit.samples:
                s.slot = self.free.popleft()
            units.append(unit)
            longest = longest_if
        for unit in units:
            self.running.extend(unit.samples)
        return units

    def release(self, sample: Sample) -> None:
        """Give a stopped sample's slot back (call after reading what the slot holds)."""
        self.free.append(sample.slot)
        sample.slot = None
        self.running.remove(sample)

    def drain_waiting(self) -> list[Sample]:
        """Samples never admitted, in queue order; the queue is emptied."""
        out = [s for unit in self.waiting for s in unit.samples]
        self.waiting.clear()
        return out
