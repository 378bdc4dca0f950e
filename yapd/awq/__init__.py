"""AWQ W4A16 quantization: jobs, cache layout, Hub push."""

from __future__ import annotations

import re
from pathlib import Path


def model_slug(model: str) -> str:
    """A directory name for a model id or path: ``org/name`` -> ``org--name``."""
    base = model.rstrip("/")
    if base.startswith("/") or base.startswith("."):
        base = Path(base).name
    return re.sub(r"[^A-Za-z0-9._-]+", "-", base.replace("/", "--")).strip("-") or "model"


def cache_path(cache_dir: Path, model: str) -> Path:
    return Path(cache_dir) / "awq" / model_slug(model)
