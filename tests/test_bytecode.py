"""Packages that every start would compile from source: the bytecode yapd writes for
them under its cache dir, and the start-up warning where it cannot. Real packages on
disk, real interpreters, a real byte-compile, a real read-only mount (ProtectSystem=strict)."""

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
from yapd.bytecode import engine_packages, uncompiled, write_under


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


# An empty pycache prefix stands in for a --no-compile install: the interpreter finds no
# bytecode for any module, and PYTHONDONTWRITEBYTECODE keeps it from writing any.
def _no_bytecode(tmp_path: Path) -> dict[str, str]:
    return {"PYTHONPYCACHEPREFIX": str(tmp_path / "no-pyc"), "PYTHONDONTWRITEBYTECODE": "1"}


def _own_cache(tmp_path: Path, cache_dir: Path) -> tuple[Path, dict[str, str]]:
    """A cache dir of the test's own (the suite's demo models linked in) for a daemon on
    such an install: where its bytecode tree goes, and the daemon's environment."""
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "demo").symlink_to(cache_dir / "demo")
    return cache, {**_no_bytecode(tmp_path), "YAP_CACHE_DIR": str(cache)}


def test_a_real_yapd_without_loadable_bytecode_says_so_at_start(make_yapd, tmp_path):
    """A real daemon told not to write the bytecode itself (engines.bytecode_cache off)
    whose interpreter finds none it may load and may write none: its log names each
    package its engines import, with the compileall command, before any engine loads."""
    d = make_yapd("[engines]\nbytecode_cache = false\n", start=False, env=_no_bytecode(tmp_path))
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


@pytest.fixture
def probe(site, monkeypatch):
    """``yap_bc_probe`` not imported yet, in a process that may not write bytecode and
    has no prefix: an image's PYTHONDONTWRITEBYTECODE=1 over a --no-compile install."""
    monkeypatch.setattr(sys, "dont_write_bytecode", True)
    monkeypatch.setattr(sys, "pycache_prefix", None)
    monkeypatch.setenv("PYTHONDONTWRITEBYTECODE", "1")
    # Set first so that monkeypatch puts it back as it was: write_under sets it.
    monkeypatch.setenv("PYTHONPYCACHEPREFIX", "")
    monkeypatch.delenv("PYTHONPYCACHEPREFIX")
    monkeypatch.setitem(sys.modules, "yap_bc_probe", None)
    del sys.modules["yap_bc_probe"]
    return site / "yap_bc_probe" / "__init__.py"


def _child_reads(site: Path, env: dict[str, str], *flags: str) -> str:
    """What a fresh interpreter with ``flags`` (a spawned EngineCore's: -B), the
    environment inherited, finds in the probe."""
    return subprocess.run([sys.executable, *flags, "-c", "import yap_bc_probe; print(yap_bc_probe.X)"],
                          env={**env, "PYTHONPATH": str(site)}, capture_output=True, text=True,
                          check=True).stdout.strip()


def test_bytecode_an_install_lacks_is_written_under_the_cache_and_loaded_by_children(probe, site, tmp_path,
                                                                                    monkeypatch):
    folder = tmp_path / "cache" / "pycache"
    redirect = write_under(folder, ["yap_bc_probe"])
    assert redirect is not None and redirect.folder == folder
    assert [(m.package, m.why) for m in redirect.missing] == [("yap_bc_probe", "PYTHONDONTWRITEBYTECODE is set")]
    assert sys.pycache_prefix == os.environ["PYTHONPYCACHEPREFIX"] == str(folder)
    assert "PYTHONDONTWRITEBYTECODE" not in os.environ  # children without -B write there too
    assert redirect.fresh == ("yap_bc_probe",)  # this start compiles it
    assert uncompiled(["yap_bc_probe"]) == []  # nothing to warn about: this process writes it
    importlib.import_module("yap_bc_probe")
    assert list(folder.rglob("yap_bc_probe/__init__.*.pyc"))
    assert not (probe.parent / "__pycache__").exists()  # the install's tree stays as it was
    # Proof that a child loads the bytecode rather than the source: the source changed
    # under it with its size and time kept, which is all a .pyc is checked against.
    stat = probe.stat()
    probe.write_text("X = 2\n")
    os.utime(probe, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert _child_reads(site, dict(os.environ), "-B") == "1"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPYCACHEPREFIX"}
    assert _child_reads(site, env, "-B") == "2"  # without the prefix: compiled from source
    # The next start (the same install, the same cache): nothing left to compile.
    monkeypatch.setattr(sys, "dont_write_bytecode", True)
    monkeypatch.setattr(sys, "pycache_prefix", None)
    again = write_under(folder, ["yap_bc_probe"])
    assert again is not None and again.fresh == ()


def test_a_child_interpreter_writes_what_it_compiles_under_the_prefix(probe, site, tmp_path):
    """An engine host is an interpreter of its own, started without -B: what it imports
    and the daemon did not, it writes into the same tree, not beside the source."""
    folder = tmp_path / "pycache"
    assert write_under(folder, ["yap_bc_probe"]) is not None
    (site / "yap_bc_probe" / "host_only.py").write_text("Y = 1\n")
    subprocess.run([sys.executable, "-c", "import yap_bc_probe.host_only"], env={**os.environ, "PYTHONPATH": str(site)},
                   check=True)
    assert list(folder.rglob("yap_bc_probe/host_only.*.pyc"))
    assert not (site / "yap_bc_probe" / "__pycache__").exists()


def test_nothing_is_redirected_where_bytecode_loads_or_may_be_written(probe, tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "dont_write_bytecode", False)  # the first import writes it beside the source
    assert write_under(tmp_path / "pycache", ["yap_bc_probe"]) is None
    monkeypatch.setattr(sys, "dont_write_bytecode", True)
    assert compileall.compile_dir(str(probe.parent), quiet=1)  # pip's own compile
    assert write_under(tmp_path / "pycache", ["yap_bc_probe", "no_such_package_here"]) is None
    assert sys.pycache_prefix is None and "PYTHONPYCACHEPREFIX" not in os.environ and sys.dont_write_bytecode


def test_nothing_is_redirected_into_a_read_only_folder(probe, site, tmp_path):
    """The cache dir itself read-only (a real read-only mount): no redirect, so the
    warning names the install's own reason and fix, not a tree nothing can be written to."""
    with _read_only_copy(site / "yap_bc_probe", tmp_path / "ro") as ro:
        assert write_under(ro / "pycache", ["yap_bc_probe"]) is None
        assert sys.pycache_prefix is None and "PYTHONPYCACHEPREFIX" not in os.environ
        [item] = uncompiled(["yap_bc_probe"])
        assert item.why == "PYTHONDONTWRITEBYTECODE is set"


def test_a_real_yapd_writes_the_bytecode_it_lacks_once_and_loads_it_after(make_yapd, cache_dir, tmp_path):
    """A real daemon on an install without bytecode it may load or write: the first start
    compiles its engines' packages into <cache_dir>/pycache and says so; the next start,
    same install and cache, finds it there: nothing to compile, nothing to warn about."""
    cache, env = _own_cache(tmp_path, cache_dir)
    first = make_yapd(env=env, start=False)
    first.start(timeout=240)  # every module it imports compiles from source first
    [line] = [ln for ln in first.lines if "bytecode under " in ln]
    assert line.endswith(f"bytecode under {cache / 'pycache'} (engines.bytecode_cache): this start compiles "
                         "torch, transformers from source, later ones load it; the install has none this "
                         "process may load or write for torch, transformers (PYTHONDONTWRITEBYTECODE is set)")
    assert not any("has no bytecode" in ln for ln in first.lines)
    assert first.stop(timeout=60) == 0
    assert list((cache / "pycache").rglob("torch/__init__.*.pyc"))
    assert not (tmp_path / "no-pyc").exists()  # the prefix it was given had none, and got none

    second = make_yapd(env=env)
    [line] = [ln for ln in second.lines if "bytecode under " in ln]
    assert "(engines.bytecode_cache): loaded, written by a start before this one; " in line
    assert not any("has no bytecode" in ln for ln in second.lines)


def test_a_real_yapd_whose_bytecode_folder_is_read_only_warns_with_the_fix(make_yapd, cache_dir, tmp_path):
    """<cache_dir>/pycache on a real read-only mount: the daemon promises no tree, and
    says at start, for each package, that every start compiles it and how to fix that."""
    cache, env = _own_cache(tmp_path, cache_dir)
    (tmp_path / "empty").mkdir()
    with _read_only_copy(tmp_path / "empty", cache / "pycache"):
        d = make_yapd(env=env, start=False)
        d.start(wait=False)
        for package in ("torch", "transformers"):
            line = d.wait_for(f"{package} has no bytecode in ", timeout=60)
            assert "(PYTHONDONTWRITEBYTECODE is set)" in line and "-m compileall -q " in line
        assert d.stop(timeout=180) == 0
    assert not any("bytecode under " in ln for ln in d.lines)


def test_engine_hosts_write_the_bytecode_of_what_only_they_import(make_yapd, cache_dir, tmp_path):
    """Both engines in engine hosts (interpreters of their own): the model code only they
    import (transformers' Llama and Qwen2 modelling, the demo models' architectures) lands
    in yapd's tree too, so their next start loads it."""
    from tests.test_hosted import HOSTED

    cache, env = _own_cache(tmp_path, cache_dir)
    d = make_yapd(HOSTED, env=env, start=False)
    d.start(timeout=240)
    assert d.stop(timeout=60) == 0
    for model in ("llama", "qwen2"):
        assert list((cache / "pycache").rglob(f"transformers/models/{model}/modeling_{model}.*.pyc")), model
