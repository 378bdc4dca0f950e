"""Held sends (yapd/engines/together.py) on a real event loop, and their wrapping of an
AsyncLLM's EngineCore client (yapd.engines.vllm.sends_together) on a stand-in for one:
vLLM itself runs only on the GPU (tests/test_gpu_vllm.py, test_gpu_a_burst_leaves_together)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

import pytest

from yapd.engines.together import Together
from yapd.engines.vllm import sends_together


@dataclass
class Req:
    request_id: str
    external_req_id: str | None = None


def together(log: list[str], fail: set[str] = frozenset(), wanted: Any = None) -> Together[Req]:  # type: ignore[assignment]
    async def send(request: Req) -> None:
        if request.request_id in fail:
            raise RuntimeError(f"cannot send {request.request_id}")
        log.append(f"sent {request.request_id}")

    return Together(send, lambda r: r.request_id, wanted or (lambda r: True))


async def burst(t: Together[Req], log: list[str], ids: list[str], hold: bool) -> list[asyncio.Task[None]]:
    """Turns that start in one pass: each does its own work, then sends."""

    async def turn(rid: str) -> None:
        log.append(f"built {rid}")
        if hold:
            t.hold(rid)
        await t.send(Req(rid))

    return [asyncio.ensure_future(turn(rid)) for rid in ids]


def test_held_sends_leave_back_to_back_after_the_pass():
    async def main() -> tuple[list[str], list[str]]:
        log: list[str] = []
        t = together(log)
        await asyncio.gather(*await burst(t, log, ["a", "b", "c"], hold=False))
        unheld, log[:] = log[:], []
        await asyncio.gather(*await burst(t, log, ["a", "b", "c"], hold=True))
        assert t.held == 0
        return unheld, log

    unheld, held = asyncio.run(main())
    assert unheld == ["built a", "sent a", "built b", "sent b", "built c", "sent c"]
    assert held == ["built a", "built b", "built c", "sent a", "sent b", "sent c"]


def test_a_hold_is_for_the_next_send_of_its_id_only():
    async def main() -> list[str]:
        log: list[str] = []
        t = together(log)
        t.hold("a")
        t.forget("a")  # its stream ended before its request was made
        await t.send(Req("a"))  # at once: nothing to wait for
        t.hold("b")
        await t.send(Req("b"))
        await t.send(Req("b"))  # a second send of it is not held
        log.append("end")
        return log

    assert asyncio.run(main()) == ["sent a", "sent b", "sent b", "end"]


def test_a_send_cancelled_while_held_never_leaves_and_the_others_do():
    async def main() -> list[str]:
        log: list[str] = []
        t = together(log)
        tasks = await burst(t, log, ["a", "b", "c"], hold=True)
        await asyncio.sleep(0)  # each has run up to its held send
        assert t.held == 3
        tasks[1].cancel()
        await asyncio.gather(tasks[0], tasks[2])
        with pytest.raises(asyncio.CancelledError):
            await tasks[1]
        return log

    assert asyncio.run(main()) == ["built a", "built b", "built c", "sent a", "sent c"]


def test_a_held_request_ended_meanwhile_stays_behind_and_an_error_is_its_own():
    async def main() -> tuple[list[str], list[BaseException | None]]:
        log: list[str] = []
        gone = {"b"}
        t = together(log, fail={"c"}, wanted=lambda r: r.request_id not in gone)
        tasks = await burst(t, log, ["a", "b", "c", "d"], hold=True)
        out = await asyncio.gather(*tasks, return_exceptions=True)
        return log, out

    log, out = asyncio.run(main())
    assert log == ["built a", "built b", "built c", "built d", "sent a", "sent d"]
    assert out[0] is None and out[1] is None and out[3] is None  # b: as if it had left
    assert isinstance(out[2], RuntimeError) and "cannot send c" in str(out[2])


class Client:
    """An AsyncMPClient's part that sends_together wraps."""

    def __init__(self, log: list[str]) -> None:
        self.log = log

    async def add_request_async(self, request: Req) -> None:
        self.log.append(f"sent {request.request_id}")


class OutputProcessor:
    def __init__(self) -> None:
        self.request_states: dict[str, Any] = {}


class Llm:
    """What sends_together reads of vLLM's AsyncLLM: its EngineCore client, its output
    processor's request states (by internal id) and its abort."""

    def __init__(self) -> None:
        self.log: list[str] = []
        self.engine_core = Client(self.log)
        self.output_processor = OutputProcessor()

    async def abort(self, request_id: str, internal: bool = False) -> None:
        self.log.append(f"abort {request_id} internal={internal}")
        states = self.output_processor.request_states
        for key in [request_id] if internal else [k for k in states if k.rpartition("-")[0] == request_id]:
            states.pop(key, None)

    async def add(self, external: str) -> None:
        """As AsyncLLM.add_request: the request in the output processor, then to its core."""
        request = Req(f"{external}-1234abcd", external)
        self.output_processor.request_states[request.request_id] = object()
        await self.engine_core.add_request_async(request)


def test_an_asyncllms_sends_held_by_the_callers_ids():
    async def main() -> list[str]:
        llm = Llm()
        t = sends_together(llm)
        assert t is not None
        await llm.add("now")  # not held: at once
        t.hold("a")
        t.hold("b")
        t.hold("c")
        a, b, c = (asyncio.ensure_future(llm.add(x)) for x in "abc")
        await asyncio.sleep(0)
        llm.log.append("pass over")
        await llm.abort("b")  # yapd's abort of it, by id, while it is held: it never leaves
        c.cancel()  # its turn cancelled while held: vLLM's generate() would abort nothing
        await a
        await b
        with pytest.raises(asyncio.CancelledError):
            await c
        assert llm.output_processor.request_states.keys() == {"now-1234abcd", "a-1234abcd"}
        return llm.log

    log = asyncio.run(main())
    assert log[:3] == ["sent now-1234abcd", "pass over", "abort b internal=False"]
    # (in either order: Python 3.12 sends a at once, in the pass's end, 3.11 a task later)
    assert sorted(log[3:]) == ["abort c-1234abcd internal=True", "sent a-1234abcd"]


def test_a_vllm_without_that_client_sends_as_it_always_did():
    assert sends_together(object()) is None
