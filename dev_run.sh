#!/bin/bash
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:. PYTHONUNBUFFERED=1
timeout 400 python3 bench/exp_decode_levers.py > $OUT/levers.txt 2>&1; echo "levers rc $?"
tail -3 $OUT/levers.txt
