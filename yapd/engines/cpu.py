"""The CPU engine: Hugging Face checkpoints run with transformers and torch.

For development, tests and the demo. Each request decodes step by step in a worker
thread with its own KV cache; the thread checks the request's abort flag before every
forward pass, so a cancelled generation stops computing within one step.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from yapd.engines.base import Delta, Engine, EngineError, EngineHealth, EngineStamps, EngineState, SamplingSpec
from yapd.engines.tokenizer import load_tokenizer

log = logging.getLogger("yapd.engine.cpu")

_END = object()
_STOPPED = object()  # the engine stopped under the request (shutdown)
# One model load at a time in the process. transformers is not thread-safe here: its lazy
# module loader breaks when two threads import through it at once, and a load swaps
# process-wide torch state (default dtype, weight initialisers) while it builds the
# model, so two loads at once left some weights uninitialised: a few hundred NaN steps in
# 25k with the demo models loaded side by side, none loaded in turn.
_LOAD_LOCK = threading.Lock()
# One forward pass at a time across every CPU engine of the process: on the few cores a
# CPU host has, taking turns measured faster (20.5k vs 14.5k steps in 25 s, four
# threads, demo model) than running the passes side by side.
_FORWARD_LOCK = threading.Lock()


@dataclass
class _Request:
    request_id: str
    queue: asyncio.Queue[Any]
    abort: threading.Event = field(default_factory=threading.Event)
    # time.monotonic() as it was queued, a worker took it up and its first token came
    # (the worker writes the last two before it hands that token over)
    queued: float = field(default_factory=time.monotonic)
    scheduled: float = 0.0
    first_token: float = 0.0
    # ... and when the stream, on the event loop, took that token from the worker
    taken: float = 0.0

    def stamps(self) -> EngineStamps | None:
        if not self.first_token:
            return None
        return EngineStamps(self.queued, self.scheduled, self.first_token, self.taken or None)


class CpuEngine(Engine):
    backend = "cpu"

    def __init__(self, role: str, model: str, *, revision: str = "", workers: int = 4,
                 max_model_len: int = 5760) -> None:
        self.role = role
        self.model = model
        self.revision = revision or None
        self.max_model_len = max_model_len
        self._workers = workers
        self._tok: Any = None
        self._model: Any = None
        self._eos: set[int] = set()
        self._pool: ThreadPoolExecutor | None = None
        self._requests: dict[str, _Request] = {}
        self._state: EngineState = "stopped"
        self._detail = ""
        # Test and fault-injection hook: fail the Nth generation step from now (see yapd.faults).
        self.fail_after_steps: int | None = None
        # Fault-injection hook: the next generation step hangs this long (a wedged GPU
        # kernel, say), unless its request is aborted first.
        self.stall_next_step_s = 0.0
        self._stall_lock = threading.Lock()

    def tokenizer_source(self) -> tuple[str, str | None]:
        return self.model, self.revision

    @property
    def in_flight(self) -> int:
        return len(self._requests)

    def health(self) -> EngineHealth:
        return EngineHealth(self._state == "ready", self._state, self._detail)

    async def start(self, alongside: bool = False, child_env: Mapping[str, str] | None = None) -> None:
        # Generations run on threads of this process: no child takes ``child_env``.
        self._state = "starting"
        t0 = time.perf_counter()
        try:
            await asyncio.to_thread(self._load)
        except Exception as exc:
            self._state, self._detail = "failed", f"load failed: {exc}"
            raise EngineError(f"{self.role} engine could not load {self.model}: {exc}") from exc
        self._pool = ThreadPoolExecutor(self._workers, thread_name_prefix=f"yapd-{self.role}")
        self._state, self._detail = "ready", ""
        log.info("engine ready role=%s backend=cpu model=%s load_s=%.2f", self.role, self.model,
                 time.perf_counter() - t0)

    def _load(self) -> None:
        with _LOAD_LOCK:
            import torch
            from transformers import AutoModelForCausalLM, DynamicCache  # noqa: F401

            # One thread per pass: the passes of both engines take turns anyway
            # (_FORWARD_LOCK), and the intra-op pool only adds hand-offs on a few cores.
            torch.set_num_threads(1)
            self._tok = load_tokenizer(self.model, self.revision)
            model = AutoModelForCausalLM.from_pretrained(self.model, revision=self.revision, dtype=torch.float32)
        model.eval()
        self._model = model
        eos = model.generation_config.eos_token_id
        eos_ids = eos if isinstance(eos, list) else [eos]
        if self._tok.eos_token_id is not None:
            eos_ids.append(self._tok.eos_token_id)
        self._eos = {int(e) for e in eos_ids if e is not None}

    async def stream(self, prompt_ids: Sequence[int], spec: SamplingSpec,
                     request_id: str, together: bool = False) -> AsyncIterator[Delta]:
        # together: each request decodes in a thread of its own, there is no step to share
        if self._state != "ready" or self._pool is None:
            raise EngineError(f"{self.role} engine is {self._state}")
        if request_id in self._requests:
            raise EngineError(f"request id {request_id!r} is already running")
        if len(prompt_ids) + spec.max_tokens > self.max_model_len:
            raise EngineError(f"prompt of {len(prompt_ids)} tokens + {spec.max_tokens} new tokens "
                              f"exceeds max_model_len {self.max_model_len}")
        loop = asyncio.get_running_loop()
        req = _Request(request_id, asyncio.Queue())
        self._requests[request_id] = req
        future = loop.run_in_executor(self._pool, self._generate, loop, req, list(prompt_ids), spec)
        ids: list[int] = []
        sent = ""
        held = 0  # tokens decoded but not yet reported: the start of a character
        first = True
        cached = 0  # no prefix cache: each request computes its whole prompt

        def stamps() -> EngineStamps | None:  # on the first delta only
            nonlocal first
            was, first = first, False
            return req.stamps() if was else None

        try:
            while True:
                item = await req.queue.get()
                req.taken = req.taken or time.monotonic()
                if item is _END:
                    finish = "abort" if req.abort.is_set() else "length"
                    yield Delta(self._flush(ids, sent), held, True, finish, len(prompt_ids), cached, stamps())
                    return
                if item is _STOPPED:
                    raise EngineError(f"{self.role} engine aborted the request (stopping or restarting)")
                if isinstance(item, BaseException):
                    raise EngineError(f"{self.role} engine failed: {item}") from item
                token_id, is_eos = item
                if is_eos and not spec.ignore_eos:
                    yield Delta(self._flush(ids, sent), held, True, "stop", len(prompt_ids), cached, stamps())
                    return
                ids.append(token_id)
                held += 1
                text = self._tok.decode(ids, skip_special_tokens=True)
                if text.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for its rest
                    continue
                for stop in spec.stop:
                    at = text.find(stop, max(0, len(sent) - len(stop)))
                    if at >= 0:
                        req.abort.set()
                        yield Delta(text[len(sent):at], held, True, "stop", len(prompt_ids), cached, stamps())
                        return
                # Text that may be the start of a stop string is held back until the next
                # token says (as vLLM does): sent, a stop found across two tokens left its
                # first characters in the reply.
                keep = len(text) - _stop_prefix(text, spec.stop)
                if keep <= len(sent):
                    continue
                new, sent = text[len(sent):keep], text[:keep]
                n, held = held, 0
                yield Delta(new, n, False, None, len(prompt_ids), cached, stamps())
        finally:
            req.abort.set()
            self._requests.pop(request_id, None)
            # The worker notices the flag before its next step; don't wait for it here.
            future.add_done_callback(_swallow)

    def _flush(self, ids: list[int], sent: str) -> str:
        if not ids:
            return ""
        text = self._tok.decode(ids, skip_special_tokens=True)
        return text[len(sent):].replace("\ufffd", "")

    def _generate(self, loop: asyncio.AbstractEventLoop, req: _Request, prompt: list[int],
                  spec: SamplingSpec) -> None:
        import torch
        from transformers import DynamicCache

        def put(item: Any) -> None:
            try:
                loop.call_soon_threadsafe(req.queue.put_nowait, item)
            except RuntimeError:  # the loop closed under us (daemon exit): nobody is reading
                req.abort.set()

        req.scheduled = time.monotonic()
        try:
            gen = torch.Generator()
            gen.manual_seed(spec.seed if spec.seed is not None else int.from_bytes(os.urandom(4), "little"))
            with torch.inference_mode():
                cache = DynamicCache()
                input_ids = torch.tensor([prompt], dtype=torch.long)
                seen: list[int] = []
                for _ in range(spec.max_tokens):
                    if self.stall_next_step_s:
                        with self._stall_lock:  # one step stalls, not each worker's
                            stall, self.stall_next_step_s = self.stall_next_step_s, 0.0
                        if stall and req.abort.wait(stall):
                            log.info("injected stall ended by an abort request=%s", req.request_id)
                    if req.abort.is_set():
                        break
                    if self.fail_after_steps is not None:
                        self.fail_after_steps -= 1
                        if self.fail_after_steps < 0:
                            self.fail_after_steps = None
                            raise RuntimeError("injected engine fault")
                    logits, cache = self._forward(input_ids, cache, prompt + seen, torch)
                    token_id = _sample(logits, spec, seen, gen, torch)
                    if token_id is None:
                        logits, cache = self._recompute(prompt + seen, "probabilities", torch)
                        token_id = _sample(logits, spec, seen, gen, torch)
                        if token_id is None:
                            raise RuntimeError("the model produced an invalid distribution twice")
                    seen.append(token_id)
                    is_eos = token_id in self._eos
                    if not req.first_token:
                        req.first_token = time.monotonic()
                    put((token_id, is_eos))
                    if is_eos and not spec.ignore_eos:
                        return
                    input_ids = torch.tensor([[token_id]], dtype=torch.long)
        except BaseException as exc:
            if req.abort.is_set():
                # Cancelled or shut down mid-step (a shutdown unloads the model under us):
                # nobody reads this request any more, and nothing went wrong.
                log.debug("generation stopped role=%s request=%s: %r", self.role, req.request_id, exc)
                return
            log.exception("generation failed role=%s request=%s", self.role, req.request_id)
            put(exc)
            return
        put(_END)

    def kill(self) -> None:
        """What a crashed engine process looks like (fault tests): every request fails,
        health says failed, until the engine is restarted."""
        self._state, self._detail = "failed", "engine killed"
        for req in list(self._requests.values()):
            req.abort.set()
            req.queue.put_nowait(RuntimeError("engine killed"))

    def _forward(self, input_ids: Any, cache: Any, history: list[int], torch: Any) -> tuple[Any, Any]:
        """One step's next-token logits (and the cache to go on with). A step with a
        non-finite logit is recomputed once from scratch over ``history`` before the
        request fails: the NaNs once seen here came from models loaded side by side (see
        _LOAD_LOCK), and none has been seen since; the check stays as a guard."""
        with _FORWARD_LOCK:
            out = self._model(input_ids=input_ids, past_key_values=cache, use_cache=True)
        logits = out.logits[0, -1].float().clone()
        if bool(torch.isfinite(logits).all()):
            return logits, cache
        return self._recompute(history, "logits", torch)

    def _recompute(self, history: list[int], what: str, torch: Any) -> tuple[Any, Any]:
        from transformers import DynamicCache

        log.warning("non-finite %s role=%s; recomputing %d tokens without the cache", what, self.role, len(history))
        cache = DynamicCache()
        with _FORWARD_LOCK:
            out = self._model(input_ids=torch.tensor([history], dtype=torch.long), past_key_values=cache,
                              use_cache=True)
        logits = out.logits[0, -1].float().clone()
        if not bool(torch.isfinite(logits).all()):
            raise RuntimeError("the model produced non-finite logits twice")
        return logits, cache

    async def abort(self, request_id: str) -> None:
        req = self._requests.get(request_id)
        if req is not None:
            req.abort.set()

    async def shutdown(self) -> None:
        self._state = "stopping"
        for req in list(self._requests.values()):
            req.abort.set()
            # Ended here, not by its worker: one whose step fails as the model goes, or
            # one still queued for a worker (cancelled below), would never put its end,
            # and its turn would wait for it until the connection's idle timeout.
            req.queue.put_nowait(_STOPPED)
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None
        self._model = None
        self._state = "stopped"


def _stop_prefix(text: str, stops: Sequence[str]) -> int:
    """How many of ``text``'s last characters begin one of ``stops`` (0: none)."""
    return max((k for stop in stops for k in range(len(stop) - 1, 0, -1) if text.endswith(stop[:k])), default=0)


def _swallow(future: Any) -> None:
    if not future.cancelled():
        future.exception()


def _sample(logits: Any, spec: SamplingSpec, seen: list[int], gen: Any, torch: Any) -> int | None:
    """The next token, or None when the numbers do not make a distribution (see _forward)."""
    logits = logits.double()
    if spec.repetition_penalty != 1.0 and seen:
        idx = torch.tensor(sorted(set(seen)), dtype=torch.long)
        vals = logits[idx]
        logits[idx] = torch.where(vals > 0, vals / spec.repetition_penalty, vals * spec.repetition_penalty)
    if spec.temperature <= 1e-5 or spec.top_k == 1:
        return int(torch.argmax(logits))
    logits = logits / spec.temperature
    if spec.top_k > 0:
        kth = torch.topk(logits, min(spec.top_k, logits.numel())).values[-1]
        logits = torch.where(logits < kth, torch.full_like(logits, float("-inf")), logits)
    probs = torch.softmax(logits, dim=-1)
    order = None
    if spec.top_p < 1.0:
        probs, order = torch.sort(probs, descending=True)
        keep = torch.cumsum(probs, 0) - probs < spec.top_p
        probs = torch.where(keep, probs, torch.zeros_like(probs))
    total = float(probs.sum())
    if not (total > 0 and bool(torch.isfinite(probs).all())):
        return None
    choice = int(torch.multinomial(probs / total, 1, generator=gen))
    return int(order[choice]) if order is not None else choice
