"""Whether the big packages an engine imports will load from bytecode.

A package installed without its ``.pyc`` files (``pip install --no-compile``, images
built with ``PYTHONDONTWRITEBYTECODE=1``) is compiled from source by every process that
imports it, when Python may not write the result: under that variable, or on a read-only
install (systemd's ``ProtectSystem=strict``). For vLLM that is seconds of every start
(measured on a lent H100: importing it took 28 s without its .pyc files, 15 s with them).
Where it can, the daemon writes that bytecode itself, into its own cache directory
(``engines.bytecode_cache``, :func:`write_under`): the first start compiles the packages
from source as before, every later start loads them. Where it cannot, it says so once at
start, with the command that fixes it.
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
        if sys.dont_write_bytecode:
            why = "PYTHONDONTWRITEBYTECODE is set"
        elif not _may_write(_cache_path(folder / "__init__.py")):
            why = "its folder is read-only here" if sys.pycache_prefix is None else "the bytecode folder is read-only"
        else:
            continue  # the first import writes it
        found.append(Uncompiled(name, folder, why))
    return found


def _cache_path(source: Path) -> Path:
    return Path(importlib.util.cache_from_source(str(source)))


def _may_write(path: Path) -> bool:
    """Whether this process could create ``path``: its nearest existing folder is writable
    (the import system creates the folders between, in a source tree or under a prefix)."""
    folder = path.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    return os.access(folder, os.W_OK)


@dataclass(frozen=True)
class Redirect:
    """Bytecode written under ``folder`` (sys.pycache_prefix) for the rest of this process
    and the processes it starts, because ``missing`` had none this process could load or
    write where the install keeps it. ``fresh``: those with none under ``folder`` either
    when it was set, which this start compiles from source (a later one loads them)."""

    folder: Path
    missing: tuple[Uncompiled, ...]
    fresh: tuple[str, ...]


def write_under(folder: Path, packages: Iterable[str]) -> Redirect | None:
    """Where ``packages`` have no bytecode this process may load or write (an image built
    with PYTHONDONTWRITEBYTECODE=1 and pip's --no-compile, a read-only install), import
    every module through a bytecode tree under ``folder`` instead, written as modules are
    first imported. Call it before the packages are imported.

    It sets sys.pycache_prefix and PYTHONPYCACHEPREFIX, so that processes started from
    this one load the same tree, and lets this process and its forked children write it
    whatever PYTHONDONTWRITEBYTECODE said. It takes that variable out of the environment
    too, so that an engine host (an interpreter of its own, whose imports the daemon does
    not share) writes what it compiles there as well, never beside the source; only a
    child started with ``-B`` (multiprocessing's spawn copies the daemon's interpreter
    flags: a spawned EngineCore) still only reads it. Under a prefix Python ignores the source
    tree's own ``__pycache__`` folders, so the first start also compiles the modules that
    had bytecode there (the standard library, numpy...); every later one loads them all.
    A PYTHONPYCACHEPREFIX set already is replaced too: its tree had no bytecode for these
    packages, and this process could not write there. Returns None, changing nothing,
    when every package has bytecode this process loads or writes itself, or when
    ``folder`` cannot be written either (the start-up warning then names the install's
    own reason, with its fix)."""
    missing = uncompiled(packages)
    if not missing or not _may_write(folder / "any.pyc"):
        return None
    sys.pycache_prefix = os.environ["PYTHONPYCACHEPREFIX"] = str(folder)
    sys.dont_write_bytecode = False
    os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
    fresh = tuple(m.package for m in missing if not has_bytecode(m.folder / "__init__.py"))  # under folder now
    return Redirect(folder, tuple(missing), fresh)
