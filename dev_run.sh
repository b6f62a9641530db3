#!/bin/bash
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:. PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,clocks.max.sm --format=csv,noheader
timeout 250 python3 bench/exp_decode_levers.py > $OUT/levers.txt 2>&1; echo "levers rc $?"
timeout 300 python3 bench/rollout.py --batch 64 --fp8-experts --profile-only --skip-hf --skip-eager > $OUT/profile.txt 2>&1; echo "profile rc $?"
tail -5 $OUT/levers.txt
