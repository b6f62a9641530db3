#!/bin/bash
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:. PYTHONUNBUFFERED=1
timeout 330 python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_kernels_quant.py tests/test_quant_model.py tests/test_train_gpu.py tests/test_kernels_sampler.py tests/test_kernels_moe_route.py tests/test_rollout_flash_decode.py tests/test_rollout_static.py tests/test_kernels_fp8_decode.py tests/test_kernels_rope_cache.py tests/test_kernels_grouped.py tests/test_model_gpu.py tests/test_kernels_add_norm.py tests/test_kernels_fused.py tests/test_kernels_expert_fusion.py tests/test_model_fused_qkv.py > $OUT/gpu15.txt 2>&1; echo "gpu15 rc $?"; tail -3 $OUT/gpu15.txt
timeout 150 python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_kernels_fp8_wgmma.py tests/test_kernels_fp8_wgmma_grouped.py > $OUT/wgmma.txt 2>&1; echo "wgmma rc $?"; tail -3 $OUT/wgmma.txt
