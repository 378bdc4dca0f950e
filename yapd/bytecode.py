"""Whether the big packages an engine imports will load from bytecode.

A package installed without its ``.pyc`` files (``pip install --no-compile``, images
built with ``PYTHONDONTWRITEBYTECODE=1``) is compiled from source by every process that
imports it, when Python may not write the result: under that variable, or on a read-only
install (systemd's ``ProtectSystem=strict``). For vLLM that is seconds of every start
(measured on a lent H100: importing it took 28 s without its .pyc files, 15 s with them).
The daemon says so once at start, with the command that fixes it.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from yapd.config import Config


def engine_packages(cfg: Config) -> list[str]:
    """The big packages the deployed engines import (vLLM only where it may be used)."""
    vllm = not cfg.demo and any(cfg.deployed(r) and getattr(cfg, r).backend in ("vllm", "auto")
                                for r in ("chat", "tool"))
    return ["torch", "transformers", *(["vllm"] if vllm else [])]


@dataclass(frozen=True)
class Uncompiled:
    package: str
    folder: Path
    why: str  # what keeps this process from writing the bytecode itself

    def advice(self) -> str:
        return (f"{self.package} has no bytecode in {self.folder} and this process cannot write it ({self.why}): "
                f"every start compiles it from source, seconds longer; byte-compile it once: "
                f"{Path(sys.executable).name} -m compileall -q {self.folder}")


def package_dir(name: str) -> Path | None:
    """Where an installed top-level package lives, found without importing it."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def has_bytecode(source: Path) -> bool:
    """Whether this interpreter would load ``source`` from bytecode already written."""
    return Path(importlib.util.cache_from_source(str(source))).exists()


def uncompiled(packages: Iterable[str]) -> list[Uncompiled]:
    """The packages (found without importing them) whose ``__init__`` has no bytecode
    that this interpreter would load, and that this process could not cache either."""
    found = []
    for name in packages:
        folder = package_dir(name)
        if folder is None or not (folder / "__init__.py").exists() or has_bytecode(folder / "__init__.py"):
            continue
        cache = folder / "__pycache__"
        if sys.dont_write_bytecode:
            why = "PYTHONDONTWRITEBYTECODE is set"
        elif not os.access(cache if cache.exists() else folder, os.W_OK):
            why = "its folder is read-only here"
        else:
            continue  # the first import writes it
        found.append(Uncompiled(name, folder, why))
    return found
