#!/usr/bin/env bash
# Remove yapd: unit, venv, yapctl link. Config (/etc/yapd) and caches (/var/cache/yapd,
# /var/lib/yapd, /var/log/yapd) and the user stay unless --purge.
#   sudo packaging/uninstall.sh [--purge] [--root DIR]
set -euo pipefail
ROOT=""
PURGE=0
while [ $# -gt 0 ]; do
  case "$1" in
    --purge) PURGE=1 ;;
    --root) ROOT=$(realpath -m "$2"); shift ;;
    *) echo "uninstall.sh: unknown option $1" >&2; exit 2 ;;
  esac
  shift
done
if [ -z "$ROOT" ]; then
  systemctl disable --now yapd 2>/dev/null || true
  rm -f /usr/local/bin/yapctl
fi
rm -f "$ROOT/etc/systemd/system/yapd.service" "$ROOT/usr/lib/sysusers.d/yapd.conf" "$ROOT/usr/lib/tmpfiles.d/yapd.conf"
rm -rf "$ROOT/opt/yapd"
if [ "$PURGE" = 1 ]; then
  rm -rf "$ROOT/etc/yapd" "$ROOT/var/cache/yapd" "$ROOT/var/lib/yapd" "$ROOT/var/log/yapd"
  if [ -z "$ROOT" ] && id yapd >/dev/null 2>&1; then userdel yapd || true; fi
fi
[ -z "$ROOT" ] && systemctl daemon-reload || true
echo "yapd uninstalled$([ "$PURGE" = 1 ] && echo ' (purged)' || echo '; config and caches kept')"
