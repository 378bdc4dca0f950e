"""yapd's own main with stand-in vLLM engines whose EngineCore never finishes loading
(for tests/test_daemon.py: a stop while engines load).

Each engine's start forks, from a worker thread as vLLM does, a child titled as vLLM
titles its EngineCore, which prints a first line and then "loads" for ten minutes with
no signal handler of its own (vLLM's EngineCore sets one only once it is built). With
LOADING_CORE_GATE set, a start first holds in its thread as vLLM's does while it imports
and builds its config; with LOADING_CORE_INSPECT, it then runs a child with the command
line of vLLM's model inspection, for ten minutes. With the engine's start method "spawn"
the child is spawned instead and stays untitled, as a spawned EngineCore is while it
imports torch and vLLM. The start waits for that child and fails when it ends, as vLLM's
start does when its EngineCore dies. What is real: yapd, its stop, its search for
EngineCores, the signals, and the fork with yapd's at-fork hooks.

    python -m tests.loading_core --config FILE --admin-socket PATH
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Any

import setproctitle

from yapd.config import Config
from yapd.engines.base import Delta, Engine, EngineError, EngineHealth, EngineState, SamplingSpec

LOAD_S = 600.0
GATE_ENV = "LOADING_CORE_GATE"  # a FIFO: each start holds until it is opened for writing
INSPECT_ENV = "LOADING_CORE_INSPECT"  # set: each start inspects its model as vLLM does on a cache miss


def _core(titled: bool = True) -> None:
    if titled:
        setproctitle.setproctitle("VLLM::EngineCore")
    # One write, so that the two cores' lines cannot interleave in yapd's stderr (print
    # writes the text and its newline apart).
    os.write(2, f"(EngineCore pid={os.getpid()}) stand-in: Initializing a V1 LLM engine\n".encode())
    time.sleep(LOAD_S)
    os._exit(0)


class LoadingEngine(Engine):
    backend = "vllm"

    def __init__(self, role: str, cfg: Config) -> None:
        self.role = role
        self.model = getattr(cfg, role).model
        self.method = cfg.start_method(role)  # each role its own, as VllmEngine starts
        self._state: EngineState = "stopped"

    @property
    def tokenizer(self) -> Any:
        raise EngineError(f"{self.role} engine is not started")

    def tokenizer_source(self) -> tuple[str, str | None]:
        return self.model, None  # never loaded: no start of this engine succeeds

    async def start(self, alongside: bool = False, child_env: Mapping[str, str] | None = None) -> None:
        self._state = "starting"
        try:
            code = await asyncio.to_thread(self._fork_and_wait)
        except EngineError:
            raise
        except RuntimeError as exc:  # as vLLM's start raises when its model inspection fails
            raise self.start_error(exc) from exc
        finally:
            self._state = "failed"
        raise EngineError(f"{self.role} engine failed to start: its EngineCore ended while loading (exit code {code})")

    def _fork_and_wait(self) -> int | None:
        if gate := os.environ.get(GATE_ENV):
            # vLLM's start before its EngineCore (its import, its config): seconds in this
            # thread that nothing cuts short. Here: until the test opens the gate.
            os.write(2, f"stand-in: {self.role} config step\n".encode())
            with open(gate, "rb") as fifo:
                fifo.read()
            self.go_on("the config step")
        if os.environ.get(INSPECT_ENV):
            # vLLM's config inspecting the model class in a fresh interpreter (a cache miss)
            inspection = subprocess.Popen([sys.executable, "-c", f"import time; time.sleep({LOAD_S})",
                                           "-m", "vllm.model_executor.models.registry"])
            os.write(2, f"stand-in: {self.role} model inspection pid={inspection.pid}\n".encode())
            if inspection.wait() != 0:
                raise RuntimeError(f"Error raised in subprocess: exit code {inspection.returncode}")
        core = multiprocessing.get_context(self.method).Process(target=_core, args=(self.method == "fork",),
                                                                daemon=True)
        core.start()
        core.join()
        return core.exitcode

    def stream(self, prompt_ids: Sequence[int], spec: SamplingSpec, request_id: str,
               together: bool = False) -> AsyncIterator[Delta]:
        raise EngineError(f"{self.role} engine is {self._state}")

    async def abort(self, request_id: str) -> None:
        return None

    async def shutdown(self) -> None:
        self._state = "stopped"

    def health(self) -> EngineHealth:
        return EngineHealth(False, self._state)

    @property
    def in_flight(self) -> int:
        return 0


def main() -> int:
    from yapd import cli, daemon

    daemon.create_engine = loading_engine
    return cli.main(sys.argv[1:])


def loading_engine(role: str, cfg: Config) -> Engine:
    """A stand-in, in an engine host of its own with ``own_process``."""
    from yapd.engines.hosted import HostedEngine

    local = LoadingEngine(role, cfg)
    if getattr(cfg, role).own_process:
        return HostedEngine(role, cfg, local, "tests.loading_core:LoadingEngine")
    return local


if __name__ == "__main__":
    sys.exit(main())
