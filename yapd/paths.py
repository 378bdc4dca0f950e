"""Where things live by default, shared by yapd and yapctl."""

from __future__ import annotations

import os
from pathlib import Path

SYSTEM_RUNTIME_DIR = Path("/run/yapd")


def default_admin_socket() -> Path:
    """systemd's RuntimeDirectory when set, /run/yapd when it exists, else a per-user path."""
    env = os.environ.get("RUNTIME_DIRECTORY")
    if env:
        return Path(env.split(":")[0]) / "admin.sock"
    if SYSTEM_RUNTIME_DIR.is_dir() and os.access(SYSTEM_RUNTIME_DIR, os.W_OK | os.X_OK):
        return SYSTEM_RUNTIME_DIR / "admin.sock"
    if (SYSTEM_RUNTIME_DIR / "admin.sock").exists():
        return SYSTEM_RUNTIME_DIR / "admin.sock"
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    if xdg:
        return Path(xdg) / "yapd" / "admin.sock"
    return Path(f"/tmp/yapd-{os.getuid()}") / "admin.sock"  # noqa: S108 - per-uid dir, 0750, ownership checked in admin
