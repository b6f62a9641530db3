#!/bin/bash
# scratch device script (to delete once run)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:. PYTHONUNBUFFERED=1
timeout 150 python3 -m pytest -v -m gpu -p no:cacheprovider tests/test_kernels_fp8_wgmma_grouped.py tests/test_kernels_rope_cache.py > $OUT/gpu_tests.txt 2>&1
grep -E "FAILED|ERROR" $OUT/gpu_tests.txt | head -20; tail -2 $OUT/gpu_tests.txt
timeout 140 python3 bench/rollout.py --batch 64 --fp8-experts --skip-hf --skip-eager > $OUT/rollout.txt 2>&1; tail -12 $OUT/rollout.txt
