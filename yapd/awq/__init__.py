"""AWQ W4A16 quantization: jobs, cache layout, Hub push.

This module is the cache and nothing heavier: engines import it to find a checkpoint,
so it must not import torch or the quantization library. The job itself is
:mod:`yapd.awq.job` (a separate process), the daemon's side :mod:`yapd.awq.jobs`,
the Hub upload :mod:`yapd.awq.push`.

Layout: ``<cache_dir>/awq/<model-slug>/`` holds one finished checkpoint (config.json,
weights, tokenizer, ``awq_metadata.json``, README.md). A job writes into a hidden
sibling ``.<slug>.tmp-<pid>`` and renames it into place as its very last step, so an
entry either is complete or does not exist; ``awq_metadata.json`` is written last
inside the temporary directory and an entry without it is never used.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from yapd.config import Config, EngineConfig

log = logging.getLogger("yapd.awq")

METADATA_FILE = "awq_metadata.json"
METADATA_VERSION = 1
TMP_MARK = ".tmp-"
OLD_MARK = ".old-"


class AwqError(Exception):
    """A quantization job or its cache failed; the message is for the operator."""


class AwqSettingsError(AwqError):
    """The settings cannot work (no token, no repo, ...): found before any quantizing."""


def model_slug(model: str, revision: str = "") -> str:
    """A directory name for a model id or path: ``org/name`` -> ``org--name``, and
    ``org--name@v2`` where the engine names a Hub revision (``main`` too: the name says
    which weights were quantized, not what a branch points to now).

    A local directory gets its base name plus a short hash of its absolute path, so
    two different ``.../tool`` directories never share a cache entry; it has no revision."""
    base = model.rstrip("/")
    if _is_local(base):
        full = str(Path(base).expanduser().resolve())
        digest = hashlib.sha256(full.encode()).hexdigest()[:8]
        base, revision = f"{Path(full).name}-{digest}", ""
    slug = _safe(base.replace("/", "--")) or "model"
    # No Hub repo name has an "@": an entry of another revision never shares its folder.
    return f"{slug}@{_safe(revision)}" if _safe(revision) else slug


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-.")


def cache_root(cache_dir: Path) -> Path:
    return Path(cache_dir) / "awq"


def cache_path(cache_dir: Path, model: str, revision: str = "") -> Path:
    return cache_root(cache_dir) / model_slug(model, revision)


def tmp_path(final: Path, pid: int | None = None) -> Path:
    """Where a job builds ``final`` before the rename: hidden, same filesystem."""
    return final.parent / f".{final.name}{TMP_MARK}{os.getpid() if pid is None else pid}"


def read_metadata(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads((path / METADATA_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def section(meta: dict[str, Any], name: str) -> dict[str, Any]:
    """A table of the metadata, or {} when a hand-edited file lacks it."""
    value = meta.get(name)
    return value if isinstance(value, dict) else {}


def is_complete(path: Path) -> bool:
    """A finished entry: metadata (written last) and a config that says how it is quantized."""
    if read_metadata(path) is None:
        return False
    try:
        cfg = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(cfg, dict) and isinstance(cfg.get("quantization_config"), dict)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def cleanup(final: Path) -> None:
    """Tidy what an interrupted job left next to ``final``.

    Temporary directories of dead jobs go. A crash between the two renames of a
    rebuild (old entry moved aside, new one not yet in place) leaves ``final`` missing
    and a complete ``.old-`` copy: that copy is put back, as if the rebuild never ran."""
    parent = final.parent
    if not parent.is_dir():
        return
    for entry in parent.iterdir():
        name = entry.name
        if not name.startswith(f".{final.name}."):
            continue
        mark, _, pid_text = name[len(final.name) + 1:].rpartition("-")
        if not pid_text.isdigit() or f"{mark}-" not in (TMP_MARK, OLD_MARK):
            continue
        if _pid_alive(int(pid_text)) and int(pid_text) != os.getpid():
            continue  # a job still running owns it
        if f"{mark}-" == OLD_MARK and not final.exists() and is_complete(entry):
            log.warning("restoring AWQ cache entry %s from an interrupted rebuild", final)
            os.rename(entry, final)
            continue
        log.info("removing leftover AWQ build directory %s", entry)
        shutil.rmtree(entry, ignore_errors=True)


def find_cached(cache_dir: Path, model: str, revision: str = "") -> Path | None:
    """The finished cache entry for ``model`` at ``revision``, or None."""
    final = cache_path(cache_dir, model, revision)
    with contextlib.suppress(OSError):
        cleanup(final)
    return final if is_complete(final) else None


def _fsync_tree(path: Path) -> None:
    for root, _dirs, files in os.walk(path):
        for name in files:
            fd = os.open(os.path.join(root, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    _fsync_dir(path)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def commit(tmp: Path, final: Path) -> None:
    """Make ``tmp`` the entry ``final`` with renames only (never a half-copied tree).

    The data is flushed first so a power cut after the rename cannot expose files
    whose blocks never reached the disk."""
    if not is_complete(tmp):
        raise AwqError(f"{tmp} is not a complete AWQ checkpoint; not committing it")
    _fsync_tree(tmp)
    old = final.parent / f".{final.name}{OLD_MARK}{os.getpid()}"
    if final.exists():
        os.rename(final, old)
    os.rename(tmp, final)
    _fsync_dir(final.parent)
    shutil.rmtree(old, ignore_errors=True)


def _is_local(model: str) -> bool:
    return model.startswith(("/", ".", "~")) or os.path.isdir(model)


def is_prequantized(name: str) -> bool:
    """A Hub repo (or directory) that is already AWQ: its name says so. For a directory
    only its own name counts, not the folders it sits in."""
    base = Path(name.rstrip("/")).name if _is_local(name) else name
    return "awq" in base.lower()


def source_for(ecfg: EngineConfig) -> str | None:
    """The float model a job would quantize for this engine, or None when the engine
    uses a pre-quantized AWQ repo (``awq_model`` / a model whose name says AWQ)."""
    if ecfg.awq_model or is_prequantized(ecfg.model) or not ecfg.model:
        return None
    return ecfg.model


def needs_build(ecfg: EngineConfig, cfg: Config) -> bool:
    """awq mode, a float source model, and no finished cache entry for it."""
    if ecfg.quantization != "awq":
        return False
    source = source_for(ecfg)
    return source is not None and find_cached(cfg.cache_dir(), source, ecfg.revision) is None


def resolve_model(role: str, ecfg: EngineConfig, cfg: Config) -> str:
    """The checkpoint an engine loads: in awq mode a pre-quantized repo or the cache
    entry built from the float model, else the configured model."""
    if ecfg.quantization != "awq":
        return ecfg.model
    if ecfg.awq_model:
        return ecfg.awq_model
    if is_prequantized(ecfg.model):
        return ecfg.model
    cached = find_cached(cfg.cache_dir(), ecfg.model, ecfg.revision)
    if cached is None:
        from yapd.engines.base import EngineError

        raise EngineError(f"{role}: quantization is awq but no AWQ model is cached for {ecfg.model}; "
                          "run `yapctl awq rebuild` or set awq_model (AWQ_CHAT_MODEL / AWQ_TOOL_MODEL)")
    meta = read_metadata(cached) or {}
    q = section(meta, "quantization")
    if (q.get("group_size"), q.get("bits")) != (cfg.awq.group_size, cfg.awq.bits):
        log.warning("%s: cached AWQ model %s was built with bits=%s group_size=%s, the config says %s/%s; "
                    "using it anyway (`yapctl awq rebuild %s` builds it again)", role, cached, q.get("bits"),
                    q.get("group_size"), cfg.awq.bits, cfg.awq.group_size, role)
    log.info("%s: using cached AWQ model %s (built %s)", role, cached, meta.get("created", "?"))
    return str(cached)


_TOKEN_RE = re.compile(r"hf_[A-Za-z0-9]{8,}")


def scrub(text: str, *secrets: str) -> str:
    """``text`` with every Hugging Face token (the ones given, and anything shaped like
    one) replaced, for messages that reach logs, yapctl or the journal."""
    for secret in secrets:
        if secret and len(secret) >= 4:
            text = text.replace(secret, "***")
    return _TOKEN_RE.sub("hf_***", text)
