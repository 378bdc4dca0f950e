#!/usr/bin/env bash
# On the device, at the end of a lease that made them: the compile caches (the bench's
# yapd cache dir, the GPU tests' daemon cache) packed into $OUT as parts of 15 MB, at most
# four a call (the files a call returns: 8 of 16 MB, 64 MB in all). Here, copy them into
# .devcache/ (ignored by git); a later lease unpacks them with cache-in.sh and skips the
# first start's compile (run v: 275 s cold against 36-44 s warm). A `startup` phase that
# measures a cold start must run before cache-in.sh, or under another --work.
#   bash docs/bench/device/cache-out.sh [FIRST_PART]   (a second call: 4)
set -euo pipefail
first=${1:-0}
pack=/tmp/devcache.tar.xz
if [ "$first" = 0 ] || [ ! -e "$pack" ]; then
  dirs=()
  for d in /tmp/gbwork/cache /tmp/gpucache; do [ -d "$d" ] && dirs+=("${d#/}"); done
  # Not the bytecode yapd writes for the kit's packages (engines.bytecode_cache): a start
  # writes it again in seconds, and it would fill the parts a call can carry.
  tar -C / --exclude='*/cache/pycache' --exclude='gpucache/pycache' -cf - "${dirs[@]}" | xz -T0 -3 > "$pack"
  rm -f /tmp/devcache.part.*
  split -b 15M -d -a 2 "$pack" /tmp/devcache.part.
fi
ls -la "$pack" /tmp/devcache.part.*
n=0
for f in /tmp/devcache.part.*; do
  i=$((10#${f##*.}))
  if [ "$i" -ge "$first" ] && [ "$n" -lt 4 ]; then cp "$f" "$OUT/"; n=$((n + 1)); fi
done
total=$(ls /tmp/devcache.part.* | wc -l)
echo "returned $n of $total parts from part $first on"
