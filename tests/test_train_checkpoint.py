"""Trainer checkpoints: bit-exact resume on CPU, and the torch_dist (megatron-core) layout.

Resume: 2 rollout batches trained straight must equal 1 batch + save + load (into a fresh process
state: new model, new optimizer) + 1 batch, bit for bit: weights, Adam moments, metrics. The run
uses warm-up + cosine decay, weight decay, 2 optimizer steps per batch, shuffled mini-batches and an
MTP layer, so the step count, the schedule, the shuffle RNG and every moment must come back exactly.
"""

import os

import pytest
import torch

from miles_core.checkpoint import hf_to_torch_dist, torch_dist_to_hf
from miles_core.checkpoint.torch_dist_io import TorchDistReader
from miles_core.data.rollouts import rollouts_table
from miles_core.model import load_model
from miles_core.train import TrainConfig, Trainer, load_policy, samples_from_table
from tests.test_train_support import random_prompts, rows_from, sample, tiny_model

PROMPT, N, NEW = 4, 4, 5
CASES = {
    "qwen3_moe_stacked": dict(kind="qwen3_moe", mlp_only_layers=[]),
    "deepseek_v3_mtp": dict(kind="deepseek_v3", mtp=1),
}


def _config():
    return TrainConfig(
        lr=1e-2, warmup_steps=1, decay="cosine", decay_steps=6, min_lr=1e-3, weight_decay=0.01,
        steps_per_rollout=2, shuffle=True, micro_batch_tokens=96, mtp_loss_scale=0.3, seed=3,
    )  # fmt: skip


def _batches(model, n=2):
    out = []
    for i in range(n):
        ids, lp, experts = sample(model, random_prompts(6, PROMPT, seed=10 + i), N, NEW, seed=20 + i)
        rewards = torch.rand(ids.shape[0], generator=torch.Generator().manual_seed(30 + i))
        out.append(rollouts_table(rows_from(ids, lp, experts, PROMPT, rewards, N, iteration=i)))
    return out


def _state(trainer):
    weights = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    moments = {
        (n, k): trainer.optimizer.state[p][k].clone()
        for n, p in trainer.model.named_parameters()
        if p in trainer.optimizer.state
        for k in ("exp_avg", "exp_avg_sq")
    }
    return weights, moments


@pytest.mark.parametrize("case", list(CASES))
def test_resume_two_steps_equal_one_step_save_load_one_step_bit_for_bit(case, tmp_path):
    spec = dict(CASES[case])
    kind, mtp = spec.pop("kind"), spec.pop("mtp", 0)
    batches = _batches(tiny_model(kind, seed=1, mtp=mtp, **spec))

    straight = Trainer(tiny_model(kind, seed=2, mtp=mtp, **spec), _config())
    m_straight = [straight.train_rollouts(samples_from_table(b)) for b in batches]

    first = Trainer(tiny_model(kind, seed=2, mtp=mtp, **spec), _config())
    m_first = first.train_rollouts(samples_from_table(batches[0]))
    first.save(str(tmp_path / "ckpt"))
    torch.manual_seed(12345)  # the resumed run must not depend on the RNG state it starts in

    resumed = Trainer(load_policy(str(tmp_path / "ckpt")), _config())
    resumed.load(str(tmp_path / "ckpt"))
    assert resumed.step == 2
    m_second = resumed.train_rollouts(samples_from_table(batches[1]))

    w1, mo1 = _state(straight)
    w2, mo2 = _state(resumed)
    assert w1.keys() == w2.keys() and mo1.keys() == mo2.keys() and mo1
    assert all(torch.equal(w1[k], w2[k]) for k in w1), [k for k in w1 if not torch.equal(w1[k], w2[k])][:3]
    assert all(torch.equal(mo1[k], mo2[k]) for k in mo1)
    drop = ("step_seconds", "tokens_per_s")
    strip = lambda ms: [{k: v for k, v in m.items() if k not in drop} for m in ms]  # noqa: E731
    assert strip(m_straight[0]) == strip(m_first)
    assert strip(m_straight[1]) == strip(m_second)
    assert (m_second[-1]["mtp_loss"] > 0) == bool(mtp)


def test_checkpoint_is_megatron_torch_dist_readable_by_the_converter(tmp_path):
    model = tiny_model("qwen3_moe", seed=5, mlp_only_layers=[])
    trainer = Trainer(model, TrainConfig(lr=1e-2, micro_batch_tokens=256))
    trainer.train_rollouts(samples_from_table(_batches(tiny_model("qwen3_moe", seed=6, mlp_only_layers=[]), 1)[0]))
    ckpt = str(tmp_path / "ckpt")
    it_dir = trainer.save(ckpt)
    with open(os.path.join(ckpt, "latest_checkpointed_iteration.txt")) as f:
        assert f.read() == "1"
    assert os.path.basename(it_dir) == "iter_0000001"
    for f in (".metadata", "metadata.json", "common.pt"):
        assert os.path.exists(os.path.join(it_dir, f))
    keys = TorchDistReader(it_dir).tensors
    assert "decoder.layers.self_attention.linear_qkv.weight" in keys  # stacked [L, ...], megatron-core naming
    assert "decoder.layers.mlp.experts.experts.linear_fc1.weight" in keys
    assert "optimizer.state.exp_avg.decoder.layers.self_attention.linear_qkv.weight" in keys

    # trainer checkpoint -> HF (the converter) -> the same logits; HF -> torch_dist gives the same model keys
    hf = torch_dist_to_hf(ckpt, str(tmp_path / "hf"))
    reloaded = load_model(hf)
    ids = torch.randint(0, 96, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, model(ids).logits)
    back = hf_to_torch_dist(hf, str(tmp_path / "converted"))
    conv = TorchDistReader(os.path.join(back, "iter_0000000")).tensors
    model_keys = {k: tuple(v.size) for k, v in keys.items() if not k.startswith("optimizer.")}
    assert model_keys == {k: tuple(v.size) for k, v in conv.items()}
