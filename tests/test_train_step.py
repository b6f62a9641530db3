"""The GRPO step's machinery: batching alignment, gradient accumulation, NaN guard, MTP, QAT, config."""

import copy
import math

import pyarrow as pa
import pytest
import torch

from miles_core.data.rollouts import rollouts_table
from miles_core.errors import MilesError
from miles_core.rl import token_logprobs
from miles_core.train import (
    TrainConfig,
    Trainer,
    lr_at,
    make_micro_batches,
    samples_from_table,
    samples_from_tokens,
)
from tests.test_train_support import random_prompts, rows_from, sample, tiny_model


def _table(model, seed=0, prompts=6, n=4, new=5, prompt_len=4, rewards=None):
    ids, lp, experts = sample(model, random_prompts(prompts, prompt_len, seed=seed), n, new, seed=seed + 1)
    if rewards is None:
        rewards = torch.rand(ids.shape[0], generator=torch.Generator().manual_seed(seed + 2))
    return rollouts_table(rows_from(ids, lp, experts, prompt_len, rewards, n))


def test_micro_batches_align_targets_logprobs_and_experts_to_positions():
    prompts = [[5, 6, 7], [8, 9]]
    responses = [[10, 11], [12, 13, 14, 15]]
    samples = samples_from_tokens(prompts, responses, logprobs=[[-1.0, -2.0], [-3.0, -4.0, -5.0, -6.0]])
    samples[0].routed_experts = torch.arange(4 * 2 * 3).view(4, 2, 3).to(torch.int16)  # n - 1 = 4 positions
    samples[1].routed_experts = torch.zeros(5, 2, 3, dtype=torch.int16)
    (mb,) = make_micro_batches(samples, token_budget=100, num_moe_layers=2, top_k=3)
    assert mb.index.tolist() == [1, 0]  # longest first
    r = 1  # sample 0: tokens 5 6 7 10 11 -> inputs 5 6 7 10, targets 6 7 10 11
    assert mb.input_ids[r, :4].tolist() == [5, 6, 7, 10] and mb.targets[r, :4].tolist() == [6, 7, 10, 11]
    assert mb.loss_mask[r].tolist() == [False, False, True, True, False]
    assert mb.rollout_logprobs[r].tolist() == [0.0, 0.0, -1.0, -2.0, 0.0]
    assert mb.attention_mask[r].tolist() == [True] * 4 + [False]
    assert torch.equal(mb.routed_experts[r, :4], samples[0].routed_experts.long())
    assert mb.routed_experts[r, 4].tolist() == [[0, 1, 2], [0, 1, 2]]  # padding replays valid experts


def test_micro_batches_respect_the_token_budget():
    samples = samples_from_tokens([[1] * 3] * 10, [[2] * k for k in range(1, 11)])
    mbs = make_micro_batches(samples, token_budget=24)
    assert sorted(i for mb in mbs for i in mb.index.tolist()) == list(range(10))
    for mb in mbs:
        assert mb.input_ids.numel() <= 24 or mb.input_ids.shape[0] == 1


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
def test_gradient_accumulation_over_micro_batches_equals_one_big_batch(agg):
    model = tiny_model(seed=21)
    table = _table(model, seed=3)
    grads, metrics = [], []
    for budget in (10_000, 20):  # one micro-batch vs many
        trainer = Trainer(copy.deepcopy(model), TrainConfig(lr=1e-2, loss_agg=agg, micro_batch_tokens=budget))
        seen = {}
        params = dict(trainer.model.named_parameters())
        hook = lambda opt, args, kwargs, seen=seen, params=params: seen.update(  # noqa: E731
            {n: p.grad.clone() for n, p in params.items() if p.grad is not None}
        )
        trainer.optimizer.register_step_pre_hook(hook)
        (m,) = trainer.train_rollouts(samples_from_table(table))
        grads.append(seen)
        metrics.append(m)
    assert len(trainer.micro_batches(samples_from_table(table))) > 4
    assert metrics[0]["tokens"] == metrics[1]["tokens"] and metrics[0]["loss"] == pytest.approx(
        metrics[1]["loss"], abs=1e-6
    )
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for n in grads[0]:
        torch.testing.assert_close(grads[0][n], grads[1][n], rtol=1e-4, atol=1e-7, msg=n)


def test_nan_guard_skips_the_update_reports_it_and_training_continues():
    model = tiny_model(seed=22)
    trainer = Trainer(model, TrainConfig(lr=1e-2, micro_batch_tokens=512, warmup_steps=2))
    before = copy.deepcopy(model.state_dict())
    rewards = torch.rand(24)
    rewards[5] = float("nan")  # a broken reward function
    (m,) = trainer.train_rollouts(samples_from_table(_table(model, seed=4, rewards=rewards)))
    assert m["skipped"] == 1.0 and not math.isfinite(m["loss"])
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # weights untouched
    assert not trainer.optimizer.state  # no moments written
    assert trainer.scheduler.last_epoch == 0  # the schedule did not advance
    (m,) = trainer.train_rollouts(samples_from_table(_table(model, seed=5)))
    assert m["skipped"] == 0.0 and math.isfinite(m["loss"])
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_without_the_guard_a_nan_reaches_the_weights():
    model = tiny_model(seed=22)
    trainer = Trainer(model, TrainConfig(lr=1e-2, micro_batch_tokens=512, nan_guard=False))
    rewards = torch.rand(24)
    rewards[5] = float("nan")
    trainer.train_rollouts(samples_from_table(_table(model, seed=4, rewards=rewards)))
    assert any(not torch.isfinite(p).all() for p in model.parameters())


def test_sft_loss_decreases():
    model = tiny_model(seed=23)
    trainer = Trainer(model, TrainConfig(mode="sft", lr=3e-3, micro_batch_tokens=512))
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(3, 96, (32, 4), generator=g)
    responses = (prompts.flip(-1) % 50) + 3  # a learnable map: reversed prompt, shifted
    samples = samples_from_tokens(prompts.tolist(), responses.tolist())
    losses = [trainer.train_rollouts(samples)[0]["sft/ce"] for _ in range(30)]
    assert losses[-1] < 0.5 * losses[0], losses


def test_online_mtp_with_detached_trunk_trains_only_the_mtp_layers():
    model = tiny_model("deepseek_v3", seed=24, mtp=1)
    table = _table(model, seed=6, rewards=torch.ones(24))  # equal rewards: zero advantages, zero policy grad
    trainer = Trainer(model, TrainConfig(lr=1e-2, mtp_loss_scale=1.0, mtp_detach_trunk=True, micro_batch_tokens=512))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    (m,) = trainer.train_rollouts(samples_from_table(table))
    assert m["mtp_loss"] > 0 and m["skipped"] == 0.0
    changed = {n for n, p in model.named_parameters() if not torch.equal(before[n], p)}
    assert changed and all(n.startswith("mtp.") for n in changed)
    assert "model.embed_tokens.weight" not in changed and "lm_head.weight" not in changed

    attached = tiny_model("deepseek_v3", seed=24, mtp=1)
    trainer = Trainer(attached, TrainConfig(lr=1e-2, mtp_loss_scale=1.0, mtp_detach_trunk=False,
                                            micro_batch_tokens=512))  # fmt: skip
    trainer.train_rollouts(samples_from_table(table))
    assert not torch.equal(before["model.embed_tokens.weight"], attached.model.embed_tokens.weight)


def test_int4_qat_fake_quantizes_experts_and_still_trains_them():
    model = tiny_model(seed=25)
    plain_logits = model(torch.arange(8)[None]).logits.detach()
    trainer = Trainer(model, TrainConfig(lr=1e-2, qat="int4", qat_group_size=32, micro_batch_tokens=512))
    assert trainer.qat_modules and all(n.endswith("mlp.experts") for n in trainer.qat_modules)
    assert not torch.equal(model(torch.arange(8)[None]).logits.detach(), plain_logits)
    before = model.model.layers[0].mlp.experts.gate_up_proj.detach().clone()
    (m,) = trainer.train_rollouts(samples_from_table(_table(model, seed=7)))
    assert m["skipped"] == 0.0
    assert not torch.equal(before, model.model.layers[0].mlp.experts.gate_up_proj)


def test_freeze_router_keeps_routers_fixed():
    model = tiny_model(seed=26)
    trainer = Trainer(model, TrainConfig(lr=1e-2, freeze_router=True, micro_batch_tokens=512))
    gate = model.model.layers[0].mlp.gate.weight.detach().clone()
    trainer.train_rollouts(samples_from_table(_table(model, seed=8)))
    assert torch.equal(gate, model.model.layers[0].mlp.gate.weight)


def test_drop_degenerate_groups_trains_only_informative_groups():
    model = tiny_model(seed=27)
    rewards = torch.tensor([1.0] * 4 + [0.0, 1.0, 0.0, 1.0] + [0.0] * 16)  # 6 groups of 4, one informative
    trainer = Trainer(model, TrainConfig(lr=1e-2, drop_degenerate_groups=True, micro_batch_tokens=512))
    (m,) = trainer.train_rollouts(samples_from_table(_table(model, seed=9, rewards=rewards)))
    assert m["advantage/degenerate_groups"] == 5.0 and m["advantage/dropped_samples"] == 20.0
    assert m["tokens"] == 4 * 5


def test_schedule_warms_up_then_decays_to_min_lr():
    cfg = TrainConfig(lr=1.0, min_lr=0.1, warmup_steps=2, decay="cosine", decay_steps=4)
    lrs = [lr_at(s, cfg) for s in range(8)]
    assert lrs[:2] == [0.5, 1.0] and lrs[2] == 1.0 and lrs[6] == pytest.approx(0.1) and lrs[7] == pytest.approx(0.1)
    lin = TrainConfig(lr=1.0, decay="linear", decay_steps=4)
    assert [lr_at(s, lin) for s in range(5)] == [1.0, 0.75, 0.5, 0.25, 0.0]


def test_bad_config_is_one_clear_miles_error(tmp_path):
    with pytest.raises(MilesError, match="eps_clip"):
        TrainConfig.load(None, eps_clip=-1)
    with pytest.raises(MilesError, match="no_such_field"):
        TrainConfig.load({"no_such_field": 1})
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  lr: 3.0e-6\n  tis: true\n")
    cfg = TrainConfig.load(str(path), kl_coef=0.01)
    assert cfg.lr == 3e-6 and cfg.tis and cfg.kl_coef == 0.01 and cfg.needs_reference


def _partial_rollout_table(model):
    """Rows whose first 2 response tokens came from weight version 0 and the rest from version 1."""
    table = _table(model, seed=10, new=5)
    n = table.num_rows
    versions = pa.array([[0, 0, 1, 1, 1]] * n, type=pa.list_(pa.int32()))
    table = table.append_column("logprob_versions", versions)
    return table.set_column(
        table.schema.get_field_index("weight_version"), "weight_version", pa.array([0] * n, pa.int32())
    )


def test_stale_tokens_from_a_partial_rollout_are_masked_or_reweighted():
    model = tiny_model(seed=28)
    table = _partial_rollout_table(model)
    samples = samples_from_table(table)
    assert samples[0].token_versions.tolist() == [0, 0, 1, 1, 1]
    masked = Trainer(copy.deepcopy(model), TrainConfig(lr=1e-2, stale_tokens="mask", micro_batch_tokens=512))
    (m,) = masked.train_rollouts(samples)
    assert m["off_policy/mis_keep_frac"] == pytest.approx(3 / 5)  # 2 of 5 tokens per sample are stale
    tis = Trainer(copy.deepcopy(model), TrainConfig(lr=1e-2, stale_tokens="tis", micro_batch_tokens=512))
    (m,) = tis.train_rollouts(samples_from_table(table))
    assert m["off_policy/mis_keep_frac"] == 1.0 and m["skipped"] == 0.0
    keep = Trainer(copy.deepcopy(model), TrainConfig(lr=1e-2, micro_batch_tokens=512))
    (m,) = keep.train_rollouts(samples_from_table(table))
    assert "off_policy/mis_keep_frac" not in m


def test_entropy_bonus_changes_the_update_and_is_reported():
    model = tiny_model(seed=29)
    table = _table(model, seed=11, rewards=torch.ones(24))  # zero advantages: only the entropy term acts
    plain = Trainer(copy.deepcopy(model), TrainConfig(lr=1e-2, micro_batch_tokens=512))
    bonus = Trainer(copy.deepcopy(model), TrainConfig(lr=1e-2, entropy_coef=0.1, micro_batch_tokens=512))
    (m0,) = plain.train_rollouts(samples_from_table(table))
    (m1,) = bonus.train_rollouts(samples_from_table(table))
    assert m0["grad_norm"] == 0.0 and m1["grad_norm"] > 0.0
    assert m0["policy/entropy"] == pytest.approx(m1["policy/entropy"]) and m1["entropy_loss"] < 0


def test_sft_draft_training_trains_only_the_mtp_layer_and_lowers_its_loss():
    model = tiny_model("deepseek_v3", seed=30, mtp=1)
    trainer = Trainer(model, TrainConfig(mode="sft", mtp_only=True, lr=3e-3, micro_batch_tokens=512))
    g = torch.Generator().manual_seed(1)
    prompts = torch.randint(3, 96, (32, 4), generator=g)
    samples = samples_from_tokens(prompts.tolist(), ((prompts % 7) + 3).tolist())  # predictable continuations
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    losses = [trainer.train_rollouts(samples)[0]["mtp_loss"] for _ in range(25)]
    assert losses[-1] < 0.7 * losses[0], losses
    changed = {n for n, p in model.named_parameters() if not torch.equal(before[n], p)}
    assert changed and all(n.startswith("mtp.") for n in changed)


def test_samples_from_table_reads_list_columns_exactly_including_null_experts():
    g = torch.Generator().manual_seed(2)
    rows = []
    for i in range(5):
        p, r = torch.randint(0, 50, (3 + i,), generator=g), torch.randint(0, 50, (2 + i % 3,), generator=g)
        experts = None if i == 2 else torch.randint(0, 8, (len(p) + len(r) - 1, 3, 2), generator=g)
        rows.append(dict(prompt_id=f"p{i}", sample_index=0, iteration=0, prompt_tokens=p, response_tokens=r,
                         response="", rollout_logprobs=-torch.rand(len(r), generator=g), routed_experts=experts,
                         reward=float(i), status="completed", weight_version=i))  # fmt: skip
    samples = samples_from_table(rollouts_table(rows))
    for row, s in zip(rows, samples, strict=True):
        assert s.tokens.tolist() == row["prompt_tokens"].tolist() + row["response_tokens"].tolist()
        assert torch.equal(s.rollout_logprobs, row["rollout_logprobs"].float())
        assert (s.routed_experts is None) == (row["routed_experts"] is None)
        if s.routed_experts is not None:
            assert torch.equal(s.routed_experts.long(), row["routed_experts"])
        assert s.weight_version == row["weight_version"] and s.group == row["prompt_id"]


@pytest.mark.parametrize(
    "options",
    [
        dict(qat="fp8"),
        dict(ratio_level="sequence", eps_clip=3e-4, eps_clip_high=4e-4),
        dict(dual_clip=3.0, tis=True, mis=True, old_logprobs="rollout"),
        dict(advantage="dr_grpo", whiten_advantages=True, loss_agg="seq-mean-token-sum-norm"),
    ],
    ids=["fp8-forward", "gspo", "dual-clip-tis-mis", "dr-grpo-whitened"],
)  # fmt: skip
def test_loss_and_precision_options_train_without_skipping(options):
    model = tiny_model(seed=31)
    before = copy.deepcopy(model)
    trainer = Trainer(model, TrainConfig(lr=1e-2, micro_batch_tokens=256, **options))
    if options.get("qat") == "fp8":
        assert any("self_attn" in n for n in trainer.qat_modules)  # dense linears too, not only experts
    (m,) = trainer.train_rollouts(samples_from_table(_table(model, seed=12)))
    assert m["skipped"] == 0.0 and math.isfinite(m["loss"]) and m["grad_norm"] > 0
    assert any(not torch.equal(a, b) for a, b in zip(before.parameters(), model.parameters(), strict=True))


def test_aborted_samples_are_not_trained_on():
    model = tiny_model(seed=32)
    table = _table(model, seed=13)
    status = ["aborted" if i < 4 else "completed" for i in range(table.num_rows)]
    table = table.set_column(table.schema.get_field_index("status"), "status", pa.array(status))
    (m,) = Trainer(model, TrainConfig(lr=1e-2, micro_batch_tokens=256)).train_rollouts(samples_from_table(table))
    assert m["samples/aborted_dropped"] == 4.0 and m["samples"] == 20.0 and m["tokens"] == 20 * 5


def test_chunked_token_logprobs_equal_the_reference_values_and_gradients():
    from miles_core.train.logprobs import chunked_token_logprobs

    g = torch.Generator().manual_seed(3)
    x = torch.randn(3, 5, 11, generator=g, dtype=torch.float64, requires_grad=True)
    t = torch.randint(0, 11, (3, 5), generator=g)
    w = torch.randn(3, 5, generator=g, dtype=torch.float64)
    a, b = chunked_token_logprobs(x, t, 0.7, 4), token_logprobs(x, t, 0.7)
    assert torch.equal(a, b)  # forward: the very values the rollout engine records
    (ga,) = torch.autograd.grad((a * w).sum(), x)
    (gb,) = torch.autograd.grad((b * w).sum(), x)
    torch.testing.assert_close(ga, gb, rtol=1e-12, atol=1e-14)
    assert torch.autograd.gradcheck(lambda z: chunked_token_logprobs(z, t, 1.3, 2), (x,))
