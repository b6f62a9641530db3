#!/bin/bash
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:. PYTHONUNBUFFERED=1
timeout 200 python3 -m pytest -q -m gpu tests/test_kernels_expert_fusion.py -k swiglu_quant > $OUT/test.txt 2>&1; echo "test rc $?"; tail -2 $OUT/test.txt
timeout 200 python3 -c "
import torch, bench.decode_kernels as d
bw = d.bandwidth(); print('bw', bw/1e9)
from miles_core.kernels import fp8_gemm
from miles_core.quant import fp8_block_quantize
for tok in (64, 256):
    rows = tok * 8
    g = torch.Generator().manual_seed(tok)
    counts = torch.bincount(torch.randint(0, 128, (rows,), generator=g), minlength=128).cuda()
    x = torch.randn(rows, 2048, device='cuda', dtype=torch.bfloat16)
    wq, ws = fp8_block_quantize(torch.randn(128, 1536, 2048, device='cuda', dtype=torch.bfloat16) * 0.02)
    nbytes = int((counts > 0).sum()) * 1536 * 2048
    d._swiglu_epilogue(fp8_gemm, x, wq, ws, counts, nbytes, bw)
" > $OUT/epi.txt 2>&1; echo "epi rc $?"; cat $OUT/epi.txt | tail -20
for t in off 1_3_4 1_4_4 1_4_8 1_3_8; do
  if [ $t = off ]; then E=0; T=1,3,4; else E=1; T=${t//_/,}; fi
  MILES_FP8_SWIGLU_EPILOGUE=$E MILES_FP8_SWIGLU_TILES=$T timeout 150 python3 bench/rollout.py --batch 64 --fp8-experts-only --profile-only --skip-hf --skip-eager > $OUT/prof_$t.txt 2>&1
  echo "$t: $(grep 'decode step wall' $OUT/prof_$t.txt | tr '\n' ' ')"
done
