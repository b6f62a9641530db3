"""Sampling: parameters, the sampled token's log-prob, and counter-based per-request randomness.

Two quantities come out of every step and they must not be confused:

- the *recorded* log-prob is `log_softmax(logits / T)[token]` in float32, with nothing else
  applied (no top-k/top-p/min-p). It is exactly what the trainer recomputes
  (`miles_core.rl.logits.token_logprobs`), so with identical weights the train-rollout mismatch is
  zero. Greedy (T = 0) records the T = 1 log-prob.
- the *sampling* distribution is softmax(logits / T) restricted by top-k, then top-p (on the
  renormalised top-k distribution), then min-p, and renormalised.

Randomness is counter-based: the uniform draw of a sample's token number `step` is a hash of
(seed, step), made with integer tensor ops. A sample's tokens therefore depend only on its own
seed and logits: not on which other requests share the batch, not on how many rounds a partial
rollout took, and no per-request `torch.Generator` has to live on the device (the whole function
is capturable in a CUDA graph). A token is drawn by inverse CDF with that one uniform; rows that
filter work over probabilities sorted high to low, rows that don't over the vocabulary order.
Which path a row takes depends on its own parameters only, so batching never changes a sample.
"""

from __future__ import annotations

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from miles_core.errors import MilesError
from miles_core.kernels import sampler as sampler_kernels

__all__ = [
    "SamplingParams",
    "SamplingTensors",
    "device_tensor",
    "logprob_temperature",
    "sample",
    "sampling_probs",
    "uniform",
]


class SamplingParams(BaseModel):
    """How one request is sampled. temperature 0 = greedy; top_k 0 = off; top_p 1 = off; min_p 0 = off."""

    model_config = ConfigDict(extra="forbid")

    temperature: float = Field(1.0, ge=0.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0)
    min_p: float = Field(0.0, ge=0.0, le=1.0)
    max_new_tokens: int = Field(256, ge=1)
    stop_token_ids: list[int] = Field(default_factory=list)
    stop: list[str] = Field(default_factory=list, description="stop strings, matched on the decoded response")
    ignore_eos: bool = Field(False, description="do not stop at the tokenizer's EOS (stop_token_ids still apply)")
    seed: int | None = Field(None, description="per-request seed; None = drawn from the engine's seed")

    @model_validator(mode="after")
    def _check(self) -> SamplingParams:
        if any(not s for s in self.stop):
            raise MilesError("stop strings must be non-empty")
        return self

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def logprob_temperature(params: SamplingParams) -> float:
    """The T of the recorded log-prob (and of the trainer's): the sampling temperature, 1 for greedy."""
    return params.temperature if params.temperature > 0 else 1.0


class SamplingTensors:
    """Per-row sampling parameters as tensors (one row per sample being stepped).

    Built once per set of running samples (the engine keeps it while the set is unchanged) and
    given each step's counters with `at_steps`. Host-to-device copies go through pinned memory
    without a stream sync, so building them never waits for the decode step queued before.
    """

    def __init__(self, params: list[SamplingParams], seeds: list[int], steps: list[int], device):
        self.device = torch.device(device)
        self.temperature = self._tensor([p.temperature for p in params], torch.float32)  # [N], 0 = greedy
        self.top_p = self._tensor([p.top_p for p in params], torch.float32)
        self.top_k = self._tensor([p.top_k for p in params], torch.int64)
        self.min_p = self._tensor([p.min_p for p in params], torch.float32)
        self.seed = self._tensor([s % 2**63 for s in seeds], torch.int64)
        self.greedy = [p.greedy for p in params]
        self.filters = [not p.greedy and (p.top_k > 0 or p.top_p < 1.0 or p.min_p > 0.0) for p in params]
        self.unit_temperature = all(p.temperature in (0.0, 1.0) for p in params)  # logits / T is the logits
        self.at_steps(steps)

    def at_steps(self, steps: list[int]) -> SamplingTensors:
        """Set each row's token counter (the `step` of its uniform draw); returns self."""
        self.step = self._tensor(steps, torch.int64)
        return self

    def _tensor(self, values: list, dtype: torch.dtype) -> torch.Tensor:
        return device_tensor(values, dtype, self.device)


def device_tensor(values: list, dtype: torch.dtype, device) -> torch.Tensor:
    """torch.tensor(values, device=device) without the stream sync of a pageable copy on CUDA."""
    host = torch.tensor(values, dtype=dtype)
    if torch.device(device).type != "cuda":
        return host.to(device)
    return host.pin_memory().to(device, non_blocking=True)  # the caching host allocator keeps it alive


_M32 = 0xFFFFFFFF


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash (lowbias32) on int64 tensors; products may wrap, the low 32 bits are exact."""
    x = x & _M32
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _M32
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & _M32
    return x ^ (x >> 16)


def uniform(seed: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
    """Counter-based uniforms in (0, 1): seed, step [N] int64 -> [N] float32 (24 random bits)."""
    h = _mix32(seed ^ 0x5BD1E995)
    h = _mix32(h ^ ((seed >> 32) & _M32))
    h = _mix32(h ^ ((step * 0x9E3779B1) & _M32))
    h = _mix32(h + (step >> 32))
    return ((h >> 8).float() + 0.5) / float(1 << 24)


def _scaled(logits: torch.Tensor, st: SamplingTensors) -> torch.Tensor:
    """logits [N, V] -> float32 logits / T, with T = 1 on greedy rows (the recorded log-prob's T)."""
    if st.unit_temperature:  # x / 1.0 == x bit for bit: skip a vocabulary-sized pass
        return logits.float()
    t = torch.where(st.temperature > 0, st.temperature, torch.ones_like(st.temperature))
    return logits.float() / t[:, None]


def _filtered_sorted(scaled: torch.Tensor, st: SamplingTensors, rows: torch.Tensor):
    """Rows that filter: (probs sorted high to low, renormalised over the kept set, [n, V]; sort index)."""
    sorted_logits, order = scaled.sort(dim=-1, descending=True)  # [n, V]
    v = scaled.shape[-1]
    rank = torch.arange(v, device=scaled.device)[None]  # [1, V]
    k = st.top_k[rows]
    sorted_logits = sorted_logits.masked_fill((k[:, None] > 0) & (rank >= k[:, None]), float("-inf"))
    probs = sorted_logits.softmax(-1)
    before = probs.cumsum(-1) - probs  # mass strictly above each token
    drop = before >= st.top_p[rows][:, None]
    drop[:, 0] = False  # the most likely token always stays
    probs = probs.masked_fill(drop, 0.0)
    probs = probs.masked_fill(probs < st.min_p[rows][:, None] * probs[:, :1], 0.0)
    return probs / probs.sum(-1, keepdim=True), order


def sampling_probs(logits: torch.Tensor, st: SamplingTensors) -> torch.Tensor:
    """The distribution each non-greedy row samples from, in vocabulary order: [N, V] float32 (tests, metrics)."""
    scaled = _scaled(logits, st)
    probs = scaled.softmax(-1)
    rows = torch.tensor([i for i, f in enumerate(st.filters) if f], dtype=torch.long, device=logits.device)
    if rows.numel():
        sorted_probs, order = _filtered_sorted(scaled[rows], st, rows)
        probs[rows] = torch.zeros_like(sorted_probs).scatter_(1, order, sorted_probs)
    return probs


def _inverse_cdf(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """probs [n, V] (any order, rows need not sum to 1), u [n] -> index [n] of the first cdf > u * total."""
    cdf = probs.cumsum(-1)  # [n, V]
    idx = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None], right=True)[:, 0]
    return idx.clamp(max=probs.shape[-1] - 1)


def sample(logits: torch.Tensor, st: SamplingTensors) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [N, V] -> (tokens [N] int64, recorded log-probs [N] float32 of those tokens under logits / T).

    On CUDA, greedy and plain rows go through two Triton launches (`kernels.sampler`) instead of the
    ~20 torch passes below, whatever else is in the batch (so a row's draw never depends on its batch);
    they draw the same tokens up to float32 rounding at a CDF boundary. Rows that filter stay torch."""
    fused = sampler_kernels.available(logits)
    if fused:
        fused_tokens, fused_logp = sampler_kernels.sample_plain(logits, st.temperature, st.seed, st.step)
        if not any(st.filters):
            return fused_tokens, fused_logp
    scaled = _scaled(logits, st)  # [N, V] float32
    logp = scaled.log_softmax(-1)
    plain = [i for i, (g, f) in enumerate(zip(st.greedy, st.filters, strict=True)) if not g and not f]
    filt = [i for i, f in enumerate(st.filters) if f]
    if len(plain) == len(st.greedy):  # every row samples softmax(logits / T) as it is: no argmax pass
        tokens = _inverse_cdf(logp.exp(), uniform(st.seed, st.step))
        return tokens, logp.gather(1, tokens[:, None])[:, 0]
    tokens = scaled.argmax(-1)  # greedy rows keep this
    if not plain and not filt:
        return tokens, logp.gather(1, tokens[:, None])[:, 0]
    u = uniform(st.seed, st.step)  # [N]
    device = logits.device
    if plain and not fused:
        rows = device_tensor(plain, torch.long, device)
        tokens[rows] = _inverse_cdf(logp[rows].exp(), u[rows])
    if filt:
        rows = device_tensor(filt, torch.long, device)
        probs, order = _filtered_sorted(scaled[rows], st, rows)
        tokens[rows] = order.gather(1, _inverse_cdf(probs, u[rows])[:, None])[:, 0]
    logp = logp.gather(1, tokens[:, None])[:, 0]
    if not fused:
        return tokens, logp
    keep = device_tensor(st.filters, torch.bool, device)  # [N] rows drawn here; the others are the kernels'
    return torch.where(keep, tokens, fused_tokens), torch.where(keep, logp, fused_logp)
