"""The start-up warning about packages that every start compiles from source: real
packages on disk, a real byte-compile, a real read-only mount (ProtectSystem=strict)."""

from __future__ import annotations

import compileall
import contextlib
import importlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

from yapd import config
from yapd.bytecode import engine_packages, uncompiled


@pytest.fixture
def site(tmp_path, monkeypatch):
    """A folder on sys.path holding package ``yap_bc_probe`` with no bytecode."""
    root = tmp_path / "site"
    (root / "yap_bc_probe").mkdir(parents=True)
    (root / "yap_bc_probe" / "__init__.py").write_text("X = 1\n")
    monkeypatch.syspath_prepend(str(root))
    importlib.invalidate_caches()
    return root


def test_no_bytecode_and_not_allowed_to_write_it_is_reported_with_the_fix(site, monkeypatch):
    monkeypatch.setattr(sys, "dont_write_bytecode", True)
    [item] = uncompiled(["yap_bc_probe", "no_such_package_here"])
    assert item.package == "yap_bc_probe" and item.folder == site / "yap_bc_probe"
    assert item.why == "PYTHONDONTWRITEBYTECODE is set"
    advice = item.advice()
    assert "every start compiles it from source" in advice
    assert advice.endswith(f"-m compileall -q {site / 'yap_bc_probe'}")
    # The advice works: once compiled, nothing to say.
    assert compileall.compile_dir(str(site / "yap_bc_probe"), quiet=1)
    assert uncompiled(["yap_bc_probe"]) == []


def test_a_process_that_may_write_bytecode_writes_it_itself(site, monkeypatch):
    monkeypatch.setattr(sys, "dont_write_bytecode", False)
    assert uncompiled(["yap_bc_probe"]) == []


@contextlib.contextmanager
def _read_only_copy(src: Path, mnt: Path):
    """``src``'s files on a tmpfs remounted read-only, as systemd's ProtectSystem leaves /opt."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
    try:
        subprocess.run(["cp", "-r", str(src), str(mnt)], check=True)
        subprocess.run(["mount", "-o", "remount,ro", str(mnt)], check=True)
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_a_read_only_install_without_bytecode_is_reported(site, tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "dont_write_bytecode", False)
    with _read_only_copy(site / "yap_bc_probe", tmp_path / "ro") as ro:
        monkeypatch.syspath_prepend(str(ro))
        importlib.invalidate_caches()
        [item] = uncompiled(["yap_bc_probe"])
        assert item.folder == ro / "yap_bc_probe" and item.why == "its folder is read-only here"


@pytest.mark.parametrize(("deploy", "backend", "demo", "expect"), [
    ("both", "auto", False, ["torch", "transformers", "vllm"]),
    ("tool", "vllm", False, ["torch", "transformers"]),  # the chat engine is not deployed
    ("chat", "cpu", False, ["torch", "transformers"]),
    ("both", "vllm", True, ["torch", "transformers"]),  # --demo runs the CPU engine
])
def test_the_daemon_checks_the_packages_its_engines_import(deploy, backend, demo, expect):
    cfg = config.from_mapping({"demo": demo, "engines": {"deploy": deploy}, "chat": {"backend": backend},
                               "tool": {"backend": "cpu"}}, "test")
    assert engine_packages(cfg) == expect


def test_a_real_yapd_without_loadable_bytecode_says_so_at_start(make_yapd, tmp_path):
    """A real daemon whose interpreter finds no bytecode it may load (an empty pycache
    prefix stands in for a --no-compile install) and may write none: its log names each
    package its engines import, with the compileall command, before any engine loads."""
    d = make_yapd(start=False, env={"PYTHONPYCACHEPREFIX": str(tmp_path / "no-pyc"), "PYTHONDONTWRITEBYTECODE": "1"})
    d.start(wait=False)
    for package in ("torch", "transformers"):
        line = d.wait_for(f"{package} has no bytecode in ", timeout=60)
        assert "(PYTHONDONTWRITEBYTECODE is set)" in line and "-m compileall -q " in line
    assert not any("vllm has no bytecode" in ln for ln in d.lines)  # --demo: the CPU engine, no vLLM
    # A stop while the engines load waits for the load in progress (its imports from source
    # took 17-30+ s on this project's 2-CPU machine), then exits cleanly.
    assert d.stop(timeout=180) == 0
    assert not (tmp_path / "no-pyc").exists()  # it really wrote none


def test_a_real_yapd_with_its_bytecode_says_nothing(make_yapd):
    d = make_yapd()  # the test venv: pip compiled every package
    assert not any("has no bytecode" in ln for ln in d.lines)
