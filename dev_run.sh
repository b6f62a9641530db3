#!/bin/bash
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:. PYTHONUNBUFFERED=1
timeout 150 python3 -m pytest -q -m gpu tests/test_rollout_flash_decode.py tests/test_rollout_static.py tests/test_kernels_expert_fusion.py > $OUT/tests.txt 2>&1; echo "tests rc $?"; tail -2 $OUT/tests.txt
timeout 100 python3 bench/decode_kernels.py --only flash --batch 64 256 > $OUT/flash.txt 2>&1; echo "flash rc $?"; grep "^| err" $OUT/flash.txt | head -12
timeout 240 python3 bench/rollout.py --batch 64 --fp8-experts --skip-hf --skip-eager > $OUT/rollout.txt 2>&1; echo "rollout rc $?"; tail -12 $OUT/rollout.txt
