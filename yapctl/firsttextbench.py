"""What vLLM's front end spends on a step's first outputs: a program, any machine with vLLM.

vLLM's output processor (on yapd's event loop, in its engines' output handlers) turns
each step's tokens into text. A request's first token costs far more than the ones after
it: its detokenizer's stream was primed with the whole prompt and decodes it again
(yapd/engines/firsttext.py). This program builds vLLM's ``OutputProcessor`` with a real
tokenizer, adds ``--sessions`` requests of a ``--prompt-tokens`` prompt (gpubench's words), and
times ``process_outputs`` for the step bringing all their first tokens and the step
after, with each request's stream primed as vLLM primes it and as yapd does
(``--context`` tokens, engines.detokenizer_context)::

    python -m yapctl.firsttextbench MODEL_DIR [--sessions 16] [--prompt-tokens 2632] [--rounds 20]

It also checks that both primings give every reply the same text. No GPU is used; vLLM
must be importable. A program that prints figures, not a test.
"""

from __future__ import annotations

import argparse
import random
import time
import types
from collections.abc import Sequence
from typing import Any

from yapctl.bench import pct
from yapctl.gpubench.prompts import text


def first_steps(model: str, sessions: int, prompt_tokens: int, rounds: int, context: int) -> tuple[
        list[float], list[float], list[float], list[list[str]]]:
    """Times in ms for each round's ``add_request`` of its requests (where yapd primes
    their streams), its first-token step's ``process_outputs`` and the step after's, and
    the text each request was given, with streams primed from ``context`` tokens (0:
    vLLM's own, the whole prompt)."""
    from vllm.sampling_params import RequestOutputKind, SamplingParams
    from vllm.v1.engine import EngineCoreEvent, EngineCoreEventType, EngineCoreOutput, EngineCoreRequest
    from vllm.v1.engine.output_processor import OutputProcessor, RequestOutputCollector
    from vllm.v1.metrics.stats import IterationStats

    from yapd.engines.firsttext import primes_from_prompt_end
    from yapd.engines.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(model)
    processor = OutputProcessor(tokenizer, log_stats=True)
    if context:
        assert primes_from_prompt_end(types.SimpleNamespace(output_processor=processor), context)
    corpus = tokenizer(text(2 * prompt_tokens + 100, 1), add_special_tokens=False).input_ids
    vocab = len(tokenizer)
    rnd = random.Random(0)  # noqa: S311 - a benchmark's replies, no secret
    adds: list[float] = []
    firsts: list[float] = []
    seconds: list[float] = []
    texts: list[list[str]] = []
    for r in range(rounds):
        queues = []
        added = 0.0
        for i in range(sessions):
            rid = f"r{r}-{i}"
            start = rnd.randrange(0, len(corpus) - prompt_tokens)
            params = SamplingParams(max_tokens=64, output_kind=RequestOutputKind.DELTA, skip_special_tokens=True)
            request = EngineCoreRequest(
                request_id=rid, prompt_token_ids=corpus[start:start + prompt_tokens], mm_features=None,
                sampling_params=params, pooling_params=None, arrival_time=time.time(), lora_request=None,
                cache_salt=None, data_parallel_rank=None, external_req_id=rid)
            queue = RequestOutputCollector(RequestOutputKind.DELTA, rid)
            t0 = time.perf_counter()
            processor.add_request(request, None, None, 0, queue)
            added += time.perf_counter() - t0
            queues.append(queue)
        adds.append(added * 1000)
        reply = [[rnd.randrange(0, vocab) for _ in range(2)] for _ in range(sessions)]
        now = time.monotonic()
        for step, took in ((0, firsts), (1, seconds)):
            events = [EngineCoreEvent.new_event(EngineCoreEventType.QUEUED, now),
                      EngineCoreEvent.new_event(EngineCoreEventType.SCHEDULED, now)] if step == 0 else None
            outputs = [EngineCoreOutput(request_id=f"r{r}-{i}", new_token_ids=[reply[i][step]], events=events)
                       for i in range(sessions)]
            t0 = time.perf_counter()
            processor.process_outputs(outputs, time.monotonic(), IterationStats())
            took.append((time.perf_counter() - t0) * 1000)
            for i, queue in enumerate(queues):
                out: Any = queue.get_nowait()
                if step == 0:
                    texts.append([])
                texts[r * sessions + i].append(out.outputs[0].text if out is not None else "")
        processor.abort_requests([f"r{r}-{i}" for i in range(sessions)], internal=True)
    return adds, firsts, seconds, texts


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="a model folder (its tokenizer is what is used)")
    p.add_argument("--sessions", type=int, default=16, help="requests whose first tokens come in one step")
    p.add_argument("--prompt-tokens", type=int, default=2632, help="each request's prompt (gpubench's chat: 2632)")
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--context", type=int, default=16, help="yapd's priming (engines.detokenizer_context)")
    args = p.parse_args(argv)
    if min(args.sessions, args.prompt_tokens, args.rounds, args.context) < 1:
        p.error("--sessions, --prompt-tokens, --rounds and --context must be >= 1")
    print(f"{args.sessions} requests a step, {args.prompt_tokens}-token prompts, {args.rounds} rounds, "
          f"{args.model}")
    print("| streams primed with | adding the requests p50 / p95 ms | first tokens' step p50 / p95 ms | "
          "the next step p50 / p95 ms |")
    print("| --- | --- | --- | --- |")
    said = []
    for context, name in ((0, "the whole prompt (vLLM)"), (args.context, f"the last {args.context} tokens (yapd)")):
        adds, firsts, seconds, texts = first_steps(args.model, args.sessions, args.prompt_tokens, args.rounds,
                                                   context)
        print(f"| {name} | {pct(adds, 50)} / {pct(adds, 95)} | {pct(firsts, 50)} / {pct(firsts, 95)} | "
              f"{pct(seconds, 50)} / {pct(seconds, 95)} |")
        said.append(texts)
    same = said[0] == said[1]
    print(f"every reply's text the same both ways: {same}")
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
