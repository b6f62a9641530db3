"""Sampling: faithful to softmax(logits / T) with top-k / top-p / min-p applied (chi-square at a
fixed seed), and reproducible per request whatever the batch around it."""

import math

import pytest
import torch

from miles_core.rollout import Engine, EngineConfig, Request, SamplingParams
from miles_core.rollout.sampling import SamplingTensors, sample, uniform
from tests.test_rollout_fixtures import one_thread, ragged_prompts, tiny  # noqa: F401

# chi-square 0.999 quantiles by degrees of freedom (p = 0.001)
CHI2_999 = {1: 10.83, 2: 13.82, 3: 16.27, 4: 18.47, 5: 20.52, 6: 22.46, 7: 24.32, 8: 26.12, 9: 27.88, 10: 29.59}
V, N = 10, 40000


def _reference(logits: torch.Tensor, t: float, top_k: int, top_p: float, min_p: float) -> torch.Tensor:
    """The expected distribution, written independently: plain Python over the sorted vocabulary."""
    probs = torch.softmax(logits.double() / t, -1).tolist()
    order = sorted(range(len(probs)), key=lambda i: -probs[i])
    keep = order[:top_k] if top_k else order
    total = sum(probs[i] for i in keep)
    kept, mass = [], 0.0
    for i in keep:  # top-p on the renormalised top-k distribution: keep while the mass before < p
        if mass < top_p or not kept:
            kept.append(i)
        mass += probs[i] / total
    pmax = max(probs[i] for i in kept)
    kept = [i for i in kept if probs[i] >= min_p * pmax]
    out = torch.zeros(len(probs), dtype=torch.float64)
    for i in kept:
        out[i] = probs[i]
    return out / out.sum()


def _draw(logits, params: SamplingParams, n=N, seed=1234):
    st = SamplingTensors([params] * n, [seed] * n, list(range(n)), "cpu")  # one request, n steps
    tokens, _ = sample(logits.expand(n, -1), st)
    return torch.bincount(tokens, minlength=logits.shape[-1]).double()


def _chi2(counts, expected):
    keep = expected > 0
    e = expected[keep] * counts.sum()
    return float(((counts[keep] - e) ** 2 / e).sum()), int(keep.sum()) - 1


LOGITS = torch.tensor([2.0, 1.5, 1.2, 0.9, 0.5, 0.3, 0.0, -0.5, -1.0, -2.0])


@pytest.mark.parametrize(
    "t,top_k,top_p,min_p",
    [(1.0, 0, 1.0, 0.0), (0.7, 0, 1.0, 0.0), (1.3, 5, 1.0, 0.0), (1.0, 0, 0.8, 0.0), (0.9, 6, 0.7, 0.0),
     (1.0, 0, 1.0, 0.3)],
)  # fmt: skip
def test_empirical_frequencies_match_filtered_softmax_chi_square(t, top_k, top_p, min_p):
    expected = _reference(LOGITS, t, top_k, top_p, min_p)
    counts = _draw(LOGITS[None], SamplingParams(temperature=t, top_k=top_k, top_p=top_p, min_p=min_p))
    assert counts[expected == 0].sum() == 0, "sampled a token the filters remove"
    stat, df = _chi2(counts, expected)
    assert stat < CHI2_999[df], f"chi2 {stat:.1f} >= {CHI2_999[df]} (df {df})"


def test_chi_square_rejects_sampling_without_the_filter():
    """The check has teeth: plain softmax samples fail against the top-k=3 distribution."""
    expected = _reference(LOGITS, 1.0, 3, 1.0, 0.0)
    counts = _draw(LOGITS[None], SamplingParams(temperature=1.0))
    assert counts[expected == 0].sum() > 0
    stat, df = _chi2(counts, expected)  # mass outside the top 3 is missing from the kept tokens
    assert stat > CHI2_999[df]


def test_uniforms_are_uniform_and_differ_across_seeds_and_steps():
    u = uniform(torch.full((N,), 99, dtype=torch.int64), torch.arange(N))
    assert u.min() > 0 and u.max() < 1
    counts = torch.histc(u, bins=10, min=0, max=1).double()
    stat, df = _chi2(counts, torch.full((10,), 0.1, dtype=torch.float64))
    assert stat < CHI2_999[df]
    v = uniform(torch.arange(N, dtype=torch.int64), torch.zeros(N, dtype=torch.int64))
    assert v.unique().numel() > 0.99 * N


def test_recorded_logprob_ignores_filters():
    """top-k changes what can be sampled, never the recorded log-prob (log softmax(logits / T))."""
    p = SamplingParams(temperature=0.5, top_k=2)
    tokens, logp = sample(LOGITS[None].expand(4, -1), SamplingTensors([p] * 4, [1] * 4, [0, 1, 2, 3], "cpu"))
    ref = torch.log_softmax(LOGITS / 0.5, -1)[tokens]
    assert torch.allclose(logp, ref.float(), atol=1e-6)
    assert set(tokens.tolist()) <= {0, 1}


def test_seeded_samples_are_identical_across_batch_compositions():
    _, _, model = tiny("qwen3_moe")
    prompts = ragged_prompts((7, 4, 10, 5), seed=5)
    target = Request("t", prompts[0], SamplingParams(temperature=1.0, top_p=0.95, max_new_tokens=10, seed=42), 2)
    alone = Engine(model, config=EngineConfig(max_slots=2, max_len=64)).generate([target])
    others = [Request(f"o{i}", p, SamplingParams(temperature=0.7, top_k=5, max_new_tokens=6)) for i, p in
              enumerate(prompts[1:])]  # fmt: skip
    for slots in (3, 8):
        mixed = Engine(model, config=EngineConfig(max_slots=slots, max_len=64, seed=slots)).generate(
            [others[0], target, *others[1:]]
        )
        got = [s for s in mixed if s.request is target]
        assert [s.response_tokens for s in got] == [s.response_tokens for s in alone]
        for x, y in zip(got, alone, strict=True):
            assert all(math.isclose(a, b, abs_tol=1e-6) for a, b in zip(x.logprobs, y.logprobs, strict=True))
    assert alone[0].response_tokens != alone[1].response_tokens  # group members have their own streams


def test_unseeded_requests_follow_the_engine_seed():
    _, _, model = tiny("qwen3")
    req = [Request("a", ragged_prompts((6,), seed=6)[0], SamplingParams(temperature=1.0, max_new_tokens=8))]

    def run(seed):
        return Engine(model, config=EngineConfig(max_slots=2, max_len=32, seed=seed)).generate(req)[0].response_tokens

    assert run(3) == run(3)
    assert run(3) != run(4)
