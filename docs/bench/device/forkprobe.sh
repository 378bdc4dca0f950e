#!/usr/bin/env bash
# On the device (after install.sh): which calls of an EngineCore's step a fork slows
# (yapctl/forkprobe.py), from a parent as yapd is (vLLM imported, NVML asked) and from
# one with torch alone, under a private MPS daemon (as yapd's engines run) and without.
#   bash docs/bench/device/forkprobe.sh [ITERATIONS]
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
n=${1:-2000}
python3 -m yapctl.forkprobe --parent vllm --iterations "$n" --mps /tmp/fpmps > "$OUT/forkprobe-vllm-mps.json" 2> "$OUT/forkprobe.err"
python3 -m yapctl.forkprobe --parent vllm --iterations "$n" > "$OUT/forkprobe-vllm.json" 2>> "$OUT/forkprobe.err"
python3 -m yapctl.forkprobe --parent torch --iterations "$n" --mps /tmp/fpmps > "$OUT/forkprobe-torch-mps.json" 2>> "$OUT/forkprobe.err"
tail -5 "$OUT/forkprobe.err"
for f in "$OUT"/forkprobe-*.json; do
  echo "== $(basename "$f")"
  python3 -c 'import json,sys; d=json.load(open(sys.argv[1])); [print(f"{op:20}", v) for op, v in d["median_us"].items()]' "$f"
done
