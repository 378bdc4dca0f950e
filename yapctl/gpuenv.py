"""What the GPU benchmark runs under, besides yapd: byte-compiled packages and,
optionally, a private CUDA MPS daemon.

Both change what start times and latencies mean, so the benchmark records them in its
results instead of leaving them to whoever reads the figures later.
"""

from __future__ import annotations

import compileall
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from yapd.bytecode import has_bytecode, package_dir

PACKAGES = ("torch", "vllm", "transformers")
MPS_CONTROL = "nvidia-cuda-mps-control"


def bytecode_state(packages: Iterable[str] | None = None) -> dict[str, Any]:
    """For each package: its modules, and how many have bytecode this interpreter would
    load. A process importing modules without it compiles them from source first (the
    lent GPU's image sets PYTHONDONTWRITEBYTECODE and ships torch without .pyc)."""
    state: dict[str, Any] = {"dont_write_bytecode": sys.dont_write_bytecode}
    for name in PACKAGES if packages is None else packages:
        root = package_dir(name)
        if root is None:
            state[name] = None
            continue
        sources = list(root.rglob("*.py"))
        cached = sum(1 for src in sources if has_bytecode(src))
        state[name] = {"modules": len(sources), "bytecode": cached}
    return state


def compile_packages(packages: Iterable[str] | None = None) -> dict[str, Any]:
    """Byte-compile the site-packages folders holding these packages, as a pip install
    does, so that every process after this loads bytecode (a start imports far more than
    the packages named: numpy, pydantic, triton...). Returns the seconds it took and
    whether every module compiled."""
    t0 = time.perf_counter()
    names = PACKAGES if packages is None else packages
    roots = sorted({root.parent for root in map(package_dir, names) if root is not None})
    # workers=0: one process per CPU; quiet=1: only errors are printed.
    ok = all([bool(compileall.compile_dir(str(root), quiet=1, workers=0)) for root in roots])
    return {"seconds": round(time.perf_counter() - t0, 1), "ok": ok, "folders": [str(r) for r in roots]}


@dataclass
class MpsDaemon:
    """A private CUDA MPS control daemon for one benchmark run.

    Without MPS the GPU time-slices between processes: the chat and tool EngineCores (and
    two `vllm serve` processes) take turns. Under MPS their kernels share the GPU at once.
    The daemon's pipe and log folders are private to the run (under ``folder``) and set in
    this process's environment, so every process the run starts, including vLLM's
    EngineCores, is a client of this daemon and of no other.
    """

    folder: Path
    started: bool = False

    @property
    def env(self) -> dict[str, str]:
        return {"CUDA_MPS_PIPE_DIRECTORY": str(self.folder / "pipe"),
                "CUDA_MPS_LOG_DIRECTORY": str(self.folder / "log")}

    def _control(self, command: str | None = None, timeout: float = 30) -> subprocess.CompletedProcess[str]:
        binary = shutil.which(MPS_CONTROL)
        if binary is None:
            raise RuntimeError(f"--mps needs {MPS_CONTROL} on PATH (it comes with the NVIDIA driver); not found")
        args = [binary] if command is not None else [binary, "-d"]
        return subprocess.run(args, input=command, env={**os.environ, **self.env}, capture_output=True, text=True,
                              timeout=timeout, check=False)

    def start(self) -> None:
        for path in self.env.values():
            Path(path).mkdir(parents=True, exist_ok=True)
        out = self._control()
        if out.returncode != 0:
            raise RuntimeError(f"{MPS_CONTROL} -d failed ({out.returncode}): {(out.stdout + out.stderr).strip()}")
        self.started = True
        os.environ.update(self.env)  # from here on, every process the run starts is a client

    def log_tail(self, lines: int = 40) -> list[str]:
        """The control daemon's log: which servers it started for which clients, and any
        refusal (the proof that the engines really ran under MPS)."""
        try:
            text = (self.folder / "log" / "control.log").read_text(errors="replace")
        except OSError:
            return []
        return text.splitlines()[-lines:]

    def stop(self) -> None:
        if self.started:
            self._control("quit\n")
            self.started = False
        for key in self.env:
            os.environ.pop(key, None)
