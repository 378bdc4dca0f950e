"""The network edge: one asyncio ``websockets`` server on one port.

``/ws`` carries the protocol; plain HTTP ``GET /healthz``, ``/status`` and ``/metrics``
are answered from websockets' own ``process_request`` hook, before any upgrade. All
protocol decisions live in :mod:`yapd.session`; this module reads frames, enforces
limits, and writes.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import http
import json
import logging
from typing import Any
from urllib.parse import parse_qs, urlsplit

from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

from yapd import forking, protocol
from yapd.config import origin_of
from yapd.runtime import Runtime
from yapd.session import Session
from yapd.timeouts import polled, within

log = logging.getLogger("yapd.server")


class _ClientGone(ConnectionClosed, protocol.ClientGone):
    """ConnectionClosed for this module's handlers, ClientGone for the socket-free session."""

WS_PATHS = ("/ws", "/")
# Unsent bytes a connection may hold past server.write_buffer_bytes: a send waits at the
# limit with one frame past it (a final reply's text), the answers to a client's pings
# (a keepalive every 20 s) come on top; far more than either is a flood.
CONTROL_SLACK_BYTES = 256 * 1024


def _json_response(conn: ServerConnection, status: int, body: Any) -> Response:
    resp = conn.respond(status, json.dumps(body, separators=(",", ":")) + "\n")
    del resp.headers["Content-Type"]
    resp.headers["Content-Type"] = "application/json"
    resp.headers["Cache-Control"] = "no-store"
    return resp


def _header(request: Request, name: str) -> str | None:
    """One header's value; None when it is absent or repeated (two keys are no one's key:
    refused as missing, never guessed; websockets' ``get`` raises on a repeated one)."""
    values = request.headers.get_all(name)
    return values[0] if len(values) == 1 else None


def request_key(request: Request) -> str | None:
    """The API key of a request: ``X-API-Key``, ``Authorization: Bearer``, or ``?api_key=``.
    A header given is the key, or no key where repeated: never the next place instead
    (two X-API-Key headers and a valid query key let the query key in)."""
    if request.headers.get_all("X-API-Key"):
        return _header(request, "X-API-Key") or None
    if request.headers.get_all("Authorization"):
        auth = _header(request, "Authorization")
        if auth is None:
            return None
        if auth.lower().startswith("bearer "):
            return auth[7:].strip()
    values = parse_qs(urlsplit(request.path).query).get("api_key")
    return values[0] if values else None


def frame_cap(max_frame_bytes: int) -> int:
    """The largest frame a connection reads. Frames up to max_frame_bytes are served;
    bigger ones up to this cap get a message_too_large error and the connection stays;
    past it websockets closes the connection (1009). Set at start, for every connection."""
    return max(4 * max_frame_bytes, max_frame_bytes + (1 << 20))


class YapServer:
    def __init__(self, rt: Runtime) -> None:
        self.rt = rt
        self.hard_cap = frame_cap(rt.cfg.server.max_frame_bytes)
        self._server: Server | None = None
        self._conns: dict[Session, ServerConnection] = {}
        # Each connection's wait for its next frame: when it began, and its deadline, which
        # a reload of server.idle_timeout_s moves (Python 3.11+: asyncio.Timeout).
        self._waits: dict[Session, tuple[float, Any]] = {}

    @property
    def port(self) -> int:
        assert self._server is not None
        return int(self._server.sockets[0].getsockname()[1])

    async def start(self, host: str, port: int) -> None:
        s = self.rt.cfg.server
        self._server = await serve(
            self._handle, host, port,
            process_request=self._process_request,
            max_size=self.hard_cap,
            # Token frames are tiny and latency-bound: compression costs more than it saves.
            compression=None,
            write_limit=s.write_buffer_bytes,
            ping_interval=20, ping_timeout=20, close_timeout=5,
            server_header=f"yapd/{self.rt.version}",
            logger=logging.getLogger("yapd.websockets"),
            create_connection=self._connection_class(s.write_buffer_bytes + CONTROL_SLACK_BYTES),
        )
        for sock in self._server.sockets:
            forking.protect(sock)
        log.info("listening host=%s port=%d", host, self.port)

    def _connection_class(self, most_unsent: int) -> type[ServerConnection]:
        """websockets answers a client's ping with a pong written at once, with no limit
        (yapd's own sends wait at write_buffer_bytes, its answers to control frames do
        not): a client that sent pings and never read grew the daemon by 3.5 GB in a
        minute, until its idle timeout. A connection whose unsent bytes pass
        ``most_unsent`` is aborted as it reads, before it reads more."""
        server = self

        class Connection(ServerConnection):
            _close_due: asyncio.TimerHandle | None = None

            def data_received(self, data: bytes) -> None:
                super().data_received(data)
                transport = self.transport
                if transport.get_write_buffer_size() > most_unsent and not transport.is_closing():
                    server._drop_flooder(self)
                if self.close_deadline is not None and self._close_due is None:
                    # The client's close answered: websockets enforces close_timeout only on
                    # its next send (a keepalive ping, up to 20 s on), and a client that
                    # keeps its TCP side open held its capacity slot until then.
                    self._close_due = self.loop.call_at(self.close_deadline, self._close_overdue)

            def _close_overdue(self) -> None:
                if not self.connection_lost_waiter.done():
                    self.transport.abort()

        return Connection

    def _drop_flooder(self, ws: ServerConnection) -> None:
        log.warning("client cut off: control frames answered and never read remote=%s buffered=%d",
                    _peer(ws), ws.transport.get_write_buffer_size())
        self.rt.metrics.connections.labels("slow_client").inc()
        ws.transport.abort()

    # --- HTTP ----------------------------------------------------------------------

    async def _process_request(self, conn: ServerConnection, request: Request) -> Response | None:
        # The request target as sent, up to its query: urlsplit reads "//status" as a host
        # named "status" and an empty path ("no route " answered it).
        path = request.path.partition("?")[0]
        # websockets before 17 parse GET requests only (its Request has no method)
        method = getattr(request, "method", "GET")
        if method not in ("GET", "HEAD") or (method == "HEAD" and path in WS_PATHS):
            # Every route is read-only (a body would not be read); an upgrade is a GET.
            refused = _json_response(conn, 405, {"error_code": "method_not_allowed",
                                                 "message": f"{method[:16]} is not served: use GET"})
            refused.headers["Allow"] = "GET" if path in WS_PATHS else "GET, HEAD"
            return refused
        resp = self._route(conn, request, path)
        if method == "HEAD" and resp is not None:  # a load balancer's check: the GET's answer, no body
            resp = dataclasses.replace(resp, body=b"")
        return resp

    def _route(self, conn: ServerConnection, request: Request, path: str) -> Response | None:
        rt = self.rt
        if path == "/healthz":
            ok = rt.engines_ready() and not rt.stopping and not rt.draining
            state = "stopping" if rt.stopping else "draining" if rt.draining else "ok" if ok else "unavailable"
            body = {"status": state, "engines": rt.engine_states()}
            return _json_response(conn, 200 if ok else 503, body)
        origins = request.headers.get_all("Origin")
        allowed = rt.cfg.server.allowed_origins
        if origins and allowed and (len(origins) > 1 or origin_of(origins[0]) not in {o.lower() for o in allowed}):
            # two: neither is vouched for
            rt.metrics.errors.labels(protocol.ORIGIN_NOT_ALLOWED).inc()
            return _json_response(conn, 403, {"error_code": protocol.ORIGIN_NOT_ALLOWED,
                                              "message": "this Origin is not allowed"})
        if path in ("/status", "/metrics"):
            needs_auth = path == "/status" or rt.cfg.server.metrics_require_auth
            if needs_auth and rt.check_key(request_key(request)) is None:
                rt.metrics.errors.labels(protocol.AUTHENTICATION_FAILED).inc()
                return _json_response(conn, 401, {"error_code": protocol.AUTHENTICATION_FAILED,
                                                  "message": "a valid API key is required"})
            if path == "/status":
                return _json_response(conn, 200, rt.status())
            resp = conn.respond(http.HTTPStatus.OK, rt.metrics.render().decode())
            del resp.headers["Content-Type"]
            resp.headers["Content-Type"] = "text/plain; version=0.0.4; charset=utf-8"
            return resp
        if path in WS_PATHS:
            return None
        # Every route but /healthz needs a key, unknown ones too: without one the port
        # tells a scanner nothing beyond /healthz.
        if rt.check_key(request_key(request)) is None:
            rt.metrics.errors.labels(protocol.AUTHENTICATION_FAILED).inc()
            return _json_response(conn, 401, {"error_code": protocol.AUTHENTICATION_FAILED,
                                              "message": "a valid API key is required"})
        return _json_response(conn, 404, {"error_code": "not_found", "message": f"no route {path[:100]}"})

    # --- WebSocket -----------------------------------------------------------------

    async def _refuse(self, ws: ServerConnection, code: int, msg: dict[str, Any]) -> None:
        self.rt.metrics.errors.labels(msg["error_code"]).inc()
        self.rt.metrics.connections.labels(msg["error_code"]).inc()
        with contextlib.suppress(ConnectionClosed):
            await ws.send(protocol.dumps(msg))
            await ws.close(code, msg["error_code"])

    async def _handle(self, ws: ServerConnection) -> None:
        rt = self.rt
        assert ws.request is not None
        key = rt.check_key(request_key(ws.request))
        if key is None:
            log.info("auth failed remote=%s", _peer(ws))
            await self._refuse(ws, protocol.CLOSE_POLICY, protocol.error(
                protocol.AUTHENTICATION_FAILED,
                "missing or invalid API key (X-API-Key header, Authorization: Bearer, or api_key query)"))
            return
        cap = rt.capacity()
        per_key = rt.cfg.server.max_connections_per_key
        if cap.active >= cap.max or rt.stopping:
            await self._refuse(ws, protocol.CLOSE_TRY_AGAIN, protocol.error(
                protocol.SERVER_AT_CAPACITY, "the server is at capacity; try again shortly",
                capacity=cap.as_json()))
            return
        if per_key and (held := rt.sessions_for_key(key)) >= per_key:
            # This key's own limit, said as such: the server's capacity beside it said
            # "available" (a client backing off on it was misled).
            await self._refuse(ws, protocol.CLOSE_TRY_AGAIN, protocol.error(
                protocol.SERVER_AT_CAPACITY, f"this API key has {held} connections open, its limit "
                "(server.max_connections_per_key); close one or try again shortly",
                capacity={"active": held, "max": per_key, "available": 0, "at_capacity": True, "per_key": True}))
            return
        send = self._sender(ws)
        session = Session(rt, send, remote=_peer(ws), api_key=key)
        # Taking the slot and checking the cap happen with no await between: no race.
        rt.sessions.add(session)
        self._conns[session] = ws
        rt.metrics.active.set(len(rt.sessions))
        rt.metrics.connections.labels("accepted").inc()
        try:
            await self._serve(ws, session)
        except ConnectionClosed:
            pass
        finally:
            rt.sessions.discard(session)
            self._conns.pop(session, None)
            rt.metrics.active.set(len(rt.sessions))
            await session.close()

    def config_changed(self) -> None:
        """A reload's server keys, for the connections already open too (they read the
        config as it was at their start: a tighter idle timeout or rate limit reached none
        of them)."""
        s = self.rt.cfg.server
        for session in self._conns:
            session.limiter.retune(s.rate_limit_per_s, s.rate_limit_burst)
        for since, deadline in self._waits.values():
            if not deadline.expired():  # one firing now is past moving (reschedule raises)
                deadline.reschedule(since + s.idle_timeout_s)

    def _sender(self, ws: ServerConnection) -> Any:
        cut = False

        async def send(text: str) -> None:
            nonlocal cut
            s = self.rt.cfg.server  # as it is now: a reload applies to open connections
            transport = ws.transport
            if cut:
                raise _ClientGone(None, None)
            # websockets waits for the client, with no deadline, once the send buffer passes
            # write_limit or while it is still paused from an earlier pass. A frame is at most
            # 4 bytes a character plus a 10-byte header, so the fast path below cannot block.
            if transport is None or (not getattr(ws, "paused", True)
                                     and transport.get_write_buffer_size() + 4 * len(text) + 16
                                     <= s.write_buffer_bytes):
                try:
                    await ws.send(text)
                except ConnectionClosed as exc:
                    raise _ClientGone(exc.rcvd, exc.sent, exc.rcvd_then_sent) from None
                return
            # The client stopped reading. Give it send_timeout_s, then cut it off so
            # one stuck reader never holds an engine request or memory hostage.
            try:
                await within(ws.send(text), s.send_timeout_s)  # a barge-in's cancel is never lost
            except ConnectionClosed as exc:
                raise _ClientGone(exc.rcvd, exc.sent, exc.rcvd_then_sent) from None
            except asyncio.TimeoutError:
                if not cut:
                    cut = True
                    self._cut_off(ws)
                raise _ClientGone(None, None) from None

        return send

    def _cut_off(self, ws: ServerConnection) -> None:
        """End a connection whose client does not read: a close frame 1008 goes after what
        is queued (a client that was only stalled reads its replies, then why it was cut
        off), and the TCP connection is aborted after a grace period, which frees its
        buffer whether or not the client ever reads. Either way its turn ends now."""
        s = self.rt.cfg.server
        transport = ws.transport
        log.warning("slow client cut off remote=%s buffered=%d", _peer(ws),
                    transport.get_write_buffer_size() if transport is not None else 0)
        self.rt.metrics.connections.labels("slow_client").inc()
        if transport is None:
            return
        # Written here and now through the sans-I/O protocol: ws.close() would wait on the
        # full buffer, and the handler's own close (1000) must not go first.
        with contextlib.suppress(Exception):
            ws.protocol.send_close(protocol.CLOSE_POLICY, "client too slow: send buffer full")
            for data in ws.protocol.data_to_send():
                if data:
                    transport.write(data)
        asyncio.get_running_loop().call_later(min(5.0, s.send_timeout_s), transport.abort)

    async def _serve(self, ws: ServerConnection, session: Session) -> None:
        while True:
            try:
                frame = await self._next_frame(ws, session)
            except asyncio.TimeoutError:
                await session.send(protocol.error(
                    protocol.IDLE_TIMEOUT, f"no message for {self.rt.cfg.server.idle_timeout_s:g} s; closing"))
                await ws.close(protocol.CLOSE_NORMAL, "idle timeout")
                return
            s = self.rt.cfg.server  # read per frame: a reload applies to open connections
            if isinstance(frame, bytes):
                await session.send(protocol.error(protocol.BINARY_FRAME, "binary frames are not supported; "
                                                  "send JSON text frames"))
                continue
            # len() counts characters; UTF-8 is at least as long, so only measure when it may matter.
            if len(frame) > s.max_frame_bytes or (4 * len(frame) > s.max_frame_bytes
                                                 and len(frame.encode()) > s.max_frame_bytes):
                await session.send(protocol.error(protocol.MESSAGE_TOO_LARGE,
                                                  f"frame larger than {s.max_frame_bytes} bytes"))
                continue
            if not session.limiter.allow():
                await session.send(protocol.error(protocol.RATE_LIMITED, "too many messages; slow down"))
                continue
            try:
                await session.handle(protocol.parse_client_message(frame))
            except protocol.ProtocolError as exc:
                await session.send_error(exc)
            except ConnectionClosed:
                raise
            except Exception as exc:
                log.exception("message handling failed remote=%s", session.remote)
                await session.send(protocol.error(protocol.INTERNAL_ERROR, f"internal error: {type(exc).__name__}"))

    async def _next_frame(self, ws: ServerConnection, session: Session) -> Any:
        """The next frame within server.idle_timeout_s; TimeoutError past it. recv() is
        cancellation-safe (websockets): the deadline's cancel loses no frame."""
        if not hasattr(asyncio, "timeout"):  # Python 3.10: a reload reaches the next wait
            return await within(ws.recv(), self.rt.cfg.server.idle_timeout_s)
        loop = asyncio.get_running_loop()
        since = loop.time()
        async with asyncio.timeout_at(since + self.rt.cfg.server.idle_timeout_s) as deadline:
            self._waits[session] = (since, deadline)
            try:
                return await ws.recv()
            finally:
                del self._waits[session]

    # --- shutdown ------------------------------------------------------------------

    def stop_accepting(self) -> None:
        if self._server is not None:
            self._server.close(close_connections=False)

    def turns_in_flight(self) -> int:
        return sum(1 for session in self._conns if session.turn_task is not None and not session.turn_task.done())

    async def drain(self, timeout: float) -> bool:
        """Wait until no turn runs (True) or ``timeout`` passes (False). New turns are
        refused meanwhile (shutting_down): a stop lets the replies being spoken end."""
        return await polled(lambda: not self.turns_in_flight(), timeout)

    async def close_all(self, code: int = protocol.CLOSE_GOING_AWAY, reason: str = "server shutting down") -> None:
        """End every turn with its done (cancelled), then close every socket."""
        sessions = list(self._conns.items())

        async def one(session: Session, ws: ServerConnection) -> None:
            with contextlib.suppress(Exception):
                await session.cancel_turn("shutdown")
            with contextlib.suppress(Exception):
                await ws.close(code, reason)

        if sessions:
            await asyncio.gather(*(one(s, w) for s, w in sessions))

    async def wait_closed(self) -> None:
        if self._server is not None:
            self._server.close(close_connections=True)
            await self._server.wait_closed()


def _peer(ws: ServerConnection) -> str:
    addr = ws.remote_address
    if isinstance(addr, tuple) and len(addr) >= 2:
        return f"{addr[0]}:{addr[1]}"
    return str(addr)
