"""The admin socket client: JSON lines to a running yapd over its local Unix socket.

Every failure becomes an :class:`AdminError` whose message is one line an operator can
act on and whose ``exit_code`` scripts can rely on (see :mod:`yapctl.exitcodes`).
"""

from __future__ import annotations

import asyncio
import contextlib
import grp
import json
import os
import socket
import stat
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from yapd.paths import default_admin_socket
from yapd.timeouts import within

# Exit codes of yapctl (documented in ``yapctl --help``).
EXIT_OK = 0
EXIT_FAILED = 1  # the daemon answered, and the operation failed; or it did not answer in time
EXIT_USAGE = 2  # bad command line (argparse's own code)
EXIT_DOWN = 3  # no daemon: no socket, nobody listening, or it went away mid-request
EXIT_DENIED = 4  # the daemon refused us (socket permissions or its peer-uid check)

# A follow stream can stay quiet for as long as the daemon has nothing to log.
DEFAULT_TIMEOUT = 30.0
LINE_LIMIT = 16 * 1024 * 1024


class AdminError(Exception):
    def __init__(self, message: str, exit_code: int = EXIT_FAILED, reply: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.exit_code = exit_code
        self.reply = reply  # yapd's {"ok": false, ...} where it answered so: what else it says


def _group_hint(path: Path) -> str:
    name = "yapd"
    for where in (path, path.parent):  # a directory we may not enter hides the socket's group
        try:
            name = grp.getgrgid(where.stat().st_gid).gr_name
            break
        except (KeyError, OSError):
            continue
    return f"permission denied: add yourself to group {name} (or run as root) to use {path}"


class AdminClient:
    """One connection to the admin socket. ``request`` for one reply, ``stream`` for
    commands that send ``{"event": ...}`` lines before their final ``{"ok": ...}``."""

    def __init__(self, path: str | Path | None = None, timeout: float = DEFAULT_TIMEOUT) -> None:
        self.path = Path(path) if path else default_admin_socket(client=True)
        self.timeout = timeout
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    async def __aenter__(self) -> AdminClient:
        await self.connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def connect(self) -> None:
        try:
            mode = self.path.stat().st_mode
        except PermissionError:  # its directory is closed to us
            raise AdminError(_group_hint(self.path), EXIT_DENIED) from None
        except (FileNotFoundError, NotADirectoryError):
            raise AdminError(f"yapd is not running: no socket at {self.path}", EXIT_DOWN) from None
        except OSError as exc:  # a symlink loop, a name too long
            raise AdminError(f"cannot reach yapd at {self.path}: {exc.strerror or exc}", EXIT_DOWN) from None
        if not stat.S_ISSOCK(mode):
            # Connecting to it would be refused, which reads as a stale socket: say what it is.
            what = {stat.S_IFDIR: "a directory", stat.S_IFREG: "a regular file", stat.S_IFIFO: "a FIFO"}.get(
                stat.S_IFMT(mode), "a device")
            raise AdminError(f"{self.path} is {what}, not a socket: --socket or $YAP_ADMIN_SOCKET should name "
                             "yapd's admin.sock", EXIT_DOWN)
        try:
            self._reader, self._writer = await within(self._open(), self.timeout)
        except PermissionError:
            raise AdminError(_group_hint(self.path), EXIT_DENIED) from None
        except (ConnectionRefusedError, FileNotFoundError):
            raise AdminError(f"yapd is not running: nothing listens on {self.path} (stale socket)",
                             EXIT_DOWN) from None
        except asyncio.TimeoutError:  # before OSError: it is one, with no text, since Python 3.11
            # Something listens and does not take us in: a daemon busy or stuck, not a missing one.
            raise AdminError(f"timed out: yapd did not accept a connection on {self.path} within "
                             f"{self.timeout:g} s (it listens, but is busy or stuck)", EXIT_FAILED) from None
        except OSError as exc:
            raise AdminError(f"cannot reach yapd at {self.path}: {exc}", EXIT_DOWN) from None

    async def _open(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.setblocking(False)
            while True:
                try:
                    sock.connect(str(self.path))
                    break
                except BlockingIOError:
                    # Linux: the daemon's accept queue is full (its loop is not getting round
                    # to it). asyncio's own connect takes this for "in progress" and hands back
                    # a socket never connected, whose first write fails as "went away": wait
                    # for room instead, within the timeout.
                    await asyncio.sleep(0.05)
            return await asyncio.open_unix_connection(sock=sock, limit=LINE_LIMIT)
        except BaseException:
            sock.close()
            raise

    async def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            with contextlib.suppress(Exception):
                await self._writer.wait_closed()
        self._reader = self._writer = None

    async def send(self, cmd: str, **args: Any) -> None:
        if self._writer is None:
            await self.connect()
        assert self._writer is not None
        try:
            self._writer.write(json.dumps({"cmd": cmd, **args}).encode() + b"\n")
            await self._writer.drain()
        except (ConnectionError, OSError) as exc:
            # A daemon that refuses us says why and hangs up, maybe before our write:
            # its reason is the better error.
            try:
                await self.read(1.0)
            except AdminError as reason:
                if reason.exit_code != EXIT_DOWN:
                    raise reason from None
            raise AdminError(f"yapd went away: {exc}", EXIT_DOWN) from None

    async def read(self, timeout: float | None = None) -> dict[str, Any]:
        assert self._reader is not None
        try:
            # The dashboard's AWQ view, closed (its watcher cancelled) as a progress line
            # came, read on into its removed widgets with wait_for (see yapd.timeouts).
            line = await within(self._reader.readline(), timeout)
        except asyncio.TimeoutError:
            raise AdminError(f"yapd did not answer within {timeout:g} s", EXIT_FAILED) from None
        except (ConnectionError, OSError) as exc:
            raise AdminError(f"yapd went away: {exc}", EXIT_DOWN) from None
        except ValueError:  # asyncio's readline past the reader's limit
            # The connection is mid-line now: no later read could make sense of it.
            await self.close()
            raise AdminError(f"yapd's reply is longer than {LINE_LIMIT >> 20} MiB", EXIT_FAILED) from None
        if not line:
            raise AdminError("yapd closed the admin connection", EXIT_DOWN)
        try:
            msg = json.loads(line)
        except json.JSONDecodeError:
            raise AdminError(f"yapd sent a line that is not JSON: {line[:80]!r}") from None
        if msg.get("ok") is False:
            error = str(msg.get("error", "failed"))
            raise AdminError(error, EXIT_DENIED if error.startswith("permission denied") else EXIT_FAILED, dict(msg))
        return dict(msg)

    async def request(self, cmd: str, timeout: float | None = -1, **args: Any) -> dict[str, Any]:
        """Send one command and return its final reply (events before it are skipped)."""
        async for msg in self.stream(cmd, timeout=timeout, **args):
            if "event" not in msg:
                return msg
        raise AdminError("yapd sent no reply")  # pragma: no cover - stream ends on the reply

    async def stream(self, cmd: str, timeout: float | None = -1, **args: Any) -> AsyncIterator[dict[str, Any]]:
        """Send one command; yield every event line and then the final reply.

        ``timeout`` bounds each line (-1: the client's default; None: wait forever, for
        follow streams)."""
        per_line = self.timeout if timeout == -1 else timeout
        await self.send(cmd, **args)
        while True:
            msg = await self.read(per_line)
            yield msg
            if "event" not in msg:
                return


async def call(cmd: str, path: str | Path | None = None, timeout: float | None = -1, **args: Any) -> dict[str, Any]:
    """One request on a fresh connection."""
    async with AdminClient(path) as client:
        return await client.request(cmd, timeout=timeout, **args)


def socket_path(arg: str | None) -> Path:
    """--socket, else $YAP_ADMIN_SOCKET, else where the daemon puts it by default."""
    env = os.environ.get("YAP_ADMIN_SOCKET")
    return Path(arg) if arg else Path(env) if env else default_admin_socket(client=True)
