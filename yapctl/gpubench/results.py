"""A run's JSON file, written as each figure is taken, and which machine a phase ran on."""

from __future__ import annotations

import contextlib
import datetime
import json
import subprocess
from pathlib import Path
from typing import Any

from yapctl.gpubench.prompts import PROMPT


class Results:
    def __init__(self, path: Path) -> None:
        self.path = path
        if path.exists():  # phases run in separate calls add to one file
            self.data = json.loads(path.read_text())
            return
        self.data = {"date": datetime.date.today().isoformat(), "machine": gpu_name(), "prompt": dict(PROMPT)}
        try:
            import vllm

            self.data["vllm"] = vllm.__version__
        except ImportError:
            pass

    def put(self, section: str, key: str, value: Any) -> None:
        self.data.setdefault(section, {})[key] = value
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(json.dumps(self.data, indent=1))
        print(f"RESULT {section}.{key} {json.dumps(value)}", flush=True)


def host_identity() -> dict[str, str]:
    """Which machine a phase ran on: the kernel's boot id (a new one on every machine and
    every boot) and the GPU's UUID. Phases of one file can run in separate calls, and a
    lent machine taken back in between means the next call runs on another host, whose
    figures are not comparable with the first's (run o: 20.75 against 19.5 ms at one
    session on the same GPU model)."""
    out: dict[str, str] = {}
    try:
        out["boot_id"] = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        pass
    uuids = _gpu_query("uuid")
    if uuids:
        out["gpu_uuid"] = ",".join(uuids)
    return out


def gpu_name() -> str:
    names = _gpu_query("name")
    return names[0] if names else "unknown"


def _gpu_query(field: str) -> list[str]:
    """One nvidia-smi field of each GPU (none without nvidia-smi). Not torch: a CUDA
    context in this process would hold GPU memory, and make vLLM spawn raw's EngineCores
    whatever --raw-start-method asks."""
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        out = subprocess.run(["nvidia-smi", f"--query-gpu={field}", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=30).stdout
        return [line.strip() for line in out.splitlines() if line.strip()]
    return []
