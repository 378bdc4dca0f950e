#!/usr/bin/env bash
# On the device: one gpubench call, its files kept between calls in /tmp/gbout and
# returned in $OUT with yapd's and vllm serve's logs.
#   bash docs/bench/device/bench.sh NAME PHASES SECONDS [gpubench options...]
NAME=$1; PHASES=$2; SECONDS_LIMIT=$3; shift 3
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
mkdir -p /tmp/gbout
cp /tmp/gbout/"$NAME".json "$OUT"/ 2>/dev/null
log="$OUT/$NAME-${PHASES//,/_}.log"
timeout "$SECONDS_LIMIT" python3 -m yapctl.gpubench /tmp/models --name "$NAME" --out "$OUT" --work /tmp/gbwork \
  --phases "$PHASES" "$@" > "$log" 2>&1
rc=$?
cp "$OUT/$NAME".* /tmp/gbout/ 2>/dev/null
find /tmp/gbwork -maxdepth 1 -name '*.log' -size -20M -exec cp {} "$OUT"/ \; 2>/dev/null
grep -v '^| ' "$log" | grep '^RESULT\|^gpubench\|Error' | tail -40
echo "rc=$rc"
exit $rc
