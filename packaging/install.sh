#!/usr/bin/env bash
# Install yapd on a Debian/Ubuntu host: user, venv under /opt/yapd, config, systemd unit.
#   sudo packaging/install.sh [--cpu|--gpu] [--no-start] [--root DIR] [--skip-venv]
# --root DIR stages everything under DIR (no user, no systemctl): for packaging and tests.
# An existing /etc/yapd/config.toml is never overwritten.
set -euo pipefail
SRC=$(cd "$(dirname "$0")/.." && pwd)
ROOT=""
EXTRA=""
START=1
VENV=1
while [ $# -gt 0 ]; do
  case "$1" in
    --cpu) EXTRA="cpu" ;;
    --gpu) EXTRA="vllm" ;;
    --no-start) START=0 ;;
    --skip-venv) VENV=0 ;;
    --root) ROOT=$(realpath -m "$2"); shift ;;
    -h|--help) sed -n '2,6p' "$0"; exit 0 ;;
    *) echo "install.sh: unknown option $1" >&2; exit 2 ;;
  esac
  shift
done
if [ -z "$EXTRA" ]; then
  if command -v nvidia-smi >/dev/null 2>&1; then EXTRA="vllm"; else EXTRA="cpu"; fi
fi
if [ -z "$ROOT" ] && [ "$(id -u)" -ne 0 ]; then
  echo "install.sh: run as root (or stage with --root DIR)" >&2; exit 1
fi

say() { echo "yapd install: $*"; }
install -d -m 0755 "$ROOT/opt/yapd" "$ROOT/opt/yapd/share" "$ROOT/etc/systemd/system" \
  "$ROOT/usr/lib/sysusers.d" "$ROOT/usr/lib/tmpfiles.d"
install -d -m 0750 "$ROOT/etc/yapd"

if [ -z "$ROOT" ]; then
  say "creating the yapd user"
  if command -v systemd-sysusers >/dev/null 2>&1; then
    systemd-sysusers "$SRC/systemd/yapd.sysusers.conf"
  elif ! id yapd >/dev/null 2>&1; then
    useradd --system --home-dir /var/lib/yapd --shell /usr/sbin/nologin --groups video yapd
  fi
fi

if [ "$VENV" = 1 ]; then
  say "creating the venv in /opt/yapd/venv with [$EXTRA]"
  python3 -m venv "$ROOT/opt/yapd/venv"
  "$ROOT/opt/yapd/venv/bin/pip" install -q --upgrade pip
  if [ "$EXTRA" = "cpu" ]; then
    # torch pinned first: a bare "torch" takes the newest. From public PyPI on x86_64 even
    # this one is the multi-GB CUDA build: TORCH_INDEX=https://download.pytorch.org/whl/cpu
    # takes the CPU build (as the Makefile's variable does).
    "$ROOT/opt/yapd/venv/bin/pip" install -q ${TORCH_INDEX:+--index-url "$TORCH_INDEX"} "torch==2.13.0"
  fi
  # From a clean copy: setuptools builds in the source folder, and a build/ left by an
  # earlier install put modules deleted since back into the new wheel (and, run by root,
  # left root-owned build output in the checkout).
  CLEAN=$(mktemp -d)
  trap 'rm -rf "$CLEAN"' EXIT
  tar -C "$SRC" --exclude=./build --exclude='./*.egg-info' --exclude=./.git --exclude=./.venv \
      --exclude=./.devkit --exclude=./.whl --exclude='./.*_cache' -cf - . | tar -C "$CLEAN" -xf -
  "$ROOT/opt/yapd/venv/bin/pip" install -q "$CLEAN[$EXTRA]"
fi

cp "$SRC/README.md" "$SRC/config.example.toml" "$ROOT/opt/yapd/share/"
FIRST=0
if [ -e "$ROOT/etc/yapd/config.toml" ]; then
  say "keeping the existing /etc/yapd/config.toml"
else
  install -m 0640 "$SRC/config.example.toml" "$ROOT/etc/yapd/config.toml"
  FIRST=1
  say "wrote /etc/yapd/config.toml: set [server] api_keys before exposing the port"
fi
install -m 0644 "$SRC/systemd/yapd.service" "$ROOT/etc/systemd/system/yapd.service"
install -m 0644 "$SRC/systemd/yapd.sysusers.conf" "$ROOT/usr/lib/sysusers.d/yapd.conf"
install -m 0644 "$SRC/systemd/yapd.tmpfiles.conf" "$ROOT/usr/lib/tmpfiles.d/yapd.conf"

if [ -z "$ROOT" ]; then
  chgrp yapd /etc/yapd /etc/yapd/config.toml
  systemd-tmpfiles --create /usr/lib/tmpfiles.d/yapd.conf || true
  ln -sf /opt/yapd/venv/bin/yapctl /usr/local/bin/yapctl
  systemctl daemon-reload
  if [ "$START" = 1 ] && [ "$FIRST" = 1 ]; then
    # The example config listens on every address with the demo key: not started until
    # someone has set its keys (and models) for this host.
    systemctl enable yapd
    say "enabled, not started: edit /etc/yapd/config.toml ([server] api_keys, host), then: systemctl start yapd"
  elif [ "$START" = 1 ]; then
    systemctl enable yapd
    systemctl restart yapd  # an upgrade's code takes effect; turns in flight drain first
    say "started: systemctl status yapd; yapctl status (as root or a member of group yapd)"
  else
    systemctl enable yapd
  fi
fi
say "done"
