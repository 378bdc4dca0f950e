"""The engine interface every backend implements (vLLM on GPUs, transformers on CPUs)."""

from __future__ import annotations

import abc
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

EngineState = Literal["stopped", "starting", "ready", "failed", "stopping"]


class EngineError(RuntimeError):
    """The engine cannot serve the request (dead, stopped, or the request was refused)."""


@dataclass(frozen=True)
class SamplingSpec:
    max_tokens: int
    temperature: float = 0.8
    top_p: float = 1.0
    top_k: int = 0  # 0: off
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False


@dataclass(frozen=True)
class EngineStamps:
    """When a request reached the engine's queue, was first scheduled and had its first
    token, as ``time.monotonic()`` seconds (CLOCK_MONOTONIC: one clock for every process
    of the host, so an engine process's stamps compare with yapd's): where an engine's
    time to its first output went."""

    queued: float
    scheduled: float
    first_token: float
    # When the engine's front end took that first token from its EngineCore (vLLM: see
    # yapd.engines.receipts); None where not stamped.
    taken: float | None = None

    def ms_since(self, t0: float) -> dict[str, float]:
        """The stamps as ms after ``t0`` (a time.monotonic()), as done timings name them."""
        said = {"queued_ms": round((self.queued - t0) * 1000, 2),
                "scheduled_ms": round((self.scheduled - t0) * 1000, 2),
                "first_token_ms": round((self.first_token - t0) * 1000, 2)}
        if self.taken is not None:
            said["taken_ms"] = round((self.taken - t0) * 1000, 2)
        return said


@dataclass
class Delta:
    """New text since the last delta of one request."""

    text: str
    n_tokens: int
    finished: bool = False
    finish_reason: str | None = None  # "stop", "length", "abort"
    prompt_tokens: int = 0
    cached_tokens: int | None = None  # of the prompt, found in the engine's prefix cache (None: not said)
    # On a request's first delta, where the engine keeps them (vLLM: with its request
    # stats on, disable_log_stats = false in extra_engine_args).
    stamps: EngineStamps | None = None


@dataclass
class EngineHealth:
    ok: bool
    state: EngineState
    detail: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


class Engine(abc.ABC):
    """One model. ``stream`` yields :class:`Delta` objects; closing the iterator early
    (or cancelling the task that reads it) aborts the request in the engine."""

    role: str
    model: str
    backend: str
    # Whether this engine may always load while another one does. vLLM may not: each
    # engine sizes its KV cache from the GPU memory it sees free, and a neighbour loading
    # at the same time makes that reading wrong (seen on the H100: "-7.21 GiB
    # available"); it may once a memory plan is recorded (yapd.engines.memplan).
    parallel_start_safe: bool = True
    # Set for good by a stop (abandon_start); read by the start's own thread.
    start_abandoned: bool = False

    _tok: Any = None  # set by the start

    @property
    def tokenizer(self) -> Any:
        """yapd's own tokenizer for this engine's model (its turns build the prompts)."""
        if self._tok is None:
            raise EngineError(f"{self.role} engine is not started")
        return self._tok

    def tokenizer_source(self) -> tuple[str, str | None]:
        """Where ``tokenizer`` loads from (yapd.engines.tokenizer.load_tokenizer's name and
        revision): an engine host's yapd side loads its own from there."""
        raise EngineError(f"a {self.backend} engine names no tokenizer source: it cannot run in an engine host")

    @abc.abstractmethod
    async def start(self, alongside: bool = False, child_env: Mapping[str, str] | None = None) -> None:
        """Load the model; ``alongside``: another engine is loading at the same time;
        ``child_env``: added to the environment of the engine's own processes, if any
        (an MPS client priority)."""

    def forget_memory_plan(self) -> None:  # noqa: B027 - a hook: only vLLM engines keep plans
        """Drop what made a side-by-side start look safe (it just failed)."""

    def abandon_start(self) -> None:
        """The daemon is stopping: this engine's start, in progress or to come, fails at
        its next go_on()."""
        self.start_abandoned = True

    def start_error(self, exc: Exception) -> EngineError:
        """What a start that raised ``exc`` fails with: abandoned after a stop (which may
        have ended the process the start waited on), failed otherwise."""
        if self.start_abandoned:
            return EngineError(f"{self.role} engine start abandoned: the daemon is stopping ({exc})")
        return EngineError(f"{self.role} engine failed to start {self.model}: {exc}")

    def go_on(self, step: str) -> None:
        """Called by a start (from any thread) after each of its steps that nothing can cut
        short (an import, vLLM's config): after a stop, the start ends there."""
        if self.start_abandoned:
            raise EngineError(f"{self.role} engine start abandoned after {step}: the daemon is stopping")

    @abc.abstractmethod
    def stream(self, prompt_ids: Sequence[int], spec: SamplingSpec, request_id: str,
               together: bool = False) -> AsyncIterator[Delta]:
        """The request's deltas. ``together``: its request may wait for the end of the event
        loop's pass, to reach the engine with the pass's others (turn.send_together; vLLM
        engines only, see yapd.engines.together)."""

    @abc.abstractmethod
    async def abort(self, request_id: str) -> None: ...

    @abc.abstractmethod
    async def shutdown(self) -> None: ...

    @abc.abstractmethod
    def health(self) -> EngineHealth: ...

    @property
    @abc.abstractmethod
    def in_flight(self) -> int: ...

    def describe(self) -> dict[str, Any]:
        h = self.health()
        return {"role": self.role, "model": self.model, "backend": self.backend, "state": h.state,
                "ok": h.ok, "detail": h.detail, "in_flight": self.in_flight, **h.extra}
