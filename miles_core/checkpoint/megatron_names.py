"""HF on-disk tensors <-> megatron-core `GPTModel` sharded state dict: names, fusions, layer/expert axes.

The ground truth is what megatron-core (0.16) `GPTModel.sharded_state_dict()` produces for a model
built with the *local* (non-Transformer-Engine) layer spec, `get_gpt_decoder_block_spec(config,
use_transformer_engine=False, normalization="RMSNorm")` — the spec that runs on a CPU. Checked by
tests/test_checkpoint_megatron.py against megatron-core itself. What that spec produces:

- Layers are stacked on a leading axis under one key (`decoder.layers.self_attention.linear_qkv.weight`
  [L, ...], chunk per layer) when all layers are alike; when dense and MoE layers are mixed
  (DeepSeek-V3 `first_k_dense_replace`, Qwen3-MoE `mlp_only_layers`) megatron marks them
  non-homogeneous and every layer has its own keys (`decoder.layers.3.mlp.router.weight`).
- Experts (SequentialMLP) add an expert axis: `...mlp.experts.experts.linear_fc1.weight` [(L,) E, 2I, H].
  The global tensor is the same for TEGroupedMLP / GroupedMLP checkpoints, so any of them reads back.
- q, k, v fuse into `linear_qkv` [G * (q_per_group + 2) * d, H], per query group: q heads, k, v.
- gate and up fuse into `linear_fc1` [2I, H]: gate rows then up rows (written as two chunks, as
  megatron's swiglu factory does).
- Norms: the local spec renames `input_layernorm` to `self_attention.linear_qkv.layer_norm_weight` and
  `pre_mlp_layernorm` to `mlp.linear_fc1.layer_norm_weight` (its keys map, also for MoE layers);
  MLA layers keep `input_layernorm` / `pre_mlp_layernorm`. The Transformer-Engine spec's spellings
  are accepted on read (ALIASES).
- MTP layers: `mtp.layers.K.{enorm,hnorm,eh_proj,final_layernorm}` and `mtp.layers.K.transformer_layer.*`,
  never stacked; the MTP layer has the spec of the last decoder layer. The embedding and output head
  are shared with the main model (HF DeepSeek-V3 stores copies; we keep them only if they differ).
- Every linear layer except the output head also has an `_extra_state` object (`None` for local
  modules), one per (layer, expert) shard: `<module>._extra_state/shard_<offsets>_<counts>`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from miles_core.model.config import ModelConfig

# Local-spec key suffix -> other spellings found in megatron checkpoints (Transformer-Engine spec).
ALIASES = {
    "self_attention.linear_qkv.layer_norm_weight": ("input_layernorm.weight",),
    "mlp.linear_fc1.layer_norm_weight": ("pre_mlp_layernorm.weight",),
    "pre_mlp_layernorm.weight": ("mlp.linear_fc1.layer_norm_weight",),
    "self_attention.q_layernorm.weight": ("self_attention.linear_q_up_proj.layer_norm_weight",),
    "self_attention.kv_layernorm.weight": ("self_attention.linear_kv_up_proj.layer_norm_weight",),
}
_LINEAR = re.compile(r"(^|\.)(linear_[a-z_0-9]+|eh_proj)$")
PER_LAYER_KEY = re.compile(r"^decoder\.layers\.\d+\.")
MTP_KEY = re.compile(r"^mtp\.layers\.(\d+)\.")


@dataclass(frozen=True)
class Slot:
    """One chunk of one megatron tensor and the HF tensors it is made of.

    `prefix` lists (index, count) of the prepended axes (stacked layer, expert); `part` = (k, n) says
    the chunk is the k-th of n equal row blocks of the unprefixed tensor (gate = 0/2, up = 1/2).
    """

    key: str
    hf: tuple[str, ...]
    fuse: str = "copy"  # "copy": one HF tensor | "qkv": q, k, v interleaved per query group
    prefix: tuple[tuple[int, int], ...] = ()
    part: tuple[int, int] = (0, 1)
    optional: bool = False  # biases, q/k norms, router bias: present in some checkpoints only
    copy_of: str | None = None  # MTP copies of the shared embedding / head: the main key they mirror


def is_stacked(cfg: ModelConfig) -> bool:
    """Megatron stacks layers on one axis unless dense and MoE layers are mixed."""
    return not (cfg.is_moe and len(cfg.moe_layers) != cfg.num_hidden_layers)


def model_slots(cfg: ModelConfig, num_mtp: int, stacked: bool) -> list[Slot]:
    """Every slot of the model in streaming order: embedding, layers, final norm, head, MTP layers."""
    n = cfg.num_hidden_layers
    out = [Slot("embedding.word_embeddings.weight", ("model.embed_tokens.weight",))]
    for i in range(n):
        mg = "decoder.layers." if stacked else f"decoder.layers.{i}."
        axis = ((i, n),) if stacked else ()
        out += layer_slots(cfg, f"model.layers.{i}.", mg, axis, moe=i in cfg.moe_layers)
    out.append(Slot("decoder.final_layernorm.weight", ("model.norm.weight",)))
    out.append(Slot("output_layer.weight", ("lm_head.weight",), optional=True))
    mtp_moe = (n - 1) in cfg.moe_layers  # megatron builds MTP layers with the last decoder layer's spec
    for k in range(num_mtp):
        hf, mg = f"model.layers.{n + k}.", f"mtp.layers.{k}."
        out += [Slot(mg + f"{x}.weight", (hf + f"{x}.weight",)) for x in ("enorm", "hnorm", "eh_proj")]
        out += layer_slots(cfg, hf, mg + "transformer_layer.", (), moe=mtp_moe)
        out.append(Slot(mg + "final_layernorm.weight", (hf + "shared_head.norm.weight",)))
        out.append(
            Slot(
                mg + "embedding.word_embeddings.weight",
                (hf + "embed_tokens.weight",),
                optional=True,
                copy_of="embedding.word_embeddings.weight",
            )
        )
        out.append(
            Slot(
                mg + "output_layer.weight",
                (hf + "shared_head.head.weight",),
                optional=True,
                copy_of="output_layer.weight",
            )
        )
    return out


def layer_slots(cfg: ModelConfig, hf: str, mg: str, axis: tuple, moe: bool) -> list[Slot]:
    out = _mla_slots(cfg, hf, mg, axis) if cfg.attention == "mla" else _gqa_slots(hf, mg, axis)
    post = "pre_mlp_layernorm.weight" if cfg.attention == "mla" else "mlp.linear_fc1.layer_norm_weight"
    out.append(Slot(mg + post, (hf + "post_attention_layernorm.weight",), prefix=axis))
    if not moe:
        return out + _mlp_slots(hf + "mlp.", mg + "mlp.", axis)
    out.append(Slot(mg + "mlp.router.weight", (hf + "mlp.gate.weight",), prefix=axis))
    out.append(
        Slot(mg + "mlp.router.expert_bias", (hf + "mlp.gate.e_score_correction_bias",), prefix=axis, optional=True)
    )
    e_count = cfg.num_experts
    for e in range(e_count):
        out += _mlp_slots(f"{hf}mlp.experts.{e}.", mg + "mlp.experts.experts.", (*axis, (e, e_count)), biases=False)
    if cfg.n_shared_experts:
        out += _mlp_slots(hf + "mlp.shared_experts.", mg + "mlp.shared_experts.", axis, biases=False)
    return out


def _gqa_slots(hf: str, mg: str, axis: tuple) -> list[Slot]:
    a, s = hf + "self_attn.", mg + "self_attention."
    return [
        Slot(s + "linear_qkv.layer_norm_weight", (hf + "input_layernorm.weight",), prefix=axis),
        Slot(
            s + "linear_qkv.weight", (a + "q_proj.weight", a + "k_proj.weight", a + "v_proj.weight"), "qkv", prefix=axis
        ),
        Slot(
            s + "linear_qkv.bias",
            (a + "q_proj.bias", a + "k_proj.bias", a + "v_proj.bias"),
            "qkv",
            prefix=axis,
            optional=True,
        ),
        Slot(s + "q_layernorm.weight", (a + "q_norm.weight",), prefix=axis, optional=True),
        Slot(s + "k_layernorm.weight", (a + "k_norm.weight",), prefix=axis, optional=True),
        Slot(s + "linear_proj.weight", (a + "o_proj.weight",), prefix=axis),
        Slot(s + "linear_proj.bias", (a + "o_proj.bias",), prefix=axis, optional=True),
    ]


def _mla_slots(cfg: ModelConfig, hf: str, mg: str, axis: tuple) -> list[Slot]:
    a = hf + "self_attn."
    pairs = [("input_layernorm", hf + "input_layernorm")]
    if cfg.q_lora_rank:  # q: down-projection [q_lora, H], its norm, up-projection [nh * (nope + rope), q_lora]
        pairs += [
            ("self_attention.linear_q_down_proj", a + "q_a_proj"),
            ("self_attention.q_layernorm", a + "q_a_layernorm"),
            ("self_attention.linear_q_up_proj", a + "q_b_proj"),
        ]
    else:
        pairs.append(("self_attention.linear_q_proj", a + "q_proj"))
    # kv: down [kv_lora + rope, H] (same row order in both), its norm, up [nh * (nope + v), kv_lora]
    pairs += [
        ("self_attention.linear_kv_down_proj", a + "kv_a_proj_with_mqa"),
        ("self_attention.kv_layernorm", a + "kv_a_layernorm"),
        ("self_attention.linear_kv_up_proj", a + "kv_b_proj"),
        ("self_attention.linear_proj", a + "o_proj"),
    ]
    return [Slot(f"{mg}{m}.weight", (f"{h}.weight",), prefix=axis) for m, h in pairs]


def _mlp_slots(hf: str, mg: str, axis: tuple, biases: bool = True) -> list[Slot]:
    out = []
    kinds = ("weight", "bias") if biases else ("weight",)
    for kind in kinds:
        opt = kind == "bias"
        out += [
            Slot(f"{mg}linear_fc1.{kind}", (f"{hf}gate_proj.{kind}",), prefix=axis, part=(0, 2), optional=opt),
            Slot(f"{mg}linear_fc1.{kind}", (f"{hf}up_proj.{kind}",), prefix=axis, part=(1, 2), optional=opt),
            Slot(f"{mg}linear_fc2.{kind}", (f"{hf}down_proj.{kind}",), prefix=axis, optional=opt),
        ]
    return out


# ---- layouts -------------------------------------------------------------------------------------


def qkv_rows(cfg: ModelConfig) -> tuple[int, int, int]:
    """Rows of q, k and v in HF (all heads), for the split of a fused linear_qkv."""
    d, g = cfg.head_dim, cfg.num_key_value_heads
    return cfg.num_attention_heads * d, g * d, g * d


def fuse(slot: Slot, tensors: list[torch.Tensor], cfg: ModelConfig) -> torch.Tensor:
    """HF tensors -> the slot's unprefixed megatron chunk."""
    if slot.fuse == "copy":
        return tensors[0]
    q, k, v = tensors  # q: [nh*d, ...], k/v: [G*d, ...]
    g, rest = cfg.num_key_value_heads, q.shape[1:]
    parts = [q.reshape(g, -1, *rest), k.reshape(g, -1, *rest), v.reshape(g, -1, *rest)]
    return torch.cat(parts, dim=1).reshape(-1, *rest)  # [G * (q_per_group + 2) * d, ...]


def split(slot: Slot, t: torch.Tensor, cfg: ModelConfig) -> list[torch.Tensor]:
    """The slot's unprefixed megatron chunk -> its HF tensors (fresh, contiguous)."""
    if slot.fuse == "copy":
        return [t.contiguous()]
    g, rest = cfg.num_key_value_heads, t.shape[1:]
    rq, rk, rv = (r // g for r in qkv_rows(cfg))
    q, k, v = t.reshape(g, rq + rk + rv, *rest).split([rq, rk, rv], dim=1)
    return [x.reshape(-1, *rest).contiguous() for x in (q, k, v)]


def hf_shapes(slot: Slot, chunk_shape: tuple[int, ...], cfg: ModelConfig) -> list[tuple[int, ...]]:
    """Shapes of the slot's HF tensors given its unprefixed chunk shape."""
    if slot.fuse == "copy":
        return [tuple(chunk_shape)]
    return [(r, *chunk_shape[1:]) for r in qkv_rows(cfg)]


def chunk_box(slot: Slot, unprefixed_global: tuple[int, ...]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(offsets, sizes) of the slot's chunk inside the key's global tensor."""
    k, n = slot.part
    rows = unprefixed_global[0] // n
    offsets = tuple(i for i, _ in slot.prefix) + (k * rows,) + (0,) * (len(unprefixed_global) - 1)
    sizes = (1,) * len(slot.prefix) + (rows,) + tuple(unprefixed_global[1:])
    return offsets, sizes


def extra_state_keys(slots: list[Slot]) -> list[str]:
    """Megatron's `_extra_state` object keys for the linear layers among `slots`, in order."""
    seen, out = set(), []
    for s in slots:
        if not s.key.endswith(".weight") or s.copy_of or s.key == "output_layer.weight":
            continue
        module = s.key[: -len(".weight")]
        if not _LINEAR.search(module):
            continue
        offs = ".".join(str(i) for i, _ in s.prefix) or "0"
        counts = ".".join(str(c) for _, c in s.prefix) or "1"
        key = f"{module}._extra_state/shard_{offs}_{counts}"
        if key not in seen:
            seen.add(key)
            out.append(key)
    return out


def resolve_key(key: str, available) -> str | None:
    """The spelling of `key` present in a checkpoint (local or Transformer-Engine spec), or None."""
    if key in available:
        return key
    for suffix, alts in ALIASES.items():
        if key.endswith(suffix):
            for alt in alts:
                cand = key[: -len(suffix)] + alt
                if cand in available:
                    return cand
    return None
