"""The admin socket: JSON lines over a local Unix stream socket, for yapctl.

One request per line, ``{"cmd": ..., ...}``; one reply line ``{"ok": ...}``, or for
``logs --follow`` and job progress a stream of ``{"event": ...}`` lines. Only root, the
daemon's own uid and members of its admin group may talk to it (checked with
SO_PEERCRED, besides the socket file's 0660 mode).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import grp
import json
import logging
import os
import pwd
import select
import socket
import stat
import struct
import time
from collections.abc import Coroutine
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from yapd import forking, jsonparse
from yapd.loopprofile import LoopProfiler, ProfileError

if TYPE_CHECKING:
    from yapd.config import AdminConfig
    from yapd.daemon import Daemon

T = TypeVar("T")

log = logging.getLogger("yapd.admin")

MAX_REQUEST_BYTES = 64 * 1024
COMMANDS = ("status", "connections", "logs", "reload", "restart", "drain", "awq", "stats", "profile", "ping")
LEVELS = {"debug": 10, "info": 20, "warning": 30, "error": 40, "critical": 50}


class AdminError(Exception):
    pass


def peer_credentials(sock: socket.socket) -> tuple[int, int, int]:
    """(pid, uid, gid) of the process at the other end of a Unix socket."""
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, gid = struct.unpack("3i", raw)
    return pid, uid, gid


def admin_gid(group: str) -> tuple[int, str | None]:
    """The group whose members may use the admin socket: ``group``, else the daemon's
    (with why, where ``group`` was asked for and does not exist)."""
    if group:
        try:
            return grp.getgrnam(group).gr_gid, None
        except KeyError:
            return os.getgid(), f"admin.group {group!r} does not exist"
    return os.getgid(), None


class AdminServer:
    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon
        self.profiler = LoopProfiler()
        cfg = daemon.cfg.admin
        self.path = daemon.cfg.admin_socket_path()
        self._server: asyncio.AbstractServer | None = None
        self._clients: set[asyncio.Task[Any]] = set()
        self._closing = False  # close() ends the connected clients
        self._gid, problem = admin_gid(cfg.group)
        if problem:
            log.warning("%s; the admin socket is the daemon's group's", problem)
        self._inode = 0
        self._given: set[Path] = set()  # the files _permit gave a group

    async def start(self) -> None:
        path = self.path
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o750)
        # A directory someone else owns or anyone may write to (a squatted /tmp/yapd-UID)
        # would let them swap the socket file under yapctl.
        d = path.parent.stat()
        if d.st_uid not in (0, os.getuid()) or d.st_mode & stat.S_IWOTH:
            raise OSError(f"admin socket directory {path.parent} is owned by uid {d.st_uid} or writable by "
                          "others; use a directory of the daemon's own ([admin] socket)")
        if path.exists() or path.is_symlink():
            if not stat.S_ISSOCK(path.lstat().st_mode):
                raise OSError(f"admin socket path {path} exists and is not a socket")
            # A live daemon answers; a stale file from a crash does not and is removed.
            if await _answers(path):
                raise OSError(f"another yapd is serving the admin socket {path}")
            path.unlink()
        self._server = await asyncio.start_unix_server(self._client, path=str(path), limit=MAX_REQUEST_BYTES)
        for sock in self._server.sockets:
            forking.protect(sock)
        for problem in self._permit():
            log.warning("%s", problem)
        self._inode = path.stat().st_ino
        log.info("admin socket listening path=%s", path)

    def _permit(self) -> list[str]:
        """The socket file's mode and group: who besides the daemon's user may connect.
        Its directory (0750) goes to the same group where the daemon owns it, so that the
        group's members can reach the file (systemd makes /run/yapd the daemon's group's).
        Returns what could not be done: the group's members would not get in."""
        os.chmod(self.path, self.daemon.cfg.admin.mode)
        folder = self.path.parent
        if self._gid != os.getgid():
            targets = [self.path] + ([folder] if folder.stat().st_uid == os.getuid() else [])
        else:
            # Back to the daemon's group (a reload to ""): the socket, and the folder only
            # where an earlier group was given it here (a folder of the user's stays theirs).
            targets = [self.path] + ([folder] if folder in self._given else [])
        problems = []
        for target in (t for t in targets if t.stat().st_gid != self._gid):
            try:
                os.chown(target, -1, self._gid)
                self._given.add(target)
            except PermissionError:
                # the daemon's user must be in the group (SupplementaryGroups= in the unit)
                problems.append(f"admin.group: {target} could not be given to group {self._gid} (the daemon's "
                                "user is not in it: SupplementaryGroups= in the unit)")
        return problems

    def apply(self, cfg: AdminConfig) -> list[str]:
        """A reload's admin.mode and admin.group, on the socket file as it is; what could
        not be applied. A group that cannot be applied changes nothing: the socket keeps
        the group it had, and the peer check with it (its members are not locked out)."""
        before = self._gid
        gid, problem = admin_gid(cfg.group)
        problems = [problem] if problem else []
        if not problem:
            self._gid = gid
        with contextlib.suppress(FileNotFoundError):
            failed = self._permit()  # the mode, whatever the group
            if failed:
                self._gid = before
                failed += self._permit()  # back where a part was given (the file, not its folder)
            problems += failed
        return ["; ".join(problems) + "; the admin socket keeps its group"] if problems else []

    async def ensure(self) -> bool:
        """Re-create the socket file if it is gone (an rm, a tmpfiles clean-up): the
        listening socket still runs but nobody can reach it. Called on reload, so
        ``systemctl reload yapd`` brings yapctl back without a restart. True when it
        was re-created."""
        if self._server is None:
            return False
        with contextlib.suppress(FileNotFoundError):
            st = self.path.lstat()
            if stat.S_ISSOCK(st.st_mode) and st.st_ino == self._inode:
                return False
        self._server.close()  # unreachable without its file; clients already connected stay
        self._server = None
        await self.start()
        log.warning("admin socket %s was gone; re-created it", self.path)
        return True

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            self._closing = True
            for task in list(self._clients):
                task.cancel()
            with contextlib.suppress(Exception):
                await self._server.wait_closed()
            self._server = None
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()

    def _allowed(self, uid: int, gid: int) -> bool:
        if uid in (0, os.getuid()) or gid == self._gid:
            return True
        try:
            members = grp.getgrgid(self._gid).gr_mem
            return pwd.getpwuid(uid).pw_name in members
        except KeyError:
            return False

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._clients.add(task)
        try:
            sock = writer.get_extra_info("socket")
            _, uid, gid = peer_credentials(sock)
            if not self._allowed(uid, gid):
                log.warning("admin connection refused uid=%d gid=%d", uid, gid)
                await _write(writer, {"ok": False, "error": "permission denied: not root, the daemon's user "
                                      "or a member of its group"})
                # Closing with the client's request still unread would reset the
                # connection and could lose the reason we just wrote; take the request first.
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(reader.read(MAX_REQUEST_BYTES), 1.0)
                return
            while True:
                try:
                    line = await reader.readline()
                except (asyncio.LimitOverrunError, ValueError):
                    await _write(writer, {"ok": False, "error": f"request longer than {MAX_REQUEST_BYTES} bytes"})
                    return
                if not line:
                    return
                if not line.strip():
                    continue
                try:
                    req = jsonparse.loads(line)
                except ValueError as exc:
                    await _write(writer, {"ok": False, "error": f"request is not valid JSON: {str(exc)[:200]}"})
                    continue
                try:
                    if not isinstance(req, dict) or not isinstance(req.get("cmd"), str):
                        raise AdminError('a request is a JSON object with a "cmd" string')
                    await self._dispatch(req, reader, writer)
                except AdminError as exc:
                    await _write(writer, {"ok": False, "error": str(exc)})
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        except asyncio.CancelledError:
            # Ended by close() (a follower of the logs, a running profile): the handler
            # ends as any other. Before Python 3.12 asyncio's stream server logs a
            # handler task that ends cancelled as an error, with its traceback.
            if not self._closing:
                raise
        except Exception:
            log.exception("admin client failed")
        finally:
            self._clients.discard(task)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _dispatch(self, req: dict[str, Any], reader: asyncio.StreamReader,
                        writer: asyncio.StreamWriter) -> None:
        d = self.daemon
        cmd = req["cmd"]
        if cmd == "ping":
            await _write(writer, {"ok": True, "pid": os.getpid()})
        elif cmd == "status":
            window_s = req.get("window_s")
            if window_s is not None and (isinstance(window_s, bool) or not isinstance(window_s, (int, float))
                                         or not window_s > 0):
                raise AdminError('"window_s" must be a number of seconds above 0')
            await _write(writer, {"ok": True, **self.status(None if window_s is None else float(window_s))})
        elif cmd == "connections":
            await _write(writer, {"ok": True, "connections": [s.info() for s in d.rt.sessions]})
        elif cmd == "stats":
            await _write(writer, {"ok": True, **d.rt.recent.snapshot()})
        elif cmd == "logs":
            await self._logs(req, reader, writer)
        elif cmd == "reload":
            await _write(writer, await d.reload())
        elif cmd == "restart":
            target = req.get("target", "both")
            if target not in ("chat", "tool", "both"):
                raise AdminError("restart target must be chat, tool or both")
            roles = ["chat", "tool"] if target == "both" else [target]
            await _write(writer, {"event": "progress", "message": f"draining and restarting {target}"})
            await _write(writer, await d.restart_engines(roles))
        elif cmd == "drain":
            on = req.get("on", True)
            if not isinstance(on, bool):
                raise AdminError('"on" must be true or false')
            await _write(writer, await d.drain(on))
        elif cmd == "awq":
            await self._awq(req, writer)
        elif cmd == "profile":
            seconds, top = req.get("seconds", 10), req.get("top", 25)
            if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or isinstance(top, bool) \
                    or not isinstance(top, int):
                raise AdminError('"seconds" must be a number and "top" an integer')
            try:
                # A client gone mid-window (yapctl profile's Ctrl-C) ends the window: left
                # running, it kept cProfile's cost on the loop and refused the next profile.
                profile = await _while_connected(reader, writer, self.profiler.run(float(seconds), top))
            except ProfileError as exc:
                raise AdminError(str(exc)) from exc
            if profile is not None:
                await _write(writer, {"ok": True, **profile})
        elif cmd == "debug" and os.environ.get("YAPD_DEBUG_ADMIN") == "1":
            await _write(writer, await self._debug(req))
        else:
            raise AdminError(f"unknown command {cmd[:40]!r} (known: {', '.join(COMMANDS)})")

    def status(self, window_s: float | None = None) -> dict[str, Any]:
        d = self.daemon
        return {**d.rt.status(window_s), "pid": os.getpid(), "port": d.server.port if d.server._server else None,
                "admin_socket": str(self.path), "admin_clients": len(self._clients),
                "systemd_status": d.notifier.last_status,
                "pending_restart_keys": d.pending_keys, "config": d.cfg.source}

    async def _logs(self, req: dict[str, Any], reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        n = req.get("n", 100)
        follow = req.get("follow", False)
        if not isinstance(follow, bool):
            raise AdminError('"follow" must be true or false')
        level = req.get("level", "debug")
        grep = req.get("grep")
        if not isinstance(n, int) or isinstance(n, bool) or n < 0:
            raise AdminError('"n" must be a non-negative integer')
        if not isinstance(level, str) or level not in LEVELS:
            raise AdminError(f'"level" must be one of {", ".join(LEVELS)}')
        if grep is not None and not isinstance(grep, str):
            raise AdminError('"grep" must be a string')
        floor = LEVELS[level]

        def keep(rec: Any) -> bool:
            return LEVELS.get(rec.level, 0) >= floor and (not grep or grep.lower() in rec.message.lower())

        ring = self.daemon.ring
        queue = ring.follow() if follow else None
        try:
            lines = [r for r in ring.ring if keep(r)][-n:] if n else []
            for rec in lines:
                await _write(writer, {"event": "log", **rec.as_json()})
            if queue is None:
                await _write(writer, {"ok": True, "count": len(lines)})
                return
            last = lines[-1].seq if lines else 0

            async def forward() -> None:
                while True:
                    rec = await queue.get()
                    if rec.seq > last and keep(rec):
                        await _write(writer, {"event": "log", **rec.as_json()})

            # Ends when the client hangs up: a follower whose filter matched nothing noticed
            # only at a write, so each Ctrl-C of `yapctl logs -f --level error` on a healthy
            # daemon left its connection, task and queue behind (fed every record).
            await _while_connected(reader, writer, forward())
        finally:
            if queue is not None:
                ring.unfollow(queue)

    async def _debug(self, req: dict[str, Any]) -> dict[str, Any]:
        """Fault injection for tests, enabled only by YAPD_DEBUG_ADMIN=1 in the daemon's
        environment: wedge the event loop, hold it in a full garbage collection over a
        heap of ``objects`` live objects (as a leak leaves), kill an engine as a crash
        would, fail or stall its next generation steps."""
        action = req.get("action")
        if action == "block_loop":
            seconds = float(req.get("seconds", 1.0))
            time.sleep(min(seconds, 30.0))  # noqa: ASYNC251 -- blocking the loop is the fault injected
            return {"ok": True, "blocked_s": seconds}
        if action == "gc_heap":
            heap: list[list[int]] = [[] for _ in range(min(int(req.get("objects", 300_000)), 5_000_000))]
            t0 = time.perf_counter()
            gc.collect()
            took = time.perf_counter() - t0
            del heap
            return {"ok": True, "collect_ms": round(took * 1000, 2)}
        if action == "kill_engine":
            eng = self.daemon.rt.engines.get(str(req.get("role", "chat")))
            if eng is None or not hasattr(eng, "kill"):
                raise AdminError("no such engine, or it cannot be killed")
            eng.kill()
            return {"ok": True}
        if action == "stall_step":
            eng = self.daemon.rt.engines.get(str(req.get("role", "chat")))
            if eng is None or not hasattr(eng, "stall_next_step_s"):
                raise AdminError("no such CPU engine")
            seconds = req.get("seconds", 5.0)
            if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not 0 < seconds <= 60:
                raise AdminError("seconds must be a number in (0, 60]")
            eng.stall_next_step_s = float(seconds)
            return {"ok": True}
        if action == "fail_steps":
            eng = self.daemon.rt.engines.get(str(req.get("role", "chat")))
            if eng is None or not hasattr(eng, "fail_after_steps"):
                raise AdminError("no such CPU engine")
            eng.fail_after_steps = int(req.get("steps", 3))
            return {"ok": True}
        raise AdminError(f"unknown debug action {action!r}")

    async def _awq(self, req: dict[str, Any], writer: asyncio.StreamWriter) -> None:
        action = req.get("action", "status")
        jobs = getattr(self.daemon, "awq_jobs", None)
        if jobs is None:
            raise AdminError("AWQ jobs are not available in this build")
        await jobs.handle(action, req, lambda msg: _write(writer, msg))


async def _while_connected(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                           work: Coroutine[Any, Any, T]) -> T | None:
    """``work``'s result, or None where the client hung up first (``work`` is then
    cancelled). For the requests that run on with nothing to write (a log follow, a
    profile window); what the client sends meanwhile is read and dropped."""
    task = asyncio.ensure_future(work)
    gone = asyncio.ensure_future(_hung_up(reader, writer.get_extra_info("socket")))
    try:
        await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
    except BaseException:  # the handler cancelled (the admin server closing)
        task.cancel()
        gone.cancel()
        raise
    # Each cancelled task is waited for (asyncio.wait: a cancel of this handler still goes
    # through): the watcher must be out of the reader before the next request's readline
    # (one reader at a time: "readuntil() called while another coroutine is already
    # waiting"), and the work must have run its clean-up (the profiler's hook).
    gone.cancel()
    await asyncio.wait({gone})
    if task.done():
        return task.result()
    task.cancel()
    await asyncio.wait({task})
    return None


async def _hung_up(reader: asyncio.StreamReader, sock: Any) -> None:
    """Until the client has closed its end. The end of its input alone is not that: a
    script that sent its request through `nc -U` or socat (which shut their write side at
    the end of their input) still reads. Only a closed socket sets POLLHUP on a Unix
    socket's peer; after a half close it is asked each second."""
    while await reader.read(4096):
        pass
    poller = select.poll()
    poller.register(sock.fileno(), select.POLLHUP)
    while not poller.poll(0):  # noqa: ASYNC110 -- no event: the loop stops reading a socket at its EOF
        await asyncio.sleep(1.0)


async def _write(writer: asyncio.StreamWriter, obj: dict[str, Any]) -> None:
    writer.write(json.dumps(obj, separators=(",", ":")).encode() + b"\n")
    await writer.drain()


async def _answers(path: Path) -> bool:
    try:
        _, writer = await asyncio.wait_for(asyncio.open_unix_connection(str(path)), 1.0)
    except (OSError, asyncio.TimeoutError):
        return False
    writer.close()
    with contextlib.suppress(Exception):
        await writer.wait_closed()
    return True
