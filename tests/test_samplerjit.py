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
import sys
import textwrap
from pathlib import Path

import pytest

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


@pytest.fixture
def fake(tmp_path):
    pkg = tmp_path / "fake" / "flashinfer"
    (pkg / "jit").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "jit" / "__init__.py").write_text("")
    (pkg / "jit" / "sampling.py").write_text(FAKE_SAMPLING)
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
    assert await b.start(env(), "9.0")
    assert not await b.start(env(), "9.0")  # one builder at a time
    await b.wait()
    assert b.proc is not None and b.proc.returncode == 0
    assert b.outcome.startswith("sampling built in "), b.outcome
    # No CUDA context in the builder (the engines' memory plans), FlashInfer told the archs
    assert json.loads(record.read_text()) == {"CUDA_VISIBLE_DEVICES": "", "FLASHINFER_CUDA_ARCH_LIST": "9.0"}
    assert built(base) and (base / ".cache/flashinfer/0.6.14/90a/cached_ops/sampling/sampling.so").exists()
    assert "building it beside the engines' start" in caplog.text and "sampling built in" in caplog.text
    record.unlink()
    assert not await SamplerBuild().start(env(), "9.0")  # built: a warm start starts nothing
    assert not record.exists()


async def test_an_arch_list_set_for_yapd_is_the_builders(fake):
    env, base, record = fake
    b = SamplerBuild()
    assert await b.start(env(FLASHINFER_CUDA_ARCH_LIST="8.0 9.0"), "9.0")
    await b.wait()
    assert json.loads(record.read_text())["FLASHINFER_CUDA_ARCH_LIST"] == "8.0 9.0"
    assert (base / ".cache/flashinfer/0.6.14/80a_90a/cached_ops/sampling/sampling.so").exists()


async def test_nothing_started_where_there_is_nothing_to_build_for(fake):
    env, _, record = fake
    no_base = {k: v for k, v in env().items() if k != "FLASHINFER_WORKSPACE_BASE"}
    assert not await SamplerBuild().start(no_base, "9.0")
    assert not await SamplerBuild().start(env(VLLM_USE_FLASHINFER_SAMPLER="0"), "9.0")  # vLLM samples without it
    assert not await SamplerBuild().start(env(), None)  # NVML could not tell the GPUs: no folder to build into
    assert not record.exists()


async def test_a_failed_build_is_a_warning_with_its_last_line(fake, caplog):
    env, base, _ = fake
    b = SamplerBuild()
    assert await b.start(env("fail"), "9.0")
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
    assert await b.start(env("hang"), "9.0")
    nvcc_pid = record.with_name(record.name + ".nvcc")
    for _ in range(2000):  # the builder's child up (its interpreter's start: a second or so)
        if nvcc_pid.exists() and nvcc_pid.read_text():
            break
        await asyncio.sleep(0.005)
    pid = int(nvcc_pid.read_text())
    await asyncio.wait_for(b.stop(), 10)
    assert b.proc is not None and b.proc.returncode is not None and b.proc.returncode < 0
    assert not built(base)
    assert "its build stopped with the daemon" in caplog.text
    # The compiler went with its session (killpg), not only the builder: gone or a zombie
    # left for a reaper.
    for _ in range(2000):
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except FileNotFoundError:
            break
        if state == "Z":
            break
        await asyncio.sleep(0.005)
    else:
        pytest.fail(f"the builder's compiler {pid} still runs")
    await b.stop()  # ended already: nothing to do


def test_the_builder_module_reports_a_missing_flashinfer(tmp_path):
    import subprocess

    out = subprocess.run([sys.executable, "-m", "yapd.engines.samplerjit"], capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(ROOT)}, cwd=tmp_path, timeout=60)
    if out.returncode == 0:
        pytest.skip("flashinfer is installed here")
    assert out.returncode == 1 and out.stdout.strip().splitlines()[-1].startswith("ModuleNotFoundError: "), out
