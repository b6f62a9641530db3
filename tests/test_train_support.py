"""Shared pieces of the trainer tests (no tests here): tiny models, a KV-less sampler, a toy task.

The sampler is deliberately the simplest correct one (a full forward per new token); it records
what the rollout engine records: float32 log-probs of the sampled tokens under softmax(logits / T)
and the routed experts of every position but the last, as Parquet rows of the DESIGN.md schema.
"""

from __future__ import annotations

import torch

from miles_core.model import build_model, init_weights
from miles_core.model.config import ModelConfig
from miles_core.rl import token_logprobs
from tests.tiny_models import CONFIGS, VOCAB


def tiny_model(kind: str = "qwen3_moe", seed: int = 0, mtp: int = 0, **kw):
    """A miles model from tests/tiny_models' config, random weights (fp32, CPU)."""
    hf = CONFIGS[kind](**kw).to_dict()
    model = build_model(ModelConfig.from_hf(hf), num_mtp_layers=mtp)
    init_weights(model, std=0.05, seed=seed)
    return model


@torch.no_grad()
def sample(model, prompts: torch.Tensor, n: int, new_tokens: int, temperature: float = 1.0, seed: int = 0):
    """prompts [P, Lp] -> (tokens [P*n, Lp+R], logprobs [P*n, R], experts [P*n, Lp+R-1, L, k] or None)."""
    g = torch.Generator().manual_seed(seed)
    ids = prompts.repeat_interleave(n, dim=0)  # [N, Lp]
    for _ in range(new_tokens):
        logits = model(ids).logits[:, -1].float() / temperature  # [N, V]
        nxt = torch.multinomial(torch.softmax(logits, -1), 1, generator=g)  # [N, 1]
        ids = torch.cat([ids, nxt], dim=1)
    out = model(ids[:, :-1], return_routed_experts=True)
    lp = token_logprobs(out.logits, ids[:, 1:], temperature)[:, prompts.shape[1] - 1 :]  # [N, R]
    return ids, lp, out.routed_experts


def rows_from(ids, logprobs, experts, prompt_len: int, rewards, n: int, iteration: int = 0, version: int = 0):
    """Rollout Parquet rows (dicts) for sampled sequences; prompt_id groups every n consecutive rows."""
    rows = []
    for i in range(ids.shape[0]):
        rows.append(
            {
                "prompt_id": f"p{i // n}",
                "sample_index": i % n,
                "iteration": iteration,
                "prompt_tokens": ids[i, :prompt_len].tolist(),
                "response_tokens": ids[i, prompt_len:].tolist(),
                "response": "",
                "rollout_logprobs": logprobs[i].float(),
                "routed_experts": None if experts is None else experts[i].to(torch.int16),
                "reward": float(rewards[i]),
                "status": "completed",
                "weight_version": version,
            }
        )
    return rows


def random_prompts(num: int, length: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (num, length), generator=g)


def parity_reward(ids: torch.Tensor, prompt_len: int) -> torch.Tensor:
    """Toy task: the fraction of response tokens with the parity of the prompt's first token. [N]."""
    want = ids[:, :1] % 2
    return ((ids[:, prompt_len:] % 2) == want).float().mean(-1)


def engine_rollout(engine, prompts: torch.Tensor, n: int, new_tokens: int, reward_fn, iteration: int, seed: int):
    """Generate with the rollout engine; rows scored by `reward_fn(prompt list, response list) -> float`."""
    from miles_core.rollout import Request, SamplingParams, sample_row

    params = [
        SamplingParams(max_new_tokens=new_tokens, ignore_eos=True, seed=seed * 1000 + i) for i in range(len(prompts))
    ]
    requests = [Request(f"p{i}", p.tolist(), params[i], n) for i, p in enumerate(prompts)]
    rows = [sample_row(s, iteration) for s in engine.generate(requests)]
    for row in rows:
        row["reward"] = float(reward_fn(list(row["prompt_tokens"]), list(row["response_tokens"])))
    return rows


def low_token_reward(prompt: list[int], response: list[int]) -> float:
    """Toy task: the fraction of response tokens with id < 16 (1/6 of the vocabulary)."""
    return sum(t < 16 for t in response) / max(len(response), 1)
