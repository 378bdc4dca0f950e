#!/usr/bin/env bash
# On the device: the GPU test module (tests/test_gpu_vllm.py), its log in $OUT.
#   bash docs/bench/device/gputest.sh [SECONDS]
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
timeout "${1:-480}" python3 -m pytest -p no:cacheprovider tests/test_gpu_vllm.py -v -rA --durations=10 \
  -o timeout=0 > "$OUT/gputest.log" 2>&1
rc=$?
tail -40 "$OUT/gputest.log"
echo "rc=$rc"
exit $rc
