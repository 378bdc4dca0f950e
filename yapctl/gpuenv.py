"""What the GPU benchmark runs under, besides yapd: byte-compiled packages (and, with
``--mps``, yapd.mps's daemon around the phases that are not yapd's).

Both change what start times and latencies mean, so the benchmark records them in its
results instead of leaving them to whoever reads the figures later.
"""

from __future__ import annotations

import compileall
import sys
import time
from collections.abc import Iterable
from typing import Any

from yapd.bytecode import has_bytecode, package_dir

PACKAGES = ("torch", "vllm", "transformers")


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
