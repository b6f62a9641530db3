#!/bin/bash
# scratch device script (not committed)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:. PYTHONUNBUFFERED=1
timeout 50 python3 dbg_grouped.py quick 2>&1 | tee $OUT/dbg.txt
timeout 130 python3 -m pytest -v -x -m gpu -p no:cacheprovider --timeout 120 tests/test_kernels_fp8_wgmma_grouped.py > $OUT/t1.txt 2>&1
rc=$?; grep -E "PASSED|FAILED|ERROR|passed|failed" $OUT/t1.txt | tail -14
if [ $rc -ne 0 ]; then grep -E "^E " $OUT/t1.txt | head -20; exit 1; fi
timeout 180 python3 bench/rollout.py --batch 64 --fp8-experts --skip-hf --skip-eager > $OUT/rollout.txt 2>&1; tail -25 $OUT/rollout.txt
timeout 95 python3 bench/exp_fp8_wgmma.py --grouped > $OUT/grouped.txt 2>&1; cat $OUT/grouped.txt
