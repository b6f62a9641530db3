#!/bin/bash
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:. PYTHONUNBUFFERED=1
timeout 280 python3 bench/exp_decode_levers.py --only heads > $OUT/heads.txt 2>&1; echo "heads rc $?"
timeout 250 python3 bench/exp_decode_levers.py --only flash > $OUT/flash.txt 2>&1; echo "flash rc $?"
tail -2 $OUT/flash.txt
