"""Receipts of a vLLM engine's first outputs (yapd.engines.receipts), on a stand-in for
vLLM's AsyncLLM that works as 0.26's does where yapd hooks it: requests leave through its
EngineCore client's ``add_request_async`` with internal ids, and an output handler task
takes each batch of outputs from the client's ``get_output_async`` and hands them to the
requests' streams. The real AsyncLLM needs a GPU: tests/test_gpu_vllm.py checks there."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from types import SimpleNamespace
from typing import Any

import pytest

from yapd import config
from yapd.engines import vllm as vllm_engine
from yapd.engines.base import SamplingSpec
from yapd.engines.receipts import Receipts


def test_receipts_stamp_each_requests_first_output_once_and_forget_the_rest():
    r = Receipts()
    r.expect("a-1", "a")
    r.expect("b-1", "b")
    before = time.monotonic()
    r.took(["x-1", "a-1"])  # another engine's request, or one already answered: nothing
    taken = r.first("a")
    assert taken is not None and before <= taken <= time.monotonic()
    r.took(["a-1"])  # a's next outputs
    assert r.first("a") is None  # read once
    r.forget("b")  # ended (cancelled) before its first output came
    r.took(["b-1"])
    assert r.first("b") is None and len(r) == 0


class Client:
    """The AsyncMPClient's two methods yapd wraps; the test plays the EngineCore."""

    def __init__(self) -> None:
        self.sent: asyncio.Queue[Any] = asyncio.Queue()
        self.batches: asyncio.Queue[Any] = asyncio.Queue()

    async def add_request_async(self, request: Any) -> None:
        self.sent.put_nowait(request)

    async def get_output_async(self) -> Any:
        return await self.batches.get()


class Llm:
    """AsyncLLM's way from generate() to the core and back, as far as yapd meets it."""

    def __init__(self, log_stats: bool) -> None:
        self.log_stats = log_stats
        self.engine_core = Client()
        self.output_processor = SimpleNamespace(request_states={})
        self.streams: dict[str, asyncio.Queue[Any]] = {}
        self.handler: asyncio.Task[None] | None = None

    async def generate(self, prompt: Any, sp: Any, request_id: str) -> AsyncIterator[Any]:
        request = SimpleNamespace(request_id=f"{request_id}-1234abcd", external_req_id=request_id)
        self.output_processor.request_states[request.request_id] = object()
        self.streams[request.request_id] = q = asyncio.Queue()
        if self.handler is None:
            self.handler = asyncio.ensure_future(self._output_handler())
        await self.engine_core.add_request_async(request)
        while True:
            out = await q.get()
            yield out
            if out.finished:
                return

    async def _output_handler(self) -> None:
        while True:
            batch = await self.engine_core.get_output_async()  # looked up each time, as vLLM's is
            for o in batch.outputs:
                self.streams[o.request_id].put_nowait(o.output)

    async def abort(self, request_id: str, internal: bool = False) -> None:
        pass


def core_batch(request: Any, first_token_ts: float, text: str, done: bool = False) -> Any:
    metrics = SimpleNamespace(queued_ts=first_token_ts - 0.002, scheduled_ts=first_token_ts - 0.001,
                              first_token_ts=first_token_ts)
    out = SimpleNamespace(outputs=[SimpleNamespace(text=text, token_ids=[1], finish_reason="length" if done else None)],
                          finished=done, prompt_token_ids=[1, 2], num_cached_tokens=0, metrics=metrics)
    return SimpleNamespace(outputs=[SimpleNamespace(request_id=request.request_id, output=out)])


def engine_on(llm: Llm, monkeypatch: pytest.MonkeyPatch) -> vllm_engine.VllmEngine:
    """A ready engine on ``llm``, its hooks installed by what VllmEngine.start calls."""
    monkeypatch.setattr(vllm_engine, "sampling_params", lambda *args: None)
    engine = vllm_engine.VllmEngine("chat", config.from_mapping({}, "test"))
    engine._state, engine._llm = "ready", llm
    engine._hook_client(llm)
    return engine


@pytest.mark.parametrize("log_stats", [True, False])
async def test_a_first_outputs_stamps_say_when_this_process_took_it_from_the_core(monkeypatch, log_stats):
    """Stats on: the first delta's stamps hold when the output handler took the batch, after
    the core stamped it and before the stream read it; later deltas none. Stats off (yapd's
    default): no receipts are kept and nothing is wrapped for them."""
    llm = Llm(log_stats)
    engine = engine_on(llm, monkeypatch)
    assert (engine._receipts is not None) == log_stats
    stream = engine.stream([1, 2], SamplingSpec(max_tokens=2), "r")
    first = asyncio.ensure_future(anext(stream))
    request = await llm.engine_core.sent.get()
    stamped = time.monotonic()
    llm.engine_core.batches.put_nowait(core_batch(request, stamped, "a"))
    delta = await first
    read = time.monotonic()
    assert delta.stamps is not None and delta.stamps.first_token == stamped
    if log_stats:
        assert delta.stamps.taken is not None and stamped <= delta.stamps.taken <= read
        assert set(delta.stamps.ms_since(stamped - 0.01)) == {"queued_ms", "scheduled_ms", "first_token_ms",
                                                               "taken_ms"}
    else:
        assert delta.stamps.taken is None and "taken_ms" not in delta.stamps.ms_since(stamped)
    llm.engine_core.batches.put_nowait(core_batch(request, time.monotonic(), "b", done=True))
    assert [d.stamps async for d in stream] == [None]
    assert engine._receipts is None or len(engine._receipts) == 0
    assert llm.handler is not None
    llm.handler.cancel()


async def test_a_stream_ended_before_its_first_output_leaves_no_receipt(monkeypatch):
    llm = Llm(True)
    engine = engine_on(llm, monkeypatch)
    stream = engine.stream([1, 2], SamplingSpec(max_tokens=2), "r")
    first = asyncio.ensure_future(anext(stream))
    await llm.engine_core.sent.get()
    first.cancel()  # the turn cancelled (a barge-in) before the core answered
    with pytest.raises(asyncio.CancelledError):
        await first
    assert engine._receipts is not None and len(engine._receipts) == 0
    assert llm.handler is not None
    llm.handler.cancel()


def test_a_vllm_without_that_client_takes_no_receipts():
    assert vllm_engine.takes_receipts(SimpleNamespace(log_stats=True)) is None
    assert vllm_engine.takes_receipts(SimpleNamespace(log_stats=True, engine_core=object())) is None
