"""Where things live by default, shared by yapd and yapctl."""

from __future__ import annotations

import os
from pathlib import Path

SYSTEM_RUNTIME_DIR = Path("/run/yapd")


def default_admin_socket(client: bool = False) -> Path:
    """systemd's RuntimeDirectory when set, /run/yapd where this user may make it there,
    else a per-user path. A ``client`` (yapctl) also takes /run/yapd's socket where it
    exists, or where /run/yapd cannot be looked into: connecting then says why (not in
    the daemon's group) instead of failing on a path of its own."""
    env = os.environ.get("RUNTIME_DIRECTORY")
    if env:
        return Path(env.split(":")[0]) / "admin.sock"
    if SYSTEM_RUNTIME_DIR.is_dir() and os.access(SYSTEM_RUNTIME_DIR, os.W_OK | os.X_OK):
        return SYSTEM_RUNTIME_DIR / "admin.sock"
    if client:
        try:
            if (SYSTEM_RUNTIME_DIR / "admin.sock").exists():
                return SYSTEM_RUNTIME_DIR / "admin.sock"
        except PermissionError:  # /run/yapd is the service's, 0750, and this user not in its group
            return SYSTEM_RUNTIME_DIR / "admin.sock"
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    if xdg:
        return Path(xdg) / "yapd" / "admin.sock"
    return Path(f"/tmp/yapd-{os.getuid()}") / "admin.sock"  # noqa: S108 - per-uid dir, 0750, ownership checked in admin
