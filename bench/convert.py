"""Peak memory and speed of checkpoint conversion on a >= 2 GB random checkpoint (CPU).

    PYTHONPATH=. python bench/convert.py                      # ~2.2 GB bf16 Qwen3-MoE, both directions
    PYTHONPATH=. python bench/convert.py --layers 20 --keep   # bigger, keep the files in --workdir

Each conversion runs in a fresh subprocess that reports its own peak RSS (VmHWM from /proc); the
parent also samples the child's RSS with psutil every 10 ms. The baseline row is a subprocess that
only imports what the conversion imports, so `peak - baseline` is what the conversion itself holds.
The checkpoint is a Qwen3-MoE shape with a dense first layer (megatron keys every layer on its own,
the layout that holds the most distinct tensors per output file: the worst case for memory).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import psutil

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CHILD = """
import json, sys, time
sys.path.insert(0, {root!r})
import torch  # noqa
from miles_core.checkpoint import hf_to_torch_dist, torch_dist_to_hf
t = time.perf_counter()
what, src, dst = sys.argv[1:4]
if what == "hf_to_torch_dist":
    hf_to_torch_dist(src, dst)
elif what == "torch_dist_to_hf":
    torch_dist_to_hf(src, dst)
seconds = time.perf_counter() - t
# VmHWM: peak RSS of this process image (ru_maxrss would carry the parent's peak over fork + exec)
hwm = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:"))
print(json.dumps({{"seconds": seconds, "maxrss": hwm * 1024}}))
"""


def config(layers: int) -> dict:
    return dict(
        architectures=["Qwen3MoeForCausalLM"], model_type="qwen3_moe", vocab_size=32000, hidden_size=1024,
        intermediate_size=2816, moe_intermediate_size=512, num_attention_heads=16, num_key_value_heads=4,
        head_dim=64, num_experts=64, num_experts_per_tok=4, norm_topk_prob=True, rms_norm_eps=1e-6,
        rope_theta=1e6, max_position_embeddings=4096, tie_word_embeddings=False, decoder_sparse_step=1,
        mlp_only_layers=[0], num_hidden_layers=layers, torch_dtype="bfloat16",
    )  # fmt: skip


def make_checkpoint(folder: str, layers: int) -> int:
    """Write a random bf16 HF checkpoint tensor by tensor (1 GiB shards + index); returns its bytes."""
    import torch

    from miles_core.checkpoint.safetensors_io import write_shards

    cfg = config(layers)
    h, i, e, m, v = 1024, 2816, 64, 512, 32000
    q, kv = 16 * 64, 4 * 64
    specs = [("model.embed_tokens.weight", (v, h))]
    for n in range(layers):
        p = f"model.layers.{n}."
        specs += [(p + "input_layernorm.weight", (h,)), (p + "post_attention_layernorm.weight", (h,))]
        specs += [(p + f"self_attn.{x}_proj.weight", s) for x, s in (("q", (q, h)), ("k", (kv, h)), ("v", (kv, h)))]
        specs += [(p + "self_attn.o_proj.weight", (h, q)), (p + "self_attn.q_norm.weight", (64,))]
        specs += [(p + "self_attn.k_norm.weight", (64,))]
        if n == 0:
            specs += [(p + f"mlp.{x}_proj.weight", (i, h)) for x in ("gate", "up")] + [
                (p + "mlp.down_proj.weight", (h, i))
            ]
            continue
        specs.append((p + "mlp.gate.weight", (e, h)))
        for x in range(e):
            ep = f"{p}mlp.experts.{x}."
            specs += [
                (ep + "gate_proj.weight", (m, h)),
                (ep + "up_proj.weight", (m, h)),
                (ep + "down_proj.weight", (h, m)),
            ]
    specs += [("model.norm.weight", (h,)), ("lm_head.weight", (v, h))]
    specs = [(n, torch.bfloat16, s) for n, s in specs]
    gen = torch.Generator().manual_seed(0)
    tensors = ((n, (torch.randn(s, generator=gen) * 0.02).to(torch.bfloat16)) for n, _, s in specs)
    os.makedirs(folder, exist_ok=True)
    write_shards(folder, specs, tensors, max_shard_bytes=2**30)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    return sum(torch.Size(s).numel() * 2 for _, _, s in specs)


def run_child(what: str, src: str, dst: str) -> dict:
    """Run one conversion in a fresh process; its self-reported peak RSS and the sampled one."""
    code = CHILD.format(root=ROOT)
    proc = subprocess.Popen([sys.executable, "-c", code, what, src, dst], stdout=subprocess.PIPE, text=True)
    ps, sampled = psutil.Process(proc.pid), 0
    while proc.poll() is None:
        try:
            sampled = max(sampled, ps.memory_info().rss)
        except psutil.NoSuchProcess:
            break
        time.sleep(0.01)
    out = proc.stdout.read()
    if proc.returncode != 0:
        raise SystemExit(f"{what} failed with exit code {proc.returncode}")
    res = json.loads(out.strip().splitlines()[-1])
    res["sampled"] = sampled
    return res


def dir_bytes(folder: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(folder) for f in fs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=11, help="decoder layers (11 -> about 2.2 GB in bf16)")
    ap.add_argument("--workdir", default=None, help="where the checkpoints go (default: a temp dir)")
    ap.add_argument("--keep", action="store_true", help="keep the checkpoints")
    args = ap.parse_args()
    work = args.workdir or tempfile.mkdtemp(prefix="miles-bench-convert-")
    hf, td, back = (os.path.join(work, x) for x in ("hf", "td", "back"))
    for d in (hf, td, back):
        shutil.rmtree(d, ignore_errors=True)
    try:
        t = time.perf_counter()
        size = make_checkpoint(hf, args.layers)
        print(f"random checkpoint: {size / 1e9:.2f} GB in {dir_bytes(hf) / 1e9:.2f} GB of files, "
              f"made in {time.perf_counter() - t:.0f} s ({hf})")  # fmt: skip
        rows = [("baseline (imports only)", run_child("imports", "-", "-"))]
        rows.append(("hf -> torch_dist", run_child("hf_to_torch_dist", hf, td)))
        rows.append(("torch_dist -> hf", run_child("torch_dist_to_hf", td, back)))
        base = rows[0][1]["maxrss"]
        print("\n| step | wall s | GB/s | peak RSS (self) | sampled RSS | peak / ckpt | (peak - baseline) / ckpt |")
        print("|---|---|---|---|---|---|---|")
        for name, r in rows:
            gbs = size / 1e9 / r["seconds"] if r["seconds"] > 0.01 else float("nan")
            rss, sampled = r["maxrss"], r["sampled"]
            print(f"| {name} | {r['seconds']:.1f} | {gbs:.2f} | {rss / 2**20:.0f} MiB | {sampled / 2**20:.0f} MiB | "
                  f"{rss / size:.3f}x | {(rss - base) / size:.3f}x |")  # fmt: skip
        print(f"\ntorch_dist files: {dir_bytes(td) / 1e9:.2f} GB; round trip bytes equal: {_same(hf, back)}")
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


def _same(a: str, b: str) -> bool:
    """Whether every tensor of `a` is bitwise equal in `b`, compared one tensor at a time."""
    import torch

    from miles_core.checkpoint.safetensors_io import SafetensorsReader

    ra, rb = SafetensorsReader(a), SafetensorsReader(b)
    if set(ra.names()) != set(rb.names()):
        return False
    return all(torch.equal(ra.read(n).view(torch.uint8), rb.read(n).view(torch.uint8)) for n in ra.names())


if __name__ == "__main__":
    main()
