#!/usr/bin/env bash
# On the device, after install.sh: unpack compile caches an earlier lease packed with
# cache-out.sh (carry .devcache; every part must be there: a call carries 64 MB at most).
set -euo pipefail
ls .devcache/devcache.part.* > /dev/null
cat .devcache/devcache.part.* | xz -d | tar -C / -xf -
du -sh /tmp/gbwork/cache /tmp/gpucache 2>/dev/null || true
