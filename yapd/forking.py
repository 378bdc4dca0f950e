"""Children forked from yapd do not keep yapd's sockets (and can be given environment
settings, a GIL switch interval and a steadier malloc heap of their own: ``child_settings``;
and be forked by the event loop's thread for the thread that starts them: ``forks_on``).

vLLM starts each engine's EngineCore in a child process. Forked, that child is ready
about 13 s sooner than spawned (it does not import torch and vLLM again:
docs/bench/h100-2026-11-25-spawn.md), but it inherits every file descriptor yapd holds:
the WebSocket listener, each client's connection, the admin socket. A child holding a
copy keeps the port bound after yapd has died, and keeps a connection open after yapd
has closed it (the peer sees no FIN while any copy lives). So right after a fork, in the
child, the sockets yapd owns are replaced by ``/dev/null``: the child drops its share of
them, and the descriptor numbers stay taken, so a stale object closing its old number
later cannot close a socket the child opened since.

A forked child also inherits how yapd's event loop takes its signals: a Python handler
that only notes the signal for that loop, and (before Python 3.12, whose asyncio drops
it in a forked child) the loop's wakeup socket, which the child shares. Left so, a
SIGTERM sent to an EngineCore that has not yet set its own handler (one still loading)
does not end it; before 3.12 it also reaches yapd's loop as yapd's own SIGTERM (a second
one while yapd stops: exit 1 at once), as does any signal the child handles later. So
the child gets the signal handling of a fresh process, SIGHUP aside (ignored: see
reset_signals).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import ctypes
import os
import platform
import signal
import socket
import stat
import sys
import threading
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from multiprocessing import popen_fork
from pathlib import Path
from typing import Any, Protocol, TypeVar


class _Listener(Protocol):
    # socket.socket, and asyncio's TransportSocket in Server.sockets
    @property
    def family(self) -> int: ...
    def getsockname(self) -> Any: ...


_T = TypeVar("_T")
_lock = threading.Lock()
_ports: set[int] = set()
_paths: set[str] = set()
_descriptors_out: set[int] = set()
_forked: list[Callable[[], None]] = []


@dataclass
class ChildSettings:
    """What children forked inside a ``child_settings`` block start with, and how many
    such children there were (counted in the parent: whether the settings reached any)."""

    env: dict[str, str]
    switch_interval_s: float | None
    steady_heap: bool = False
    forks: int = 0


# glibc's mallopt parameters (malloc.h) and what a steady heap sets them to.
M_TOP_PAD, M_MMAP_THRESHOLD = -2, -3
STEADY_MMAP_THRESHOLD = 32 << 20  # glibc's own largest dynamic threshold
STEADY_TOP_PAD = 8 << 20


_mallopt_fn: Any = None  # resolved in the parent, once: not in a freshly forked child


def steady_heap_supported() -> bool:
    """Whether this process's malloc is glibc's (whose ``mallopt`` a steady heap sets)."""
    return _mallopt() is not None


def _mallopt() -> Callable[[int, int], int] | None:
    global _mallopt_fn
    if _mallopt_fn is None:
        _mallopt_fn = _glibc_mallopt() or False
    return _mallopt_fn or None


def _glibc_mallopt() -> Callable[[int, int], int] | None:
    """glibc's mallopt, where glibc's malloc is the one this process uses: not where
    another allocator (tcmalloc, jemalloc, ...) was preloaded or linked in."""
    if platform.libc_ver()[0] != "glibc":
        return None
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        maps = ""
    if other_allocator(maps) is not None:
        return None
    try:
        fn: Callable[[int, int], int] = ctypes.CDLL("libc.so.6").mallopt
        return fn
    except (AttributeError, OSError):
        return None


_OTHER_ALLOCATORS = ("tcmalloc", "jemalloc", "mimalloc", "scudo", "hoard", "snmalloc", "tbbmalloc")


def other_allocator(maps: str) -> str | None:
    """The file name of a malloc other than glibc's among the libraries ``maps`` (a
    /proc/PID/maps) shows mapped, if any. The libraries are named, not the symbols
    compared: in a non-PIE executable that calls malloc (the device's python3), malloc's
    address as the program sees it is its own PLT entry, not libc's, with no other
    allocator anywhere."""
    for line in maps.splitlines():
        fields = line.split(maxsplit=5)
        name = os.path.basename(fields[5]) if len(fields) == 6 else ""
        if any(a in name for a in _OTHER_ALLOCATORS):
            return name
    return None


def _steady_heap() -> None:
    """In a child forked from a thread other than the main one: that thread's malloc
    arena is one of glibc's thread arenas, made of 64 MB heaps that glibc maps when an
    allocation does not fit and unmaps once the newest one is empty again. A child that
    allocates and frees a buffer of a MB or so every step then maps a fresh heap every
    step, and takes a page fault for each page of it (this project's CPU machine, glibc
    2.36: ~245 a step for 1 MB, none forked from the main thread or spawned; yapd's forked
    tool EngineCore on the H200: ~230 a turn, docs/bench/README.md). A top pad keeps the
    newest heap, a fixed mmap threshold keeps such buffers in the heaps: buffers up to
    about the pad (8 MB); larger ones still come and go."""
    mallopt = _mallopt()
    if mallopt is not None:
        mallopt(M_MMAP_THRESHOLD, STEADY_MMAP_THRESHOLD)
        mallopt(M_TOP_PAD, STEADY_TOP_PAD)


_child_settings: dict[int, ChildSettings] = {}  # by the forking thread's id
_installed = False


@dataclass
class LoopForks:
    """Where the forks of a ``forks_on`` block were made: ``forks`` on the loop's thread,
    ``here`` in the block's own thread (the loop was not running to take them)."""

    loop: asyncio.AbstractEventLoop
    forks: int = 0
    here: int = 0


_loop_forks: dict[int, LoopForks] = {}  # by the thread inside the forks_on block
_fork_launch: Any = None  # multiprocessing's own fork, once forks_on has wrapped it
_acting = threading.local()  # .thread: on a loop's thread, the thread it forks for
LOOP_CHECK_S = 0.5  # how often a thread waiting for the loop to fork checks it still runs


def forking_for() -> int:
    """The thread whose blocks (``child_settings``, gcpause's) apply to a fork made now,
    in the parent's at-fork hooks and the child's: this thread, or the one a loop's
    thread is forking for (``forks_on``)."""
    thread: int | None = getattr(_acting, "thread", None)
    return thread if thread is not None else threading.get_ident()


@contextlib.contextmanager
def forks_on(loop: asyncio.AbstractEventLoop | None) -> Iterator[LoopForks | None]:
    """Processes this thread starts with multiprocessing's fork inside the block are forked
    by ``loop``'s thread (yapd's main thread) while this one waits; None: by this thread,
    as without the block.

    The thread that forks is the child's only thread, and so its malloc arena is the
    child's: forked from a worker thread (vLLM's start runs in one, off the event loop)
    an EngineCore allocates from one of glibc's thread arenas, whose heaps are mapped and
    unmapped as buffers come and go (see _steady_heap); forked from the main thread, from
    glibc's main arena, as a spawned core or one forked by a single-threaded program. The
    fork holds the GIL either way, so the loop is no longer held up by it than before.
    Where the loop has stopped (or is closed) the fork is made here. Settings of this
    thread's ``child_settings`` and gcpause blocks still apply to its children.
    Yields where the block's forks were made."""
    if loop is None:
        yield None
        return
    _install()
    _wrap_fork_launch()
    with _this_threads(_loop_forks, LoopForks(loop), "forks_on") as forks:
        yield forks


@contextlib.contextmanager
def _this_threads(blocks: dict[int, _T], block: _T, name: str) -> Iterator[_T]:
    """``block`` as the calling thread's entry in ``blocks`` for the with-block."""
    me = threading.get_ident()
    with _lock:
        if me in blocks:
            raise RuntimeError(f"{name} blocks do not nest")
        blocks[me] = block
    try:
        yield block
    finally:
        with _lock:
            blocks.pop(me, None)


def _wrap_fork_launch() -> None:
    # multiprocessing's fork start method forks in Popen._launch (Python 3.4 and later),
    # whose child goes on to run the process's target: the one place where a fork and
    # what its child runs can be moved to another thread together. The spawn and
    # forkserver Popens have their own _launch, which this leaves alone.
    global _fork_launch
    with _lock:
        if _fork_launch is None:
            _fork_launch = popen_fork.Popen._launch  # type: ignore[attr-defined]  # (typeshed leaves it out)
            popen_fork.Popen._launch = _launch  # type: ignore[attr-defined]


def _launch(popen: Any, process_obj: Any) -> None:
    """multiprocessing's fork (``Popen._launch``) for the calling thread: made on the loop
    of its ``forks_on`` block, else here (no block, the call comes from the loop's own
    thread, or that loop has stopped)."""
    with _lock:
        forks = _loop_forks.get(threading.get_ident())
    if forks is None:
        return _fork_launch(popen, process_obj)
    if _running_loop() is forks.loop:  # asked on the loop's thread: waiting for it would never end
        forks.forks += 1
        return _fork_launch(popen, process_obj)
    done = _fork_on_loop(forks.loop, popen, process_obj)
    while not done.done():
        concurrent.futures.wait([done], timeout=LOOP_CHECK_S)
        if not done.done() and not forks.loop.is_running():
            done.cancel()  # False once the loop's thread has begun the fork: it is then waited for
    if done.cancelled():
        forks.here += 1
        return _fork_launch(popen, process_obj)
    done.result()  # what the fork raised, if it failed
    forks.forks += 1
    return None


def _fork_on_loop(loop: asyncio.AbstractEventLoop, popen: Any, process_obj: Any) -> concurrent.futures.Future[None]:
    """Hand the calling thread's fork to ``loop``'s thread; the future is done once it is
    made there, or cancelled where the loop is closed. The hooks of the fork look up the
    calling thread (forking_for)."""
    me = threading.get_ident()
    done: concurrent.futures.Future[None] = concurrent.futures.Future()

    def fork() -> None:
        if not done.set_running_or_notify_cancel():
            return  # the thread it was for gave up waiting and forked itself
        _acting.thread = me  # left so in the child: its hooks, and those of its own forks, read it
        try:
            _fork_launch(popen, process_obj)  # in the child this runs the target and exits
        except BaseException as exc:
            done.set_exception(exc)
            if not isinstance(exc, Exception):
                raise  # KeyboardInterrupt, SystemExit: the loop's thread's own as well
        else:
            done.set_result(None)
        finally:
            _acting.thread = None

    try:
        loop.call_soon_threadsafe(fork)
    except RuntimeError:  # the loop is closed
        done.cancel()
    return done


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


def protect(sock: _Listener) -> None:
    """Keep this listening socket, and every connection it accepts, out of forked
    children (TCP: by local port; Unix: by bound path)."""
    _install()
    name = sock.getsockname()
    with _lock:
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            _ports.add(int(name[1]))
        elif sock.family == socket.AF_UNIX and isinstance(name, str) and name:
            _paths.add(name)


def keep_out(fd: int) -> Callable[[], None]:
    """Keep this descriptor (a lock file, say) out of forked children; returns a
    function to call before closing it."""
    _install()
    with _lock:
        _descriptors_out.add(fd)

    def remove() -> None:
        with _lock:
            _descriptors_out.discard(fd)

    return remove


def on_fork(callback: Callable[[], None]) -> Callable[[], None]:
    """Call ``callback`` in the parent after each fork (in the forking thread); returns
    a function that stops the calls."""
    _install()
    with _lock:
        _forked.append(callback)

    def remove() -> None:
        with _lock, contextlib.suppress(ValueError):
            _forked.remove(callback)

    return remove


@contextlib.contextmanager
def child_settings(env: Mapping[str, str], switch_interval_s: float | None = None,
                   steady_heap: bool = False) -> Iterator[ChildSettings]:
    """Children this thread forks inside the block start with ``env`` added to their
    environment, when given ``switch_interval_s`` as their GIL switch interval
    (``sys.setswitchinterval``), and with ``steady_heap`` glibc's malloc set to keep its
    heap (see _steady_heap; nothing where the C library is not glibc). This process's
    own are left alone, and so are children of other threads (another engine starting
    beside this one) and processes started with ``subprocess`` (it runs no at-fork
    hooks). Yields the settings, whose ``forks`` counts the children that got them."""
    if switch_interval_s is not None and not switch_interval_s > 0:
        raise ValueError(f"a switch interval must be above 0 s, got {switch_interval_s}")
    settings = ChildSettings(dict(env), switch_interval_s, steady_heap and steady_heap_supported())
    if not env and not switch_interval_s and not settings.steady_heap:
        yield settings
        return
    _install()
    with _this_threads(_child_settings, settings, "child_settings"):
        yield settings


def _install() -> None:
    global _installed
    with _lock:
        if not _installed:
            os.register_at_fork(after_in_child=_after_in_child, after_in_parent=_after_in_parent)
            _installed = True


def _after_in_parent() -> None:
    with _lock:
        settings = _child_settings.get(forking_for())
        if settings is not None:
            settings.forks += 1
    for callback in list(_forked):
        callback()


def _after_in_child() -> None:
    # The lock: another thread may have held it at the fork, and it would stay held; the
    # child's own forks (a core's workers) take it. The child's one thread is the one that
    # forked, with the same id. yapd's sockets go first: nothing after them may keep a
    # child from dropping them.
    global _lock
    _lock = threading.Lock()
    reset_signals()
    drop_protected()
    _loop_forks.clear()  # the child has no loop running to fork on
    if sys.version_info < (3, 12):
        _forget_event_loop()
    settings = _child_settings.get(forking_for())
    if settings is not None:
        os.environ.update(settings.env)
        if settings.switch_interval_s:
            sys.setswitchinterval(settings.switch_interval_s)
        if settings.steady_heap:
            _steady_heap()


def _forget_event_loop() -> None:
    """In a freshly forked child, as asyncio does itself from Python 3.12: no current event
    loop. A child forked by the loop's thread (forks_on) would otherwise be handed the
    parent's loop by ``asyncio.get_event_loop()``, a loop it cannot run."""
    policy = getattr(asyncio.events, "_event_loop_policy", None)
    local = getattr(policy, "_local", None)
    if local is not None:
        policy._local = type(local)()  # type: ignore[union-attr]


def reset_signals() -> None:
    """In a freshly forked child: no signal wakeup descriptor, and for each signal the
    parent had given a handler of its own, Python's start-up handling (SIGINT raises
    KeyboardInterrupt, the rest take their default action) - except SIGHUP, ignored: to
    yapd it means "reload", so a terminal's hangup that yapd lives through must not end
    its EngineCores."""
    # The forking thread is the child's main thread, where these calls are allowed.
    with contextlib.suppress(ValueError):
        signal.set_wakeup_fd(-1)
    for sig in signal.valid_signals():
        with contextlib.suppress(OSError, ValueError):
            handler = signal.getsignal(sig)
            if callable(handler) and handler is not signal.default_int_handler:
                signal.signal(sig, _FRESH.get(sig, signal.SIG_DFL))


_FRESH: dict[int, Callable[[int, Any], Any] | int] = {
    signal.SIGINT: signal.default_int_handler, signal.SIGHUP: signal.SIG_IGN}


def drop_protected() -> None:
    """In a freshly forked child: replace each protected socket's descriptor, and each
    descriptor kept out, by /dev/null."""
    if not _ports and not _paths and not _descriptors_out:
        return
    null = os.open(os.devnull, os.O_RDWR)
    try:
        for fd in _descriptors():
            if fd != null and (fd in _descriptors_out or _is_protected(fd)):
                os.dup2(null, fd)
    finally:
        os.close(null)


def _descriptors() -> list[int]:
    try:
        return [int(n) for n in os.listdir("/proc/self/fd")]
    except OSError:
        return []


def _is_protected(fd: int) -> bool:
    try:
        if not stat.S_ISSOCK(os.fstat(fd).st_mode):
            return False
        sock = socket.socket(fileno=fd)
    except OSError:
        return False
    try:
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            return int(sock.getsockname()[1]) in _ports
        if sock.family == socket.AF_UNIX:
            return sock.getsockname() in _paths
        return False
    except OSError:
        return False
    finally:
        sock.detach()
