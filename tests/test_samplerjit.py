"""yapd.engines.samplerjit: the builder of FlashInfer's sampling kernels as a real child
process, in its own session, against a stand-in ``flashinfer`` package (FlashInfer's JIT
needs nvcc and a CUDA install: the real build is proven on the device by a cold start).
The stand-in lays its build out as FlashInfer 0.6.14 does and records the environment
the builder gave it."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import sys
import textwrap
from pathlib import Path

import pytest

from tests.test_daemon import STAND_IN_CHAT, loading_yapd
from yapd.engines.samplerjit import SamplerBuild, built

ROOT = Path(__file__).resolve().parent.parent

FAKE_SAMPLING = textwrap.dedent('''
    import json, os, pathlib, subprocess

    class Spec:
        name = "sampling"

        def _so(self):
            archs = "_".join(a.replace(".", "") + "a" for a in os.environ["FLASHINFER_CUDA_ARCH_LIST"].split())
            return (pathlib.Path(os.environ["FLASHINFER_WORKSPACE_BASE"]) / ".cache" / "flashinfer" / "0.6.14"
                    / archs / "cached_ops" / "sampling" / "sampling.so")

        @property
        def is_compiled(self):
            return self._so().exists()

        def build(self, verbose):
            record = os.environ["FAKE_FI_RECORD"]
            with open(record, "w") as f:
                json.dump({k: os.environ.get(k) for k in ("CUDA_VISIBLE_DEVICES", "FLASHINFER_CUDA_ARCH_LIST")}, f)
            mode = os.environ["FAKE_FI_MODE"]
            if mode == "fail":
                raise RuntimeError("ninja: build stopped\\nnvcc fatal   : Unsupported gpu architecture 'compute_90a'")
            if mode == "hang":  # a compiler that runs on: its pid for the test, then wait for it
                nvcc = subprocess.Popen(["sleep", "300"])
                pathlib.Path(record + ".nvcc").write_text(str(nvcc.pid))
                nvcc.wait()
            self._so().parent.mkdir(parents=True, exist_ok=True)
            self._so().write_bytes(b"\\x7fELF")

    def gen_sampling_module():
        return Spec()
''')


def fake_flashinfer(root: Path) -> Path:
    """The stand-in package under ``root``: the folder to put on PYTHONPATH."""
    pkg = root / "fake" / "flashinfer"
    (pkg / "jit").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "jit" / "__init__.py").write_text("")
    (pkg / "jit" / "sampling.py").write_text(FAKE_SAMPLING)
    return pkg.parent


async def compiler_gone(pid: int) -> None:
    """Until ``pid`` has ended (gone, or a zombie left for a reaper)."""
    for _ in range(2000):
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except FileNotFoundError:
            return
        if state == "Z":
            return
        await asyncio.sleep(0.005)
    pytest.fail(f"the builder's compiler {pid} still runs")


async def pid_in(path: Path) -> int:
    """The stand-in compiler's pid, once the builder has started it (its interpreter's
    start: a second or so)."""
    for _ in range(4000):
        if path.exists() and path.read_text():
            return int(path.read_text())
        await asyncio.sleep(0.005)
    pytest.fail(f"no compiler started ({path})")


@pytest.fixture
def fake(tmp_path):
    pkg = fake_flashinfer(tmp_path) / "flashinfer"
    base = tmp_path / "cache" / "flashinfer"
    record = tmp_path / "record.json"

    def env(mode: str = "ok", **extra: str) -> dict[str, str]:
        unset = ("FLASHINFER_CUDA_ARCH_LIST", "VLLM_USE_FLASHINFER_SAMPLER")
        e = {k: v for k, v in os.environ.items() if k not in unset}
        return {**e, "PYTHONPATH": f"{pkg.parent}{os.pathsep}{ROOT}", "FLASHINFER_WORKSPACE_BASE": str(base),
                "FAKE_FI_MODE": mode, "FAKE_FI_RECORD": str(record), "CUDA_VISIBLE_DEVICES": "0", **extra}

    return env, base, record


async def test_builds_once_seeing_no_gpu_for_the_gpus_architectures(fake, caplog):
    env, base, record = fake
    caplog.set_level(logging.INFO, logger="yapd.engines.samplerjit")
    b = SamplerBuild()
    assert await b.start(env(), lambda: "9.0")
    assert not await b.start(env(), lambda: "9.0")  # one builder at a time
    await b.wait()
    assert b.proc is not None and b.proc.returncode == 0
    assert b.outcome.startswith("sampling built in "), b.outcome
    # No CUDA context in the builder (the engines' memory plans), FlashInfer told the archs
    assert json.loads(record.read_text()) == {"CUDA_VISIBLE_DEVICES": "", "FLASHINFER_CUDA_ARCH_LIST": "9.0"}
    assert built(base) and (base / ".cache/flashinfer/0.6.14/90a/cached_ops/sampling/sampling.so").exists()
    assert "building it beside the engines' start" in caplog.text and "sampling built in" in caplog.text
    record.unlink()
    # Built: a warm start starts nothing, and asks nothing of the GPUs
    assert not await SamplerBuild().start(env(), lambda: pytest.fail("NVML asked on a warm start"))
    assert not record.exists()


async def test_an_arch_list_set_for_yapd_is_the_builders(fake):
    env, base, record = fake
    b = SamplerBuild()
    assert await b.start(env(FLASHINFER_CUDA_ARCH_LIST="8.0 9.0"), lambda: "9.0")
    await b.wait()
    assert json.loads(record.read_text())["FLASHINFER_CUDA_ARCH_LIST"] == "8.0 9.0"
    assert (base / ".cache/flashinfer/0.6.14/80a_90a/cached_ops/sampling/sampling.so").exists()


async def test_nothing_started_where_there_is_nothing_to_build_for(fake):
    env, _, record = fake
    no_base = {k: v for k, v in env().items() if k != "FLASHINFER_WORKSPACE_BASE"}
    assert not await SamplerBuild().start(no_base, lambda: "9.0")
    # vLLM samples without it
    assert not await SamplerBuild().start(env(VLLM_USE_FLASHINFER_SAMPLER="0"), lambda: "9.0")
    assert not await SamplerBuild().start(env(), lambda: None)  # NVML could not tell the GPUs: no folder to build into
    assert not record.exists()


async def test_a_failed_build_is_a_warning_with_its_last_line(fake, caplog):
    env, base, _ = fake
    b = SamplerBuild()
    assert await b.start(env("fail"), lambda: "9.0")
    await b.wait()
    assert b.proc is not None and b.proc.returncode == 1
    assert b.outcome == "RuntimeError: nvcc fatal   : Unsupported gpu architecture 'compute_90a'"
    assert not built(base)
    warning = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert warning and "the engines build it at their first sampling" in warning[0].getMessage()


async def test_a_stop_ends_the_build_and_its_compilers(fake, caplog):
    env, base, record = fake
    caplog.set_level(logging.INFO, logger="yapd.engines.samplerjit")
    b = SamplerBuild()
    assert await b.start(env("hang"), lambda: "9.0")
    pid = await pid_in(record.with_name(record.name + ".nvcc"))
    await asyncio.wait_for(b.stop(), 10)
    assert b.proc is not None and b.proc.returncode is not None and b.proc.returncode < 0
    assert not built(base)
    assert "its build stopped with the daemon" in caplog.text
    await compiler_gone(pid)  # with its session (killpg), not only the builder
    await b.stop()  # ended already: nothing to do


def test_the_builder_module_drives_flashinfers_own_jit_spec(tmp_path):
    """The builder against the real FlashInfer where one is importable (the device; here
    with the kit's source on PYTHONPATH), else its clear error: with FlashInfer's JIT
    turned off, it gets as far as asking FlashInfer's own JitSpec to build. The stand-in
    above once took ``is_compiled`` for a method, as the builder did; 0.6.14's is a
    property, and a cold start on the H100 logged "'bool' object is not callable"."""
    import subprocess

    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    env = {**os.environ, "PYTHONPATH": path, "FLASHINFER_DISABLE_JIT": "1", "FLASHINFER_CUDA_ARCH_LIST": "9.0",
           "FLASHINFER_WORKSPACE_BASE": str(tmp_path / "fi"), "CUDA_VISIBLE_DEVICES": ""}
    out = subprocess.run([sys.executable, "-m", "yapd.engines.samplerjit"], capture_output=True, text=True,
                         env=env, cwd=tmp_path, timeout=120)
    last = out.stdout.strip().splitlines()[-1] if out.stdout.strip() else ""
    assert out.returncode == 1, out
    assert last.startswith(("ModuleNotFoundError: ", "MissingJITCacheError: JIT compilation is disabled")), out


async def test_yapd_starting_a_vllm_engine_builds_it_beside_and_its_stop_ends_the_build(make_yapd, tmp_path):
    """A real yapd whose vLLM chat engine (tests/loading_core.py's stand-in) loads for
    minutes, on a cache dir with no sampler built: the build starts beside the engine's
    start; SIGTERM ends the start, then the build and its compiler, and yapd exits 0."""
    record = tmp_path / "record.json"
    d = loading_yapd(make_yapd, STAND_IN_CHAT, PYTHONPATH=f"{fake_flashinfer(tmp_path)}{os.pathsep}{ROOT}",
                     FLASHINFER_WORKSPACE_BASE=str(tmp_path / "fi"), FLASHINFER_CUDA_ARCH_LIST="9.0",
                     FAKE_FI_MODE="hang", FAKE_FI_RECORD=str(record))
    d.wait_for("building it beside the engines' start", timeout=120)
    d.wait_for("stand-in: Initializing a V1 LLM engine", timeout=120)  # the engine loads meanwhile
    pid = await pid_in(record.with_name(record.name + ".nvcc"))
    assert json.loads(record.read_text()) == {"CUDA_VISIBLE_DEVICES": "", "FLASHINFER_CUDA_ARCH_LIST": "9.0"}
    d.signal(signal.SIGTERM)
    assert d.proc is not None and d.proc.wait(60) == 0, "\n".join(d.lines[-20:])
    d.wait_for("its build stopped with the daemon", timeout=5)
    await compiler_gone(pid)
