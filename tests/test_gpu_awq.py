"""AWQ on the GPU (run on the device): a yapd in awq mode with no cached build
quantizes the kit's tiny-qwen2 with the real job on the GPU, loads the result through
the vLLM backend, streams a turn, and on a restart reuses the cache.

YAPD_AWQ_PYTHON names the interpreter the job runs with where llmcompressor lives
beside vLLM in another path (the device carries it apart from vLLM's wheels)."""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path

import pytest

from tests.conftest import Yapd, run_turn, ws_connect
from tests.test_gpu_vllm import MODEL, _cuda
from tests.test_protocol_e2e import check_turn

# Cold starts compile for minutes: far beyond the suite's per-test default.
pytestmark = [pytest.mark.gpu, pytest.mark.timeout(1200), pytest.mark.skipif(not _cuda(), reason="needs CUDA and vllm")]


def _config(cache: Path) -> str:
    python = os.environ.get("YAPD_AWQ_PYTHON", "")
    return f"""
[engines]
deploy = "chat"
cache_dir = "{cache}"
[chat]
model = "{MODEL}"
backend = "vllm"
quantization = "awq"
gpu_memory_utilization = 0.30
max_model_len = 4096
[awq]
group_size = 32
calibration_samples = 16
calibration_max_len = 256
device = "cuda:0"
python = "{python}"
"""


async def test_gpu_awq_build_load_stream_reuse(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    d = Yapd(tmp_path / "run", cache, demo=False, config=_config(cache))
    t0 = time.perf_counter()
    d.start(timeout=900)
    try:
        print(f"first start (quantize + load) {time.perf_counter() - t0:.1f} s")
        done = d.wait_for("AWQ job done role=chat")
        print(done)
        built = Path(re.search(r"path=(\S+)", done).group(1))  # type: ignore[union-attr]
        meta = json.loads((built / "awq_metadata.json").read_text())
        assert meta and (built / "README.md").exists()
        qcfg = json.loads((built / "config.json").read_text())["quantization_config"]
        print("quantization_config.quant_method =", qcfg.get("quant_method"), "format =", qcfg.get("format"))
        assert qcfg.get("quant_method") == "compressed-tensors"
        st = json.loads(d.http("/status")[1])
        assert st["engines"]["chat"]["model"] == str(built), st["engines"]
        async with ws_connect(d.url()) as ws:
            check_turn(await run_turn(ws, user_utterance="who was Columbus?"), tool=False)
    finally:
        d.stop(60)
    # Second start: the cached build is reused, nothing is quantized again.
    d2 = Yapd(tmp_path / "run2", cache, demo=False, config=_config(cache))
    t0 = time.perf_counter()
    d2.start(timeout=600)
    try:
        print(f"second start (cache reused) {time.perf_counter() - t0:.1f} s")
        assert not any("AWQ job starting" in line for line in d2.lines)
        async with ws_connect(d2.url()) as ws:
            check_turn(await run_turn(ws), tool=False)
    finally:
        d2.stop(60)
