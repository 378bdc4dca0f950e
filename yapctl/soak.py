"""Load and soak test for yapd, loopback only, bounded in time and count.

    python -m yapctl.soak --duration 120 --rate 300            # starts its own demo daemon
    python -m yapctl.soak --url ws://127.0.0.1:8000/ws --key K --pid PID

It drives, at once and for ``--duration`` seconds:

* connection cycles at ``--rate`` a second (at most ``--concurrency`` in flight), a
  random mix of: connect + ping + close; connect + start + cancel + close; start then an
  abrupt drop (TCP abort, no close frame); a wrong key (must get authentication_failed
  and close 1008); a full turn; a half-open TCP connection that dies mid-handshake;
* a barge-in storm: one session sending ``--storm-rate`` starts a second, checking that
  every turn's ``done`` comes before the next ``ack`` and nothing of a turn follows its
  ``done``;
* slow readers: clients that ask for large replies and never read; the daemon must cut
  each one off (it logs "slow client cut off" and counts it in /metrics);
* a probe session running whole turns, whose inter-token gaps are measured in a last
  phase with and without slow readers around.

Afterwards it waits for the daemon to settle and checks: no open connection, no engine
request in flight (/status), the daemon's RSS back within ``--rss-slack`` of the
figure taken after warm-up and within ``--rss-tail-slack`` of it over the load's second
half (sampled each second: a leak goes on growing, an allocator's arenas level off), no
file-descriptor growth (/proc/PID/fd), every slow reader
cut off, no protocol violation. It prints the figures and exits 1 when an invariant
failed.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import json
import os
import random
import socket
import statistics
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake

from yapctl.localyapd import LocalYapd

LOOPBACK = {"127.0.0.1", "::1", "localhost"}
SOAK_KEY = "soak_key"
# Log lines of a turn the engine failed (reported to the client as engine_unavailable,
# then its done): counted as engine faults, apart from the daemon's own errors.
ENGINE_FAULT_LINES = ("yapd.engine.cpu: generation failed", "yapd.turn: turn failed")
DEFAULT_MIX = "ping=3,turn_cancel=4,drop=2,badauth=1,full_turn=0.3,half_open=0.7"


# --- a demo daemon of our own ------------------------------------------------------


def demo_daemon(server: dict[str, Any] | None = None, *, cache_dir: str | None = None) -> LocalYapd:
    """``python -m yapd --demo`` on 127.0.0.1 in a temporary directory of its own, keyed
    with SOAK_KEY (not started)."""
    return LocalYapd(Path(tempfile.mkdtemp(prefix="yapd-soak-")), SOAK_KEY, server=server, cache_dir=cache_dir)


# --- measurements ------------------------------------------------------------------


def proc_rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


def proc_threads(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("Threads:"):
                return int(line.split()[1])
    return 0


def proc_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def proc_fd_kinds(pid: int) -> dict[str, int]:
    """Open fds by kind (socket, pipe, anon_inode:[eventpoll], a file path...), to say
    what grew when the count did."""
    kinds: collections.Counter[str] = collections.Counter()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
            kinds[target.split(":[")[0] if target.startswith(("socket:", "pipe:")) else target] += 1
    return dict(kinds)


def http_get(base: str, path: str, key: str | None) -> tuple[int, str]:
    req = urllib.request.Request(base + path)  # noqa: S310 -- base is http://<loopback> (checked in run())
    if key:
        req.add_header("X-API-Key", key)
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:  # noqa: S310 -- loopback http only
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def metric_sum(text: str, name: str, label: str = "") -> float:
    """Sum of a Prometheus sample family's values (optionally those whose labels contain ``label``)."""
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and (not label or label in line):
            with contextlib.suppress(ValueError, IndexError):
                total += float(line.rsplit(" ", 1)[1])
    return total


def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))]


# --- the load ----------------------------------------------------------------------


@dataclass
class Stats:
    outcomes: collections.Counter[str] = field(default_factory=collections.Counter)
    violations: list[str] = field(default_factory=list)
    violation_count: int = 0
    storm_starts: int = 0
    storm_dones: int = 0
    storm_cancelled: int = 0
    storm_errors: collections.Counter[str] = field(default_factory=collections.Counter)
    storm_s: float = 0.0
    slow_started: int = 0
    slow_cut: int = 0
    slow_cut_s: list[float] = field(default_factory=list)
    slow_bytes_asked: int = 0
    probe_turns: collections.Counter[str] = field(default_factory=collections.Counter)
    engine_faults: collections.Counter[str] = field(default_factory=collections.Counter)
    probe_gaps: dict[str, list[float]] = field(default_factory=lambda: collections.defaultdict(list))

    def engine_fault(self, text: str) -> None:
        self.engine_faults[text[:160]] += 1

    def violation(self, text: str) -> None:
        self.violation_count += 1
        if len(self.violations) < 30:
            self.violations.append(text)


class Load:
    def __init__(self, url: str, key: str, args: argparse.Namespace, stats: Stats) -> None:
        self.url = url
        self.key = key
        self.args = args
        self.stats = stats
        parts = urlsplit(url)
        self.host = parts.hostname or "127.0.0.1"
        self.port = parts.port or 80
        self.base = f"{parts.scheme.replace('ws', 'http')}://{parts.netloc}"
        # A reproducible load pattern, not a secret: a seeded PRNG is the point.
        self.rng = random.Random(args.seed)  # noqa: S311
        self.mix = parse_mix(args.mix)
        self.seq = 0

    def ws_url(self, key: str | None) -> str:
        parts = urlsplit(self.url)
        return f"{parts.scheme}://{parts.netloc}{parts.path or '/ws'}" + (f"?api_key={key}" if key else "")

    def rid(self, prefix: str) -> str:
        self.seq += 1
        return f"{prefix}{self.seq}"

    def connect(self, key: str | None = None, **kw: Any) -> Any:
        return connect(self.ws_url(self.key if key is None else key), open_timeout=15, close_timeout=5,
                       max_size=None, compression=None, **kw)

    # one cycle ----------------------------------------------------------------------

    async def cycle(self, kind: str) -> None:
        try:
            await asyncio.wait_for(getattr(self, f"cycle_{kind}")(), self.args.cycle_timeout)
            self.stats.outcomes[f"{kind}:ok"] += 1
        except asyncio.TimeoutError:
            self.stats.outcomes[f"{kind}:timeout"] += 1
            self.stats.violation(f"{kind}: no answer within {self.args.cycle_timeout}s")
        except Refused as exc:
            self.stats.outcomes[f"{kind}:refused:{exc}"] += 1
        except EngineFault as exc:
            self.stats.outcomes[f"{kind}:engine_error"] += 1
            self.stats.engine_fault(str(exc))
        except Violation as exc:
            self.stats.outcomes[f"{kind}:violation"] += 1
            self.stats.violation(f"{kind}: {exc}")
        except (ConnectionClosed, InvalidHandshake, OSError) as exc:
            self.stats.outcomes[f"{kind}:conn_error"] += 1
            self.stats.violation(f"{kind}: connection failed: {type(exc).__name__}: {exc}")

    async def _first(self, ws: ClientConnection) -> dict[str, Any]:
        msg = json.loads(await ws.recv())
        if msg.get("type") == "error" and msg.get("error_code") == "server_at_capacity":
            raise Refused("at_capacity")
        return msg

    async def cycle_ping(self) -> None:
        async with self.connect() as ws:
            await ws.send('{"type":"ping"}')
            msg = await self._first(ws)
            if msg.get("type") != "pong":
                raise Violation(f"ping answered with {msg}")

    async def _turn_until(self, ws: ClientConnection, rid: str, stop_at: str,
                          seen: list[dict[str, Any]] | None = None) -> list[dict[str, Any]]:
        """Read one turn's messages until ``stop_at`` (a type) or its done, checking they
        are its own; ``seen`` are the turn's messages read already."""
        msgs: list[dict[str, Any]] = list(seen or [])
        while True:
            msg = await self._first(ws) if not msgs else json.loads(await ws.recv())
            msgs.append(msg)
            if msg.get("request_id") != rid:
                raise Violation(f"message of another turn in {rid}: {msg}")
            if msg["type"] == "error":
                if msg.get("error_code") != "engine_unavailable":
                    raise Violation(f"error in turn {rid}: {msg}")
                fault = msg  # the engine failed this turn: its done must still follow
                while msg["type"] != "done":
                    msg = json.loads(await ws.recv())
                    if msg.get("request_id") != rid:
                        raise Violation(f"after the error of {rid}: {msg}")
                raise EngineFault(fault.get("message", ""))
            if len(msgs) == 1 and msg["type"] != "ack":
                raise Violation(f"turn {rid} began with {msg['type']}, not ack")
            if msg["type"] == stop_at:
                return msgs
            if msg["type"] == "done":
                return msgs

    async def cycle_turn_cancel(self) -> None:
        async with self.connect() as ws:
            rid = self.rid("tc")
            await send_start(ws, rid, "hello there")
            msgs = await self._turn_until(ws, rid, "ack")
            await ws.send('{"type":"cancel"}')
            if msgs[-1]["type"] != "done":
                msgs = await self._turn_until(ws, rid, "done", msgs)
            # Nothing of the turn after its done: the next message answers our ping.
            await ws.send('{"type":"ping"}')
            msg = json.loads(await ws.recv())
            if msg.get("type") != "pong":
                raise Violation(f"after done of {rid}: {msg}")

    async def cycle_drop(self) -> None:
        ws = await self.connect()
        rid = self.rid("dr")
        await send_start(ws, rid, "drop me")
        if self.rng.random() < 0.5:
            msg = await self._first(ws)
            if msg.get("type") != "ack":
                raise Violation(f"start answered with {msg}")
            if self.rng.random() < 0.5:
                await asyncio.sleep(self.rng.random() * 0.05)
        ws.transport.abort()  # no close frame: a dead client

    async def cycle_badauth(self) -> None:
        async with self.connect(key="wrong-" + str(self.rng.randrange(1 << 30))) as ws:
            msg = json.loads(await ws.recv())
            if msg.get("error_code") != "authentication_failed":
                raise Violation(f"bad key answered with {msg}")
            try:
                await ws.recv()
                raise Violation("bad key: connection left open")
            except ConnectionClosed as exc:
                if exc.rcvd is None or exc.rcvd.code != 1008:
                    raise Violation(f"bad key closed with {exc.rcvd}") from None

    async def cycle_full_turn(self) -> None:
        async with self.connect() as ws:
            rid = self.rid("ft")
            await send_start(ws, rid, "tell me something")
            msgs = await self._turn_until(ws, rid, "done")
            check_complete_turn(msgs)

    async def cycle_half_open(self) -> None:
        _, writer = await asyncio.open_connection(self.host, self.port)
        try:
            if self.rng.random() < 0.5:
                writer.write(b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websock")
                await writer.drain()
        finally:
            writer.transport.abort()

    # the barge-in storm -------------------------------------------------------------

    async def storm(self, stop: asyncio.Event) -> None:
        """Starts at ``--storm-rate`` on one session. Every start must end in exactly one
        of: its ack ... done (cancelled by the next start, or complete), or a
        rate_limited refusal; no message of a turn after its done, no ack before the
        previous turn's done."""
        st = self.stats
        async with self.connect(ping_interval=None) as ws:
            finished: set[str] = set()
            current: list[str | None] = [None]
            settled = [0]  # starts that got their done, or were refused
            sent = [0]
            stopping = [False]
            all_settled = asyncio.Event()

            def settle_one() -> None:
                settled[0] += 1
                if stopping[0] and settled[0] >= sent[0]:
                    all_settled.set()

            async def reader() -> None:
                while True:
                    msg = json.loads(await ws.recv())
                    kind, rid = msg.get("type"), msg.get("request_id")
                    if kind == "error":
                        code = msg.get("error_code", "?")
                        st.storm_errors[code] += 1
                        if code == "engine_unavailable" and rid is not None and rid == current[0]:
                            st.engine_fault(msg.get("message", ""))
                            continue  # the turn's done follows and settles it
                        if code != "rate_limited":
                            st.violation(f"storm: {msg}")
                        settle_one()
                        continue
                    if kind == "pong":
                        continue
                    if rid in finished:
                        st.violation(f"storm: {kind} of {rid} after its done")
                        continue
                    if kind == "ack":
                        if current[0] is not None:
                            st.violation(f"storm: ack of {rid} before done of {current[0]}")
                        current[0] = rid
                    elif rid != current[0]:
                        st.violation(f"storm: {kind} of {rid} while {current[0]} is current")
                    if kind == "done":
                        finished.add(rid)
                        current[0] = None
                        st.storm_dones += 1
                        st.storm_cancelled += bool(msg.get("cancelled"))
                        settle_one()

            task = asyncio.create_task(reader())
            loop = asyncio.get_running_loop()
            t0 = next_t = loop.time()
            try:
                while not stop.is_set():
                    rid = self.rid("st")
                    sent[0] += 1
                    st.storm_starts += 1
                    await ws.send(json.dumps({"type": "start", "session_id": "storm", "user_utterance":
                                              f"storm {rid}", "request_id": rid}))
                    next_t += 1 / self.args.storm_rate
                    delay = next_t - loop.time()
                    if delay > 0:
                        with contextlib.suppress(asyncio.TimeoutError):
                            await asyncio.wait_for(stop.wait(), delay)
                st.storm_s = loop.time() - t0
                await ws.send('{"type":"cancel"}')
                # Every start must be settled: its done, or its refusal.
                stopping[0] = True
                if settled[0] >= sent[0]:
                    all_settled.set()
                waiter = asyncio.create_task(all_settled.wait())
                await asyncio.wait([waiter, task], timeout=30, return_when=asyncio.FIRST_COMPLETED)
                waiter.cancel()
                if settled[0] < sent[0]:
                    st.violation(f"storm: {sent[0] - settled[0]} of {sent[0]} starts never got a done or "
                                 f"an error (current turn {current[0]})")
            finally:
                st.storm_s = st.storm_s or loop.time() - t0
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, ConnectionClosed):
                    await task

    # slow readers -------------------------------------------------------------------

    async def slow_reader(self) -> None:
        """Ask for large replies and never read them; return once the daemon cut us off."""
        st = self.stats
        st.slow_started += 1
        sock = socket.socket(socket.AF_INET6 if ":" in self.host else socket.AF_INET, socket.SOCK_STREAM)
        # A small receive window: the daemon's buffers fill in a moment, not after megabytes.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, (self.host, self.port))
        t0 = time.monotonic()
        ws = await connect(self.ws_url(self.key), sock=sock, open_timeout=15, ping_interval=None, max_queue=1,
                           max_size=None, compression=None)
        big = "y" * 48 * 1024
        i = 0
        try:
            while True:
                i += 1
                # set_persona echoes user_identity in its ack: 48 KiB back per message.
                await ws.send(json.dumps({"type": "set_persona", "user_identity": f"{i}{big}"}))
                st.slow_bytes_asked += len(big)
                if i % 16 == 0:
                    await asyncio.sleep(0.01)
                if time.monotonic() - t0 > self.args.slow_timeout:
                    st.violation(f"slow reader not cut off after {self.args.slow_timeout}s")
                    return
        except ConnectionClosed as exc:
            if exc.rcvd is not None and exc.rcvd.code not in (1008, 1013):
                st.violation(f"slow reader closed with {exc.rcvd} instead of being cut off")
            st.slow_cut += 1
            st.slow_cut_s.append(time.monotonic() - t0)
        finally:
            ws.transport.abort()

    async def slow_readers(self, n: int, stop: asyncio.Event) -> None:
        async def one_slot() -> None:
            while not stop.is_set():
                await self.slow_reader()

        await asyncio.gather(*(one_slot() for _ in range(n)))

    # the probe ----------------------------------------------------------------------

    async def probe(self, stop: asyncio.Event, phase: list[str]) -> None:
        st = self.stats
        async with self.connect() as ws:
            while not stop.is_set():
                rid = self.rid("pr")
                label = phase[0]
                await ws.send(json.dumps({"type": "start", "session_id": "probe", "user_utterance":
                                          "tell me a story", "request_id": rid}))
                msgs: list[dict[str, Any]] = []
                last = None
                gaps: list[float] = []
                while True:
                    msg = json.loads(await asyncio.wait_for(ws.recv(), self.args.cycle_timeout))
                    now = time.perf_counter()
                    msgs.append(msg)
                    if msg["type"] == "token":
                        if last is not None:
                            gaps.append(now - last)
                        last = now
                    if msg["type"] == "done":
                        break
                errors = [m for m in msgs if m["type"] == "error"]
                if errors and all(m.get("error_code") == "engine_unavailable" for m in errors) \
                        and msgs[-1].get("error") == "engine_unavailable":
                    st.probe_turns[f"{label}:engine_error"] += 1
                    st.engine_fault(errors[0].get("message", ""))
                    continue
                try:
                    check_complete_turn(msgs)
                except Violation as exc:
                    st.violation(f"probe: {exc}")
                    st.probe_turns[f"{label}:bad"] += 1
                    continue
                if label == phase[0]:  # a turn that straddled phases counts for neither
                    st.probe_turns[label] += 1
                    st.probe_gaps[label].extend(gaps)

    # the launcher -------------------------------------------------------------------

    async def cycles(self, seconds: float, max_cycles: int) -> tuple[int, float]:
        loop = asyncio.get_running_loop()
        sem = asyncio.Semaphore(self.args.concurrency)
        tasks: set[asyncio.Task[None]] = set()
        kinds, weights = zip(*self.mix.items(), strict=True)
        interval = 1 / self.args.rate
        t0 = loop.time()
        end = t0 + seconds
        next_t = t0
        launched = 0
        while loop.time() < end and launched < max_cycles:
            await sem.acquire()
            kind = self.rng.choices(kinds, weights)[0]
            task = asyncio.create_task(self.cycle(kind))
            tasks.add(task)

            def done(t: asyncio.Task[None]) -> None:
                tasks.discard(t)
                sem.release()

            task.add_done_callback(done)
            launched += 1
            next_t += interval
            delay = next_t - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            elif delay < -1:
                next_t = loop.time()  # fell behind: go on at the rate, no burst
        elapsed = loop.time() - t0
        if tasks:
            await asyncio.wait(tasks)
        return launched, elapsed


class Violation(Exception):
    pass


class EngineFault(Exception):
    """A turn ended by engine_unavailable, then its done: the protocol held, the engine did not."""


class Refused(Exception):
    pass


async def send_start(ws: ClientConnection, rid: str, utterance: str) -> None:
    """A turn's start, with the request id as its session id too."""
    await ws.send(json.dumps({"type": "start", "session_id": rid, "user_utterance": utterance, "request_id": rid}))


def check_complete_turn(msgs: list[dict[str, Any]]) -> None:
    types = [m["type"] for m in msgs]
    if not types or types[0] != "ack" or types[-1] != "done":
        raise Violation(f"turn shape {types[:4]}...{types[-3:]}")
    rid = msgs[0]["request_id"]
    if any(m.get("request_id") != rid for m in msgs):
        raise Violation(f"mixed request ids in {rid}")
    if msgs[-1].get("cancelled") or msgs[-1].get("error"):
        raise Violation(f"turn {rid} ended {msgs[-1]}")
    body = [t for t in types[1:-1] if t not in ("toolcall", "token")]
    if body not in ([], ["final"]):
        raise Violation(f"turn {rid} body {body}")


def parse_mix(text: str) -> dict[str, float]:
    mix = {}
    for part in text.split(","):
        name, _, weight = part.partition("=")
        name = name.strip()
        if name not in ("ping", "turn_cancel", "drop", "badauth", "full_turn", "half_open"):
            raise SystemExit(f"soak: unknown cycle kind {name!r} in --mix")
        mix[name] = float(weight or 1)
    return mix


# --- the run -----------------------------------------------------------------------


async def settle(load: Load, timeout: float) -> dict[str, Any]:
    """Wait until /status shows no connection and no engine request in flight."""
    t0 = time.monotonic()
    st: dict[str, Any] = {}
    while True:
        code, body = await asyncio.to_thread(http_get, load.base, "/status", load.key)
        if code == 200:
            st = json.loads(body)
            active = st["capacity"]["active"]
            in_flight = sum(e.get("in_flight", 0) for e in st["engines"].values())
            if active == 0 and in_flight == 0:
                return {"active": 0, "in_flight": 0, "settle_s": round(time.monotonic() - t0, 2)}
        if time.monotonic() - t0 > timeout:
            return {"active": st.get("capacity", {}).get("active"),
                    "in_flight": sum(e.get("in_flight", 0) for e in st.get("engines", {}).values()),
                    "settle_s": None}
        await asyncio.sleep(0.1)


def snapshot(pid: int | None) -> dict[str, Any]:
    if pid is None:
        return {}
    return {"rss_kib": proc_rss_kib(pid), "fds": proc_fds(pid), "threads": proc_threads(pid),
            "fd_kinds": proc_fd_kinds(pid)}


async def settled_snapshot(pid: int | None, before: dict[str, Any], fd_slack: int,
                           timeout: float) -> dict[str, Any]:
    """The process figures once its fd count is back to ``before`` (+ slack), or at
    ``timeout``: sockets of connections that just ended close within close_timeout, and
    the last /status request's own socket may still be open."""
    t0 = time.monotonic()
    while True:
        snap = snapshot(pid)
        if not snap or snap["fds"] <= before["fds"] + fd_slack or time.monotonic() - t0 > timeout:
            snap["fd_settle_s"] = round(time.monotonic() - t0, 2)
            return snap
        await asyncio.sleep(0.2)


async def sample_rss(pid: int, t_start: float, samples: list[tuple[float, int]], every: float = 1.0) -> None:
    """(seconds into the load, RSS KiB) every ``every`` s until cancelled: whether the
    growth levels off (an allocator's arenas filling) or goes on (a leak)."""
    while True:
        with contextlib.suppress(RuntimeError, OSError):
            samples.append((round(time.monotonic() - t_start, 1), proc_rss_kib(pid)))
        await asyncio.sleep(every)


def rss_growth(before: int, after: int, samples: list[tuple[float, int]], load_s: float) -> tuple[float, float | None]:
    """RSS growth over the whole load and over its second half, each a fraction of the
    figure before the load; None for the half when no sample was taken by the midpoint."""
    mid = [kib for t, kib in samples if t <= load_s / 2]
    return (after - before) / before, (after - mid[-1]) / before if mid else None


async def soak(url: str, key: str, pid: int | None, args: argparse.Namespace) -> dict[str, Any]:
    stats = Stats()
    load = Load(url, key, args, stats)
    report: dict[str, Any] = {"url": url.split("?")[0], "duration_s": args.duration, "rate": args.rate,
                              "concurrency": args.concurrency, "storm_rate": args.storm_rate,
                              "slow_readers": args.slow_readers, "mix": load.mix, "seed": args.seed}
    # Warm-up: the first turns allocate caches and pools; measure from after them.
    if args.warmup > 0:
        wstop = asyncio.Event()
        wphase = ["warmup"]
        probe = asyncio.create_task(load.probe(wstop, wphase))
        await load.cycles(args.warmup, args.max_cycles)
        wstop.set()
        await probe
        stats.outcomes.clear()
        stats.probe_turns.clear()
        stats.probe_gaps.clear()
    report["settle_before"] = await settle(load, args.settle_timeout)
    before = snapshot(pid)
    _, metrics0 = await asyncio.to_thread(http_get, load.base, "/metrics", key)
    t_start = time.monotonic()
    rss_samples: list[tuple[float, int]] = []
    sampler = asyncio.create_task(sample_rss(pid, t_start, rss_samples)) if pid is not None else None

    # Phase 1: everything at once.
    main_s = args.duration * 0.7
    stop = asyncio.Event()
    phase = ["load"]
    side = [asyncio.create_task(load.storm(stop)), asyncio.create_task(load.probe(stop, phase))]
    if args.slow_readers:
        side.append(asyncio.create_task(load.slow_readers(args.slow_readers, stop)))
    launched, elapsed = await load.cycles(main_s, args.max_cycles)
    stop.set()
    for res in await asyncio.gather(*side, return_exceptions=True):
        if isinstance(res, BaseException):
            stats.violation(f"side task failed: {type(res).__name__}: {res}")

    # Phase 2: the probe's token gaps alone, then with slow readers stuck beside it.
    gap_s = args.duration * 0.15
    for label, slow in (("alone", 0), ("with_slow_readers", max(1, args.slow_readers))):
        stop2 = asyncio.Event()
        phase[0] = label
        tasks = [asyncio.create_task(load.probe(stop2, phase))]
        if slow:
            tasks.append(asyncio.create_task(load.slow_readers(slow, stop2)))
        await asyncio.sleep(gap_s)
        stop2.set()
        for res in await asyncio.gather(*tasks, return_exceptions=True):
            if isinstance(res, BaseException):
                stats.violation(f"{label}: task failed: {type(res).__name__}: {res}")
    load_s = time.monotonic() - t_start
    report["load_s"] = round(load_s, 1)
    if sampler is not None:
        sampler.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await sampler

    report["settle_after"] = after_settle = await settle(load, args.settle_timeout)
    after = await settled_snapshot(pid, before, args.fd_slack, args.settle_timeout)
    _, metrics1 = await asyncio.to_thread(http_get, load.base, "/metrics", key)
    cut_by_daemon = (metric_sum(metrics1, "yapd_connections_total", 'outcome="slow_client"')
                     - metric_sum(metrics0, "yapd_connections_total", 'outcome="slow_client"'))
    kinds = collections.Counter(k.split(":")[0] for k in stats.outcomes)
    ok = collections.Counter(k.split(":")[0] for k, n in stats.outcomes.items() for _ in range(n) if k.endswith(":ok"))
    report["cycles"] = {"launched": launched, "seconds": round(elapsed, 1),
                        "per_s": round(launched / elapsed, 1) if elapsed else None,
                        "ok": sum(ok.values()), "outcomes": dict(sorted(stats.outcomes.items())),
                        "kinds": dict(kinds)}
    report["storm"] = {"starts": stats.storm_starts, "dones": stats.storm_dones,
                       "cancelled": stats.storm_cancelled, "errors": dict(stats.storm_errors),
                       "starts_per_s": round(stats.storm_starts / stats.storm_s, 1) if stats.storm_s else None}
    report["slow_readers_stats"] = {"started": stats.slow_started, "cut_off": stats.slow_cut,
                                    "cut_by_daemon_metric": int(cut_by_daemon),
                                    "cut_after_s_p50": _r(pct(stats.slow_cut_s, 0.5)),
                                    "cut_after_s_max": _r(max(stats.slow_cut_s, default=None))}
    report["probe"] = {
        label: {"turns": stats.probe_turns[label], "gaps": len(stats.probe_gaps[label]),
                "gap_ms_p50": _ms(pct(stats.probe_gaps[label], 0.5)),
                "gap_ms_p99": _ms(pct(stats.probe_gaps[label], 0.99)),
                "gap_ms_mean": _ms(statistics.fmean(stats.probe_gaps[label]) if stats.probe_gaps[label] else None)}
        for label in ("load", "alone", "with_slow_readers")}
    report["process"] = {"before": before, "after": after}
    report["engine_faults"] = {"turns": sum(stats.engine_faults.values()), "why": dict(stats.engine_faults)}
    report["violations"] = stats.violations
    report["violation_count"] = stats.violation_count

    # The invariants.
    failed: list[str] = []
    if after_settle["active"] != 0:
        failed.append(f"active connections {after_settle['active']} after the load")
    if after_settle["in_flight"] != 0:
        failed.append(f"engine requests in flight {after_settle['in_flight']} after the load")
    if before and after:
        growth, tail = rss_growth(before["rss_kib"], after["rss_kib"], rss_samples, load_s)
        report["process"]["rss_growth_pct"] = round(100 * growth, 2)
        report["process"]["rss_tail_growth_pct"] = None if tail is None else round(100 * tail, 2)
        report["process"]["rss_mib"] = [(t, round(kib / 1024, 1)) for t, kib in rss_samples]
        if growth > args.rss_slack:
            failed.append(f"RSS grew {100 * growth:.1f}% (> {100 * args.rss_slack:.0f}%)")
        if tail is not None and tail > args.rss_tail_slack:
            failed.append(f"RSS grew {100 * tail:.1f}% over the load's second half "
                          f"(> {100 * args.rss_tail_slack:g}%): still growing")
        if after["fds"] > before["fds"] + args.fd_slack:
            grew = {k: after["fd_kinds"].get(k, 0) - n for k, n in before["fd_kinds"].items()}
            grew.update({k: n for k, n in after["fd_kinds"].items() if k not in before["fd_kinds"]})
            failed.append(f"file descriptors {before['fds']} -> {after['fds']} "
                          f"({ {k: d for k, d in grew.items() if d} })")
    if stats.violation_count:
        failed.append(f"{stats.violation_count} protocol violations")
    if stats.slow_started and stats.slow_cut < stats.slow_started:
        failed.append(f"{stats.slow_started - stats.slow_cut} slow readers not cut off")
    if stats.slow_cut and cut_by_daemon < stats.slow_cut:
        failed.append(f"daemon counted {cut_by_daemon:g} slow clients, clients saw {stats.slow_cut} cut-offs")
    if sum(ok.values()) == 0:
        failed.append("no cycle succeeded")
    report["failed"] = failed
    return report


def _r(v: float | None) -> float | None:
    return None if v is None else round(v, 2)


def _ms(v: float | None) -> float | None:
    return None if v is None else round(1000 * v, 2)


def print_report(rep: dict[str, Any], out: Any = sys.stdout) -> None:
    c, s, sl, p = rep["cycles"], rep["storm"], rep["slow_readers_stats"], rep["process"]
    print(f"yapd soak: {rep['url']}  load {rep['load_s']} s (asked {rep['duration_s']} s)", file=out)
    print(f"  cycles: {c['launched']} launched in {c['seconds']} s = {c['per_s']}/s (asked {rep['rate']}/s, "
          f"<= {rep['concurrency']} in flight); {c['ok']} ok", file=out)
    for k, n in c["outcomes"].items():
        print(f"    {k:28} {n}", file=out)
    print(f"  barge-in storm: {s['starts']} starts ({s['starts_per_s']}/s) on one session, {s['dones']} dones, "
          f"{s['cancelled']} cancelled, errors {s['errors'] or 'none'}", file=out)
    print(f"  slow readers: {sl['started']} started, {sl['cut_off']} cut off (daemon counted "
          f"{sl['cut_by_daemon_metric']}), cut after p50 {sl['cut_after_s_p50']} s, max {sl['cut_after_s_max']} s",
          file=out)
    for label, g in rep["probe"].items():
        print(f"  probe [{label}]: {g['turns']} turns, {g['gaps']} token gaps, p50 {g['gap_ms_p50']} ms, "
              f"p99 {g['gap_ms_p99']} ms, mean {g['gap_ms_mean']} ms", file=out)
    sb, sa = rep["settle_before"], rep["settle_after"]
    print(f"  after the load: active {sa['active']}, engine requests in flight {sa['in_flight']} "
          f"(settled in {sa['settle_s']} s; before: active {sb['active']}, in flight {sb['in_flight']})", file=out)
    if p["before"]:
        b, a = p["before"], p["after"]
        print(f"  daemon RSS {b['rss_kib'] / 1024:.1f} -> {a['rss_kib'] / 1024:.1f} MiB "
              f"({p.get('rss_growth_pct')}%; over the load's second half {p.get('rss_tail_growth_pct')}%), "
              f"fds {b['fds']} -> {a['fds']}, threads {b['threads']} -> {a['threads']}",
              file=out)
    ef = rep["engine_faults"]
    if ef["turns"]:
        print(f"  engine faults: {ef['turns']} turns ended engine_unavailable (error, then done): "
              f"{'; '.join(f'{n}x {w}' for w, n in ef['why'].items())}", file=out)
    for v in rep["violations"]:
        print(f"  violation: {v}", file=out)
    if rep.get("daemon_log"):
        print(f"  daemon log: {rep['daemon_log']}", file=out)
    print("  result: " + ("OK" if not rep["failed"] else "FAILED: " + "; ".join(rep["failed"])), file=out)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m yapctl.soak", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--duration", type=float, default=60.0, help="seconds of load after warm-up (default 60)")
    p.add_argument("--warmup", type=float, default=None, help="seconds of warm-up load (default: duration/6, <= 20)")
    p.add_argument("--rate", type=float, default=200.0, help="connection cycles launched a second (default 200)")
    p.add_argument("--concurrency", type=int, default=48, help="cycles in flight at most (default 48)")
    p.add_argument("--max-cycles", type=int, default=1_000_000, help="stop launching after this many cycles")
    p.add_argument("--mix", default=DEFAULT_MIX, help=f"cycle kinds and weights (default {DEFAULT_MIX})")
    p.add_argument("--storm-rate", type=float, default=50.0, help="barge-in starts a second on one session")
    p.add_argument("--slow-readers", type=int, default=2, help="clients that stop reading, at any time")
    p.add_argument("--slow-timeout", type=float, default=60.0, help="a slow reader not cut off by then fails")
    p.add_argument("--cycle-timeout", type=float, default=30.0, help="a cycle not done by then fails")
    p.add_argument("--settle-timeout", type=float, default=30.0)
    p.add_argument("--rss-slack", type=float, default=0.05, help="allowed RSS growth, a fraction (default 0.05)")
    p.add_argument("--rss-tail-slack", type=float, default=0.01,
                   help="allowed RSS growth over the load's second half, a fraction of the figure before "
                        "it (default 0.01): a leak goes on growing, arenas level off")
    p.add_argument("--fd-slack", type=int, default=0, help="allowed growth in open fds (default 0)")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--url", help="ws://127.0.0.1:PORT/ws of a running yapd (default: start a demo daemon)")
    p.add_argument("--key", default=os.environ.get("YAP_API_KEY", ""), help="API key for --url")
    p.add_argument("--pid", type=int, help="the --url daemon's pid, for RSS and fd figures")
    p.add_argument("--cache-dir", help="YAP_CACHE_DIR for the demo daemon's models")
    p.add_argument("--json", metavar="PATH", help="also write the report as JSON to PATH ('-': stdout)")
    return p


def run(argv: list[str] | None = None) -> dict[str, Any]:
    args = parser().parse_args(argv)
    if args.warmup is None:
        args.warmup = min(20.0, args.duration / 6)
    if args.seed is None:
        args.seed = random.randrange(1 << 31)  # noqa: S311 -- a seed to print and replay, not a secret
    daemon = None
    if args.url:
        host = urlsplit(args.url).hostname or ""
        if host not in LOOPBACK:
            raise SystemExit(f"soak: {host!r} is not a loopback address; this tool only loads a local daemon")
        url, key, pid = args.url, args.key, args.pid
    else:
        slots = args.concurrency + 2 * args.slow_readers + 8
        daemon = demo_daemon({"max_connections": slots, "rate_limit_per_s": max(100.0, 4 * args.storm_rate),
                              "rate_limit_burst": 400, "send_timeout_s": 2.0, "write_buffer_bytes": 256 * 1024},
                             cache_dir=args.cache_dir).start(timeout=180)
        url, key, pid = daemon.url(None), SOAK_KEY, daemon.pid
    try:
        rep = _run_loop(soak(url, key, pid, args))
    finally:
        if daemon is not None:
            rc = daemon.stop()
    if daemon is not None:
        lines = daemon.lines
        rep["daemon_log"] = {
            "lines": len(lines),
            "warnings": sum(" warning " in ln for ln in lines),
            "errors": sum(" error " in ln or " critical " in ln for ln in lines),
            "tracebacks": sum("Traceback" in ln for ln in lines),
            "slow_client_lines": sum("slow client cut off" in ln for ln in lines),
            "exit_code": rc,
        }
        bad = [ln for ln in lines if (" error " in ln or " critical " in ln or "Traceback" in ln)
               and not any(f in ln for f in ENGINE_FAULT_LINES)]
        rep["daemon_log"]["engine_fault_lines"] = sum(any(f in ln for f in ENGINE_FAULT_LINES) for ln in lines)
        rep["daemon_log_samples"] = bad[:5]
        if bad:
            rep["failed"].append(f"{len(bad)} error lines in the daemon's log, e.g. {bad[0][:300]}")
        if rc != 0:
            rep["failed"].append(f"daemon exited {rc}")
    return rep


def _run_loop(coro: Any) -> Any:
    try:
        import uvloop
    except ImportError:  # pragma: no cover
        return asyncio.run(coro)
    return uvloop.run(coro)


def main(argv: list[str] | None = None) -> int:
    rep = run(argv)
    args = parser().parse_args(argv)
    print_report(rep)
    if args.json:
        text = json.dumps(rep, indent=2)
        if args.json == "-":
            print(text)
        else:
            Path(args.json).write_text(text + "\n")
    return 1 if rep["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
