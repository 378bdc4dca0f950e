"""``yapd [--config PATH] [--demo] [--host H] [--port P] [--admin-socket PATH] [--log-level L]``"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
import threading
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

from yapd import __version__
from yapd.config import ConfigError

DEFAULT_CONFIG = Path("/etc/yapd/config.toml")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="yapd", description="Realtime text inference daemon for voice agents.")
    p.add_argument("--config", "-c", metavar="PATH",
                   help=f"TOML config (default: $YAPD_CONFIG, else {DEFAULT_CONFIG} where it exists, not with --demo)")
    p.add_argument("--demo", action="store_true", default=None,
                   help="serve tiny random-weight demo models on the CPU (random text; no GPU, no network)")
    p.add_argument("--host", help="listen address (server.host)")
    p.add_argument("--port", type=int, help="listen port (server.port; 0 picks a free one)")
    p.add_argument("--admin-socket", metavar="PATH", help="admin Unix socket path (admin.socket)")
    p.add_argument("--log-level", choices=["debug", "info", "warning", "error"], help="logging.level")
    p.add_argument("--check-config", action="store_true", help="validate the config, print it, and exit")
    p.add_argument("--version", action="version", version=f"yapd {__version__}")
    return p


def main(argv: list[str] | None = None) -> int:
    # SIGHUP's default action ends the process: one sent before the event loop takes it
    # (logrotate's, an operator's; a first demo start builds its models meanwhile) would
    # stop yapd, not reload it. Noted here, reloaded once the loop runs.
    early_hup = threading.Event()
    signal.signal(signal.SIGHUP, lambda *_: early_hup.set())
    args = parser().parse_args(argv)
    path = args.config or os.environ.get("YAPD_CONFIG")
    # A demo on a host where the service runs is not that service: its config (0640,
    # group yapd) is read only when named.
    if path is None and not args.demo and DEFAULT_CONFIG.exists():
        path = str(DEFAULT_CONFIG)
    overrides = {"server.host": args.host, "server.port": args.port, "admin.socket": args.admin_socket,
                 "logging.level": args.log_level, "demo": args.demo}
    from yapd import gcpause

    gcpause.hold_for_start()  # before the imports: the daemon's, then torch's and vLLM's
    from yapd import config, daemon

    try:
        cfg = config.load(path, overrides=overrides)
    except ConfigError as exc:
        print(f"yapd: config error: {exc}", file=sys.stderr)
        return 2
    if args.check_config:
        import dataclasses
        import json

        shown = dataclasses.asdict(cfg)
        shown["server"]["api_keys"] = [f"<{len(k)} chars>" for k in cfg.server.api_keys]
        shown["awq"]["hf_token"] = "<set>" if cfg.awq.hf_token else ""
        print(json.dumps(shown, indent=2))
        return 0
    bytecode = daemon.cache_env(cfg)
    try:
        cfg = daemon.prepare(cfg)
    except Exception as exc:
        print(f"yapd: cannot prepare models: {exc}", file=sys.stderr)
        return 1
    d = daemon.Daemon(cfg, path, overrides, early_hup, bytecode)
    if delay := float(os.environ.get("YAPD_DEBUG_BEFORE_LOOP_DELAY_S") or 0):
        # A test hook: a window before the event loop runs, open until a SIGHUP comes.
        print("yapd: debug: waiting before the event loop", file=sys.stderr, flush=True)
        early_hup.wait(delay)
    return run_loop(d.run(), cfg.server.event_loop)


def run_loop(main: Coroutine[Any, Any, int], kind: str) -> int:
    """uvloop when asked or (auto) when installed: its loop costs less per message."""
    if kind != "asyncio":
        try:
            import uvloop
        except ImportError:
            if kind == "uvloop":
                main.close()
                print("yapd: server.event_loop is uvloop but uvloop is not installed", file=sys.stderr)
                return 2
        else:
            return int(uvloop.run(main))
    return asyncio.run(main)
