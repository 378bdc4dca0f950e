"""Prometheus metrics, on a registry of the daemon's own (no import-time globals)."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily

# Voice latency lives between a few ms and a few seconds.
LATENCY_BUCKETS = (0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5,
                   0.75, 1.0, 2.0, 5.0, 10.0)
LOOP_LAG_BUCKETS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0)
GC_PAUSE_BUCKETS = (0.0001, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 1.0)
ITL_BUCKETS = (0.002, 0.004, 0.006, 0.008, 0.01, 0.015, 0.02, 0.03, 0.05, 0.1, 0.25, 0.5, 1.0)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.ttft = Histogram("yapd_ttft_seconds", "Start received to first token sent", buckets=LATENCY_BUCKETS,
                              registry=r)
        self.tool_decision = Histogram("yapd_tool_decision_seconds", "Start received to tool decision sent",
                                       buckets=LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("yapd_inter_token_seconds", "Gap between token messages of one turn",
                             buckets=ITL_BUCKETS, registry=r)
        self.turn_total = Histogram("yapd_turn_seconds", "Start received to done sent", buckets=LATENCY_BUCKETS,
                                    registry=r)
        self.cancel_latency = Histogram("yapd_cancel_seconds", "Cancel or barge-in to done sent",
                                        buckets=ITL_BUCKETS, registry=r)
        self.active = Gauge("yapd_active_connections", "Open WebSocket connections", registry=r)
        self.max_connections = Gauge("yapd_max_connections", "Connection cap", registry=r)
        self.turns = Counter("yapd_turns", "Turns by outcome", ["outcome"], registry=r)
        self.cancels = Counter("yapd_cancels", "Turns cancelled, by cause", ["cause"], registry=r)
        self.errors = Counter("yapd_errors", "Error messages sent, by code", ["code"], registry=r)
        self.tool_decisions = Counter("yapd_tool_decisions", "Tool decisions by status and reason",
                                      ["status", "reason"], registry=r)
        self.connections = Counter("yapd_connections", "Connections by outcome", ["outcome"], registry=r)
        self.tokens = Counter("yapd_generated_tokens", "Tokens generated", ["role"], registry=r)
        # Their ratio is each engine's prefix-cache hit rate: the history trim in coarse
        # steps is there to keep it high.
        self.prompt_tokens = Counter("yapd_prompt_tokens", "Prompt tokens sent to the engines", ["role"],
                                     registry=r)
        self.prompt_cached_tokens = Counter("yapd_prompt_cached_tokens",
                                            "Prompt tokens the engines found in their prefix cache", ["role"],
                                            registry=r)
        self.loop_lag = Histogram("yapd_event_loop_lag_seconds", "How late a 50 ms timer fires on the event loop",
                                  buckets=LOOP_LAG_BUCKETS, registry=r)
        self.gc_pause = Histogram("yapd_gc_pause_seconds", "How long a garbage collection held the interpreter",
                                  ["generation"], buckets=GC_PAUSE_BUCKETS, registry=r)
        self.mps_active = Gauge("yapd_mps_active", "1 while the engines run under CUDA MPS (yapd's or the host's)",
                                registry=r)

    def watch_engines(self, serving: Callable[[], Mapping[str, bool]]) -> None:
        """yapd_engine_up{role}: each engine's health as of the scrape (``serving()``: role ->
        serves), so an engine that dies shows at once, and one no longer deployed goes."""
        self.registry.register(_EngineUp(serving))

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _EngineUp:
    """A collector of yapd_engine_up, read from the engines when scraped."""

    def __init__(self, serving: Callable[[], Mapping[str, bool]]) -> None:
        self.serving = serving

    @staticmethod
    def _family() -> GaugeMetricFamily:
        return GaugeMetricFamily("yapd_engine_up", "1 when the engine serves", labels=["role"])

    def describe(self) -> Iterator[GaugeMetricFamily]:
        yield self._family()

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = self._family()
        for role, ok in self.serving().items():
            family.add_metric([role], 1.0 if ok else 0.0)
        yield family
