#!/usr/bin/env bash
# Here, on the project's machine: what the lent GPU machine needs beyond the kit of
# ../shared/device (vLLM, its wheels, the model folders): the wheels yapd and its GPU
# tests import that the device image lacks. Then carry the kit as that README says,
# with install.sh below as the third call. Ignored by git (.git/info/exclude).
set -euo pipefail
cd "$(dirname "$0")/../../.."
grep -qx '/.devkit/' .git/info/exclude 2>/dev/null || printf '/.devkit/\n/.whl/\n' >> .git/info/exclude
# Compile caches an earlier lease packed (cache-out.sh / cache-in.sh): kept here, not in git
grep -qx '/.devcache/' .git/info/exclude || printf '/.devcache/\n' >> .git/info/exclude
[ -f .devkit/kit.part.00 ] || bash ../shared/device/build-kit.sh .devkit
# A call carries at most 64 MiB with the working tree (~4 MB and growing): the kit's 60 MiB
# parts left too little room (a call refused, 2026-12-07), so they are cut again at 40 MiB.
if [ -n "$(find .devkit -name 'kit.part.*' -size +40M)" ]; then
  tmp=$(mktemp -d)
  cat .devkit/kit.part.* | split -b 40M -d -a 2 - "$tmp/kit.part."
  rm .devkit/kit.part.* && mv "$tmp"/kit.part.* .devkit/ && rmdir "$tmp"
fi
mkdir -p .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp --abi cp312 \
  --abi abi3 --abi none --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  --platform manylinux_2_28_x86_64 --platform any -d .whl \
  prometheus_client uvloop pytest pytest-asyncio pytest-timeout pluggy iniconfig pygments
# py-spy: the bench's --pyspy-level (a manylinux1 wheel: the tags above do not take it)
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_5_x86_64 --platform manylinux1_x86_64 -d .whl py-spy==0.4.3
ls .devkit .whl
