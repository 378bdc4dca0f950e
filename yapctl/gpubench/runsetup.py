"""What one benchmark run holds fixed: its levels, rounds, ports, and yapd's config for it."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from yapd import config
from yapd.config import Config, EnginesConfig, TurnConfig

LEVELS = (1, 8, 16, 24)
PORT = 8123
SERVE_PORT = 8124
# The serve phase's passes over the levels: the chat prompt as text (as users call it), as
# yapd's token ids, and beside a second server for the tool model.
SERVE_PASSES = ("text", "ids", "tool")
ROUNDS = 8  # lockstep rounds per level


def turns_for(c: int, rounds: int = ROUNDS) -> int:
    # Sessions whose turns are all alike run in lockstep, so a level is ``rounds`` bursts
    # of c starts and a p95 is decided by its slowest few bursts (one session: 3 x rounds).
    return max(3 * rounds, rounds * c)


@dataclass(frozen=True)
class Setup:
    """What one benchmark run holds fixed: the model folders, a work folder (caches,
    logs), the concurrency levels, lockstep rounds per level and the chat engine's
    tensor parallelism."""

    models: Path
    work: Path
    levels: tuple[int, ...] = LEVELS
    chat_tp: int = 1
    rounds: int = ROUNDS
    mps: bool = False  # yapd runs its own MPS daemon (engines.mps = "on"), else none ("off")
    mps_priority: str = EnginesConfig.mps_priority  # engines.mps_priority for yapd (yapd's default unless asked)
    event_loop: str = "auto"  # server.event_loop for yapd
    request_order: str = TurnConfig.request_order  # turn.request_order for yapd (yapd's default unless asked)
    # Live config changes ('turn.request_order="chat_first"') yapd runs each level with too, right
    # after the level as configured (an A/B on one process, reloaded over the admin socket).
    ab: tuple[str, ...] = ()
    # With ab: the two configs take turns round by round on the same sessions instead of
    # level after level (drift of the machine then hits both alike).
    ab_interleave: bool = False
    order_probe: bool = False  # the raw phase also times one session's requests in each order
    raw_order: str = "chats_then_tools"  # raw's turns: chat request at once, tool's a loop round later; or tool_first
    profile_level: int = 0  # yapd and raw run this level once more with their event loop profiled (0: not)
    serve_passes: tuple[str, ...] = SERVE_PASSES  # what the serve phase times (see --serve-passes)
    # The pair phase's chat and tool gpu_memory_utilization, for yapd's engines and raw's
    # alike: two of each share the GPU.
    pair_fractions: tuple[float, float] = (0.38, 0.09)
    # yapd config keys set for every phase (SECTION.KEY=VALUE, value as TOML): yapd's
    # config, and raw's and vllm serve's engines where they read it (engine_kwargs)
    sets: tuple[str, ...] = ()
    # yapd's and raw's processes (front end, EngineCores) sampled by py-spy at this level (0: not)
    pyspy_level: int = 0
    pyspy_native: bool = False  # with C and C++ frames (py-spy stops each process per sample)
    # How raw's engines start their EngineCores: "spawn", as every run's raw did before this
    # option (the bench process held a CUDA context, and vLLM then spawns), or "fork"
    raw_start_method: str = "spawn"
    skip_restart: bool = False  # the yapd phase ends without its process restart
    # Every turn's persona new to the engines (--fresh-prompts): each level under a salt
    # of its own (level_salt), so no turn's chat prompt is in a prefix cache.
    fresh_prompts: bool = False
    # With ab: each level is measured this many times per config, every time on engines
    # restarted for it (A B B A ...): ab may then change engine keys, and the starts' own
    # spread (several ms at one session, runs w-z) is sampled instead of deciding alone.
    ab_restarts: int = 0

    def config_text(self, chat: str = "nemo-12b", tool: str = "hammer-3b") -> str:
        return with_overrides(f"""
[server]
host = "127.0.0.1"
port = {PORT}
api_keys = ["bench"]
max_connections = 64
rate_limit_per_s = 1000.0
rate_limit_burst = 1000
event_loop = "{self.event_loop}"
[engines]
deploy = "both"
cache_dir = "{self.work / "cache"}"
mps = "{"on" if self.mps else "off"}"
mps_priority = "{self.mps_priority}"
[chat]
model = "{self.models / chat}"
backend = "auto"
load_format = "dummy"
quantization = "fp8"
tensor_parallel_size = {self.chat_tp}
[tool]
model = "{self.models / tool}"
backend = "auto"
load_format = "dummy"
[turn]
concurrent = true
request_order = "{self.request_order}"
ignore_eos = true
chat_max_out = 200
""", self.sets)

    def config(self, overrides: Sequence[str] = ()) -> Config:
        return config.from_mapping(config.tomllib.loads(with_overrides(self.config_text(), overrides)), "bench")

    def config_file(self) -> Path:
        path = self.work / "yapd.toml"
        path.write_text(self.config_text())
        return path


def with_overrides(text: str, overrides: Sequence[str]) -> str:
    """The bench's config text with ``section.key=value`` items set (value as TOML)."""
    lines = text.splitlines()
    for item in overrides:
        dotted, eq, value = item.partition("=")
        section, dot, key = dotted.strip().partition(".")
        if not eq or not dot or not key:
            raise ValueError(f"{item!r}: expected section.key=value")
        line = f"{key} = {value.strip()}"
        try:
            start = lines.index(f"[{section}]") + 1
        except ValueError:
            lines += [f"[{section}]", line]
            continue
        end = next((i for i in range(start, len(lines)) if lines[i].startswith("[")), len(lines))
        at = next((i for i in range(start, end) if lines[i].split("=")[0].strip() == key), None)
        if at is None:
            lines.insert(start, line)
        else:
            lines[at] = line
    return "\n".join(lines) + "\n"
