"""Scratch (not committed): bisect the grouped Gluon FP8 kernel's illegal instruction, one subprocess per case."""

import os
import subprocess
import sys

CASES = {
    "e1": ([256], 256, 256),
    "e1_ragged": ([200], 256, 256),
    "e4": ([100, 0, 37, 119], 512, 512),
    "e4_aligned": ([128, 0, 64, 64], 512, 512),
    "e11": ([0, 130, 1, 0, 64, 257, 0, 3, 128, 2, 0], 640, 512),
}


def one(case: str, mode: int, cfg: str) -> None:
    import torch

    sys.path.insert(0, "tests")
    from test_kernels_fp8_wgmma_grouped import _operands, _reference, _rel

    from miles_core.kernels import fp8_wgmma_grouped as fg

    counts, n, k = CASES[case]
    g = torch.Generator().manual_seed(1)
    a, sa, w, ws, c = _operands(counts, n, k, g)
    ref = _reference(a, sa, w, ws, c)
    bm, bn, st = (int(v) for v in cfg.split(","))
    y = fg.grouped_fp8_block_gemm(a, sa, w, ws, c, config=fg.GroupedConfig(bm, bn, st, 8), debug=mode)
    torch.cuda.synchronize()
    print(f"OK rel {_rel(y, ref):.2e} nan {int(y.isnan().sum())}")


if __name__ == "__main__":
    if len(sys.argv) == 2:  # quick: a few cases, mode 0
        env = dict(os.environ, CUDA_LAUNCH_BLOCKING="1")
        for case in ("e4", "e4_aligned", "e11"):
            r = subprocess.run([sys.executable, __file__, case, "0", "128,256,4"], capture_output=True, text=True,
                               env=env, timeout=120)  # fmt: skip
            out = (r.stdout + r.stderr).strip().splitlines()
            last = [ln for ln in out if "OK" in ln or "Error" in ln or "error" in ln][-1:] or out[-1:]
            print(f"{case}: rc {r.returncode} {last[0][:160] if last else ''}", flush=True)
        sys.exit(0)
    if len(sys.argv) > 1:
        one(sys.argv[1], int(sys.argv[2]), sys.argv[3])
        sys.exit(0)
    env = dict(os.environ, CUDA_LAUNCH_BLOCKING="1")
    runs = [("128,256,4", case, mode) for case in CASES for mode in (0, 1, 2, 3)]
    runs += [("64,256,5", "e4", 0), ("64,256,5", "e4", 3), ("128,128,6", "e1", 0), ("128,128,6", "e1", 3)]
    for cfg, case, mode in runs:
        if True:
            if True:
                r = subprocess.run([sys.executable, __file__, case, str(mode), cfg], capture_output=True, text=True,
                                   env=env, timeout=120)  # fmt: skip
                out = (r.stdout + r.stderr).strip().splitlines()
                last = [ln for ln in out if "OK" in ln or "Error" in ln or "error" in ln][-1:] or out[-1:]
                print(f"{cfg} {case} mode {mode}: rc {r.returncode} {last[0][:160] if last else ''}", flush=True)
