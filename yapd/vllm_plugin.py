"""yapd's vLLM plugin: settings for EngineCores that yapd's at-fork hook cannot reach.

A forked EngineCore gets yapd's settings for it in the fork itself (yapd.forking). A
spawned one is a fresh interpreter; the one code of ours it runs is a vLLM general plugin
(entry point group ``vllm.general_plugins``, this package's ``yapd_core``), which vLLM
loads in every process it starts, an EngineCore among them, before the core's threads
start. yapd hands the settings over in the environment, which a spawned process inherits.

The value names the process that set it, and the plugin acts only in that process's
direct children, yapd's spawned EngineCores: in yapd itself, in the processes a core
spawns in turn (tensor-parallel workers) and in a vLLM that yapd did not start (``vllm
serve`` run where yapd's environment is, a script) it does nothing.
"""

from __future__ import annotations

import logging
import os
import sys

# Imported by vLLM in every process it starts, yapd's or not: nothing heavy at the top.
NAME = "yapd_core"
GROUP = "vllm.general_plugins"
SWITCH_INTERVAL_ENV = "YAPD_ENGINECORE_SWITCH_INTERVAL_MS"


# engines.core_switch_interval_ms's range (config.py checks it; 0 there means "not set")
MIN_INTERVAL_MS = 0.01
MAX_INTERVAL_MS = 100.0


def in_engine_core() -> None:
    """The plugin: in a process that yapd's vLLM start spawned, the GIL switch interval
    yapd asked for (engines.core_switch_interval_ms)."""
    ms, parent = _offered(os.environ.get(SWITCH_INTERVAL_ENV, ""))
    if ms is None or parent != os.getppid():
        return
    sys.setswitchinterval(ms / 1000)
    # In the core's log, as vLLM's own lines: the core's own word that it got it.
    logging.getLogger("vllm.yapd_core").info("GIL switch interval %g ms, as yapd asked", ms)


def offer(switch_interval_ms: float) -> None:
    """Hand the switch interval to the EngineCores that vLLM spawns from this process from
    now on (0: none)."""
    if switch_interval_ms:
        os.environ[SWITCH_INTERVAL_ENV] = f"{switch_interval_ms:g}@{os.getpid()}"
    else:
        os.environ.pop(SWITCH_INTERVAL_ENV, None)


def _offered(value: str) -> tuple[float | None, int | None]:
    """(ms, the offering process's id) from the variable; (None, None) where it is not
    one of ours: nothing in it may stop a vLLM start."""
    ms, _, pid = value.partition("@")
    try:
        interval, parent = float(ms), int(pid)
    except ValueError:
        return None, None
    return (interval, parent) if MIN_INTERVAL_MS <= interval <= MAX_INTERVAL_MS else (None, None)


def loadable() -> str | None:
    """Why vLLM would not load this plugin in a spawned EngineCore, or None if it would:
    the package installed without its entry point (run from a source tree), or VLLM_PLUGINS
    naming plugins without it."""
    from importlib import metadata

    if not any(ep.name == NAME and ep.value.startswith(__name__) for ep in metadata.entry_points(group=GROUP)):
        return f"no {GROUP} entry point {NAME} (yapd is not installed, e.g. run from a source tree)"
    allowed = os.environ.get("VLLM_PLUGINS")
    if allowed is not None and NAME not in allowed.split(","):
        return f"VLLM_PLUGINS={allowed} leaves out {NAME}"
    return None
