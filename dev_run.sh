#!/bin/bash
# scratch device script (to delete once run)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:. PYTHONUNBUFFERED=1
timeout 60 python3 bench/decode_kernels.py --only rope --batch 64 256 > $OUT/rope.txt 2>&1; cat $OUT/rope.txt
T="tests/test_kernels_quant.py tests/test_quant_model.py tests/test_train_gpu.py tests/test_kernels_sampler.py tests/test_kernels_moe_route.py tests/test_rollout_flash_decode.py tests/test_rollout_static.py tests/test_kernels_fp8_decode.py tests/test_kernels_rope_cache.py tests/test_kernels_grouped.py tests/test_model_gpu.py tests/test_kernels_add_norm.py tests/test_kernels_fused.py tests/test_kernels_expert_fusion.py tests/test_model_fused_qkv.py tests/test_kernels_fp8_wgmma.py tests/test_kernels_fp8_wgmma_grouped.py"
timeout 390 python3 -m pytest -v -m gpu -p no:cacheprovider $T > $OUT/gpu_tests.txt 2>&1
grep -E "FAILED|ERROR" $OUT/gpu_tests.txt | head -20; tail -2 $OUT/gpu_tests.txt
timeout 130 python3 bench/rollout.py --batch 64 --fp8-experts --skip-hf --skip-eager > $OUT/rollout.txt 2>&1; tail -12 $OUT/rollout.txt
