"""Typed settings: TOML file, then environment overrides, then command-line flags.

Every key has a typed field here; unknown keys and ill-typed values are errors that
name the file (or variable), the key and the reason. :func:`diff_keys` tells a reload
which changes apply live and which need new engines.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import sys
import types
import typing
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union
from urllib.parse import urlsplit

from yapd.paths import default_admin_socket

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on 3.10 only
    import tomli as tomllib

DeployMode = Literal["both", "chat", "tool"]
Backend = Literal["auto", "vllm", "cpu"]
Quantization = Literal["auto", "none", "fp8", "awq", "gptq"]
StartMethod = Literal["fork", "spawn"]
RoleStartMethod = Literal["", "fork", "spawn"]
MpsMode = Literal["auto", "on", "off"]
MpsPriority = Literal["tool", "equal"]
RequestOrder = Literal["tool_first", "chat_first", "chats_then_tools"]

DEFAULT_CHAT_MODEL = "SicariusSicariiStuff/Impish_Nemo_12B"
DEFAULT_TOOL_MODEL = "MadeAgents/Hammer2.1-3b"
DEFAULT_API_KEY = "yap_token"
# Connection caps of the original server, by deploy mode.
DEFAULT_MAX_CONNECTIONS = {"tool": 32, "chat": 24, "both": 16}


class ConfigError(ValueError):
    """A setting is missing, unknown or invalid; the message says where and why."""


@dataclass
class ServerConfig:
    host: str = "0.0.0.0"
    port: int = 8000
    api_keys: list[str] = field(default_factory=lambda: [DEFAULT_API_KEY])
    # 0 means "the default of the deploy mode" (32 tool / 24 chat / 16 both).
    max_connections: int = 0
    max_connections_per_key: int = 0
    max_frame_bytes: int = 1 << 20
    idle_timeout_s: float = 150.0
    rate_limit_per_s: float = 20.0
    rate_limit_burst: int = 40
    send_timeout_s: float = 10.0
    write_buffer_bytes: int = 1 << 20
    allowed_origins: list[str] = field(default_factory=list)
    metrics_require_auth: bool = True
    drain_timeout_s: float = 10.0
    # "auto": uvloop when it is installed (vLLM brings it), else asyncio's own loop.
    event_loop: str = "auto"


@dataclass
class EngineConfig:
    model: str = ""
    revision: str = ""
    tokenizer: str = ""
    # "auto": vLLM when CUDA and vllm are present, else the CPU engine.
    backend: Backend = "auto"
    quantization: Quantization = "auto"
    kv_cache_dtype: str = "auto"
    # 0 means "the default of the deploy mode" (0.90 alone, 0.70 chat / 0.20 tool together).
    gpu_memory_utilization: float = 0.0
    max_model_len: int = 5760
    max_num_seqs: int = 64
    # Prompt tokens the engine's scheduler takes in one step (vLLM's max_num_batched_tokens);
    # 0 = vLLM's default for an engine built from Python, 2048. `vllm serve` takes 8192 on
    # GPUs of 70 GiB or more (A100 aside). It counts where many prompts are not in the
    # prefix cache at once (a burst of new calls: 8 prompts of 2,000 tokens are eight steps
    # at 2048, two at 8192), not for turns whose persona and history are cached
    # (docs/bench/README.md, run ad). Not yet measured in yapd.
    max_num_batched_tokens: int = 0
    enforce_eager: bool = False
    enable_prefix_caching: bool = True
    enable_chunked_prefill: bool = True
    tensor_parallel_size: int = 1
    data_parallel_size: int = 1
    load_format: str = "auto"
    # A pre-quantized AWQ repo used instead of ``model`` when quantization is "awq".
    awq_model: str = ""
    # CPU engine only: generations computed at once.
    cpu_workers: int = 4
    # How this engine's EngineCore starts; "" = engines.start_method. The tool engine's
    # default is "spawn" (Config.tool): forked, its core took 20-84 minor faults a turn
    # (a heap mapped afresh for buffers freed each step, see core_steady_heap) and 27.2 ms
    # from queue to first token at 8 sessions on an H100, spawned 0.5-1.1 and 16.4 ms, and
    # TTFT p50 was 1.5 / 1.6 / 12.7 ms sooner at 1 / 8 / 16 sessions (docs/bench/README.md,
    # run aj; on H200s, run aa: 14.5-21.1 ms forked, 11.8-14.5 spawned). The cost is the
    # tool's start: restarts to READY 36.7-41.1 s against 20.1 forked (runs aj, ak).
    start_method: RoleStartMethod = ""
    # This engine's front end (vLLM's AsyncLLM: request intake, output processing,
    # detokenizing) in an engine host, a process of its own (yapd/engines/host.py), instead
    # of on yapd's event loop beside the other engine's. Each delta then crosses a
    # socketpair. On an H200 raw vLLM with the tool's front end apart answered 16 sessions
    # 14 ms sooner at p50 and 22-33 ms at p95, 8 sessions 11-17 ms sooner, one alike
    # (docs/bench/README.md, run ac); yapd with both hosted, 4 ms sooner at 16 and 2 ms
    # later at 8 in one start each (run ad): off until more starts agree.
    own_process: bool = False
    extra_engine_args: dict[str, Any] = field(default_factory=dict)


@dataclass
class EnginesConfig:
    deploy: DeployMode = "both"
    # Hugging Face, compile and AWQ caches; "" means $CACHE_DIRECTORY or ~/.cache/yapd.
    cache_dir: str = ""
    # Where the engines' packages (torch, transformers, vLLM) have no bytecode this
    # process may load or write (an image with PYTHONDONTWRITEBYTECODE=1 and packages
    # installed --no-compile, a read-only install), write it under <cache_dir>/pycache
    # (sys.pycache_prefix) so that only the first start compiles them from source. On a
    # lent H100 whose image is such, a process restart took 49.8 s to READY importing them
    # from source (run aw); on another, with them byte-compiled, 33.8 s (run av,
    # docs/bench/README.md).
    bytecode_cache: bool = True
    # Where FlashInfer's sampling kernels are not built under the cache dir (a first
    # start), build them in a process of their own while the engines load, not in the
    # first engine's sampler warm-up at the end of its start: a cold start on an H100 waited
    # 109-114 s there (yapd/engines/samplerjit.py; docs/bench/README.md, run ay).
    sampler_prebuild: bool = True
    start_in_parallel: bool = True
    # How vLLM starts its EngineCore processes. "fork": ready sooner (no second import of
    # torch and vLLM; yapd's sockets are dropped in the child): warm starts 28.8-36.8 s on
    # H200s where spawned ones took 46.1-53.3 (runs r, w-z, docs/bench/README.md). "spawn":
    # a fresh interpreter, as `vllm serve` starts its own. One session's TTFT p50 was
    # 19.2-23.8 ms spawned and 20.7-23.1 forked: no call of a step is slower after a fork
    # (run z's probe), so fork stays. An engine's own start_method wins: the tool's is
    # "spawn" by default (its core answers sooner spawned: EngineConfig.start_method).
    start_method: StartMethod = "fork"
    # A forked EngineCore's own start (model load, compile, CUDA graphs) with automatic
    # garbage collection off until vLLM freezes its heap at the end of it (yapd/gcpause.py).
    # Off: on an H200 (run aa, docs/bench/README.md) it changed no EngineCore's start (init
    # 10.74 / 7.46 s with it, 10.86 / 6.67 without; restarts to READY 28.1 against 24.8 s),
    # though a synthetic start building 2.4M objects took 0.15 s with collection off
    # against 0.75 s on, on this project's CPU machine: vLLM's start is not made of those.
    hold_gc_in_core_start: bool = False
    # Each EngineCore's GIL switch interval (sys.setswitchinterval), in ms; 0 leaves
    # Python's 5 ms. A forked core gets it at its fork, a spawned one through yapd's vLLM
    # plugin (yapd/vllm_plugin.py, the installed package's entry point). An EngineCore
    # sends a step's outputs from a thread of its own while its main thread goes on to
    # schedule and launch the next step in Python: the sender waits for the GIL until
    # that thread blocks on the GPU or the switch interval forces a hand-over. On H200s a
    # first token reached yapd 1.1-2.8 ms after its core stamped it at one session and
    # 3.8-17.2 ms at 16 (docs/bench/README.md, "The cores' GIL"); each hand-over waits at
    # most the interval, so 0.5 ms can take at most ~4.5 ms off each. On an H200 (run ab)
    # 0.5 ms, with fork_from_main_thread, left that way out as it was (1.7-2.0 ms at one
    # session, ~12 at 16) and TTFT too: off.
    core_switch_interval_ms: float = 0.0
    # A forked EngineCore's malloc set to keep its heap (glibc: mmap threshold 32 MB, top
    # pad 8 MB; yapd/forking.py _steady_heap). yapd forks its cores from worker threads,
    # whose malloc arena maps and unmaps a 64 MB heap for a buffer of a MB or so allocated
    # and freed each step, a page fault per page each time: yapd's forked tool core took
    # ~230 minor faults a turn on H200s, spawned cores and raw's forked from its main
    # thread 1-13 (runs w-aa); reproduced here, none with it on (docs/bench/README.md,
    # "A forked core's heap"). Not measured on the GPU yet (run ab's device refused it,
    # its python3's malloc taken for another one's by a check since fixed).
    core_steady_heap: bool = False
    # Forked EngineCores forked by yapd's main thread (its event loop's) rather than the
    # worker thread running vLLM's start (yapd/forking.py forks_on). The forking thread is
    # the core's one thread and its malloc arena the core's: from the main thread, glibc's
    # main arena, as in a spawned core or one raw vLLM forks from its main thread (13
    # minor faults a turn on an H200, run w, against ~230 in yapd's forked tool core;
    # tool core queued -> first token 13.85 ms there, yapd's forked 14.5-21.1, spawned
    # 11.8-14.5: docs/bench/README.md). In yapctl.heapprobe's scenarios on a CPU it ended
    # a churning child's faults in some and not in others (which way avoids them depends
    # on the parent's allocation history: docs/bench/README.md, "Forked by the main
    # thread"). On an H200 (run ab) it took the tool core from 87-89 faults a turn to
    # 58-60 with no change in its first token or the TTFT: off.
    fork_from_main_thread: bool = False
    # CUDA MPS (yapd/mps.py): "auto" runs a private MPS daemon while two vLLM engines
    # share one GPU (they then run at once instead of taking turns: lower TTFT under
    # load, a slower decode step); "on" also for one engine or several GPUs, and a start
    # fails without it; "off" never.
    mps: MpsMode = "auto"
    # Under MPS: "equal" leaves both engines at normal priority; "tool" runs the chat
    # engine's kernels at MPS's below-normal client priority, so the tool engine's (whose
    # decision every reply waits for) go first. Measured on one H200 minutes apart
    # (docs/bench/README.md, run n): "equal" answers one session 3.7 ms sooner (TTFT p50
    # 24.77 -> 21.09, decision 21.76 -> 18.63); "tool" was 2.5 / 5.4 ms ahead at 8 / 16
    # sessions and 24.5 ms behind at 24.
    mps_priority: MpsPriority = "equal"
    # The prompt tokens (its last ones) each vLLM request's detokenizer starts from
    # (yapd/engines/firsttext.py); 0 = the whole prompt, as vLLM does. vLLM decodes a
    # request's whole prompt again to give its first token's text, on yapd's event loop:
    # a step of 16 sessions' first tokens (2,632-token prompts) took 7.0-7.4 ms there
    # against 0.15 ms from the last 16, whose window adding the 16 requests took 0.1 ms
    # more (yapctl.firsttextbench, this project's CPU machine); the same text, but where
    # the prompt's own text ends in U+FFFD (vLLM then streams the whole prompt back).
    detokenizer_context: int = 16


@dataclass
class TurnConfig:
    concurrent: bool = False
    # Concurrent mode, the order a turn's two requests leave in. "chats_then_tools": the
    # chat's at once, the tool's a loop round later, so turns that start together send all
    # their chat requests before any tool request (as raw vLLM's benchmark turns do).
    # "tool_first": the tool's, then the chat's. "chat_first": the chat's, then the tool's.
    # Measured on H200s, the two orders taking turns round by round on the same sessions
    # (docs/bench/README.md, runs o and p): one session alike (TTFT p50 19.5 / 19.51 and
    # 19.8 / 20.26 ms); TTFT p95 at 16 sessions 89.87 -> 80.81 and 103.33 -> 97.32, at 24
    # (run p) 120.03 -> 112.79; at 8 one run each way (62.3 -> 55.48, 56.92 -> 78.23).
    request_order: RequestOrder = "chats_then_tools"
    # A vLLM engine's requests of turns that start in one event-loop pass leave back to
    # back at the pass's end instead of one per turn start (yapd.engines.together), meant
    # for an idle EngineCore to find a whole burst in its queue. Measured on one H100,
    # on and off taking turns round by round (docs/bench/README.md, runs ah and ai): TTFT
    # p50 at 16 sessions 4.75 ms behind in one run, 9.7 ahead in the next; the chat
    # engine took each burst in two steps either way (its core splits a burst however it
    # arrives). Off.
    send_together: bool = False
    stream_flush_ms: float = 0.0
    chat_max_out: int = 200
    history_max_tokens: int = 3000
    # History is cut in steps of this many tokens so the prompt prefix stays identical
    # for several turns once the cap is reached (a cut every turn defeats prefix caching).
    history_trim_step: int = 256
    user_utt_max_tokens: int = 350
    exact_token_trim: bool = True
    temperature: float = 0.8
    top_p: float = 0.95
    top_k: int = 0
    repetition_penalty: float = 1.0
    # Apply the seed sent in the ack to sampling (vLLM's per-request generators cost throughput).
    seeded_sampling: bool = False
    # Benchmarks with random weights: always generate chat_max_out tokens.
    ignore_eos: bool = False
    tool_timeout_s: float = 10.0
    tool_max_tokens: int = 96
    tool_history_tokens: int = 256
    default_persona_style: str = "wholesome"
    default_gender: str = "woman"
    default_user_identity: str = ""


@dataclass
class ToolSpec:
    name: str
    description: str
    parameters: dict[str, Any] = field(default_factory=dict)


@dataclass
class AdminConfig:
    enabled: bool = True
    # "" means $RUNTIME_DIRECTORY/admin.sock, else /run/yapd/admin.sock when writable,
    # else $XDG_RUNTIME_DIR/yapd/admin.sock.
    socket: str = ""
    mode: int = 0o660
    # Unix group allowed besides root and the daemon's own uid ("" = the daemon's group).
    group: str = ""


@dataclass
class LoggingConfig:
    level: str = "info"
    file: str = ""
    file_max_bytes: int = 100 * 1024 * 1024
    file_backups: int = 3
    ring_lines: int = 5000
    # "auto": no timestamps when stderr is journald (JOURNAL_STREAM set).
    timestamps: Literal["auto", "on", "off"] = "auto"


@dataclass
class AwqConfig:
    # llmcompressor's AWQ only: AutoAWQ is archived and untested on this stack (docs/awq.md).
    method: Literal["llmcompressor"] = "llmcompressor"
    group_size: int = 128
    bits: int = 4
    calibration_file: str = ""
    calibration_samples: int = 128
    calibration_max_len: int = 512
    push: bool = False
    hf_token: str = ""
    chat_repo: str = ""
    tool_repo: str = ""
    branch: str = "main"
    private: bool = True
    allow_create: bool = False
    commit_message_chat: str = "yapd: AWQ W4A16 chat model"
    commit_message_tool: str = "yapd: AWQ W4A16 tool model"
    hub_endpoint: str = ""
    # The interpreter that runs the job: "" = yapd's own; a separate venv where the
    # quantization library's pins clash with vLLM's.
    python: str = ""
    # "auto": the GPU when the job sees one, else the CPU; "cpu"; "cuda:N".
    device: str = "auto"


DEFAULT_TOOLS = [
    ToolSpec(
        name="take_screenshot",
        description="The user wants to show you something visual right now: look at their screen or camera.",
        parameters={},
    )
]


@dataclass
class Config:
    server: ServerConfig = field(default_factory=ServerConfig)
    engines: EnginesConfig = field(default_factory=EnginesConfig)
    chat: EngineConfig = field(default_factory=lambda: EngineConfig(model=DEFAULT_CHAT_MODEL))
    tool: EngineConfig = field(default_factory=lambda: EngineConfig(model=DEFAULT_TOOL_MODEL, start_method="spawn"))
    turn: TurnConfig = field(default_factory=TurnConfig)
    personas: dict[str, str] = field(default_factory=dict)
    tools: list[ToolSpec] = field(default_factory=lambda: list(DEFAULT_TOOLS))
    admin: AdminConfig = field(default_factory=AdminConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    awq: AwqConfig = field(default_factory=AwqConfig)
    demo: bool = False
    source: str = "<defaults>"

    # Derived values: defaults that depend on the deploy mode.

    @property
    def max_connections(self) -> int:
        return self.server.max_connections or DEFAULT_MAX_CONNECTIONS[self.engines.deploy]

    def gpu_fraction(self, role: Literal["chat", "tool"]) -> float:
        frac = getattr(self, role).gpu_memory_utilization
        if frac:
            return float(frac)
        if self.engines.deploy == "both":
            return 0.70 if role == "chat" else 0.20
        return 0.90

    def deployed(self, role: str) -> bool:
        return self.engines.deploy in ("both", role)

    def start_method(self, role: str) -> StartMethod:
        """How ``role``'s EngineCore starts: its own section's choice, else engines'."""
        own: RoleStartMethod = getattr(self, role).start_method
        return own or self.engines.start_method

    def admin_socket_path(self) -> Path:
        """The admin socket's path (yapd's private MPS folder is named after it)."""
        return Path(self.admin.socket) if self.admin.socket else default_admin_socket()

    def cache_dir(self) -> Path:
        if self.engines.cache_dir:
            return Path(self.engines.cache_dir).expanduser()
        env = os.environ.get("CACHE_DIRECTORY")  # set by systemd's CacheDirectory=
        if env:
            return Path(env.split(":")[0])
        return Path.home() / ".cache" / "yapd"


# Sections whose changes need new engines; everything else applies live.
ENGINE_SECTIONS = ("engines", "chat", "tool", "awq")
# Keys that need the listening socket or admin socket recreated: a daemon restart.
# engines.cache_dir, engines.bytecode_cache: the caches' environment (HF_HOME, VLLM_CACHE_ROOT,
# PYTHONPYCACHEPREFIX...) is set once, at start.
RESTART_KEYS = ("server.host", "server.port", "server.event_loop", "server.write_buffer_bytes", "admin.socket",
                "admin.enabled", "logging.file", "engines.cache_dir", "engines.bytecode_cache")


def keep_restart_keys(new: Config, running: Config, sections: Collection[str] | None = None) -> None:
    """``new``'s RESTART_KEYS (those of ``sections``, or all) set as ``running`` has them:
    a reload or an engine restart cannot apply them."""
    for key in RESTART_KEYS:
        section, _, name = key.partition(".")
        if sections is None or section in sections:
            setattr(getattr(new, section), name, getattr(getattr(running, section), name))


# --- loading ----------------------------------------------------------------------


def origin_of(text: str) -> str | None:
    """``text`` as an origin, lower case (an Origin header's scheme and host are not case
    sensitive); None where it is not one (a path, a query, no host)."""
    try:
        parts = urlsplit(text.strip())
        parts.port  # noqa: B018 -- raises on a port that is no number
    except ValueError:
        return None
    if parts.scheme.lower() not in ("http", "https") or not parts.netloc or parts.path or parts.query \
            or parts.fragment or "@" in parts.netloc:
        return None
    return f"{parts.scheme}://{parts.netloc}".lower()


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check ``value`` against the annotation ``tp``; ints are accepted for floats."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin is Literal:
        if value not in args:
            allowed = ", ".join(repr(a) for a in args)
            raise ConfigError(f"{where}: {value!r} is not one of {allowed}")
        return value
    if origin in (Union, types.UnionType):
        errors = []
        for alt in args:
            try:
                return _coerce(value, alt, where)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[-1])
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {type(value).__name__}")
        return [_coerce(v, args[0], f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a table, got {type(value).__name__}")
        return {str(k): _coerce(v, args[1], f"{where}.{k}") for k, v in value.items()}
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {type(value).__name__}")
        try:
            number = float(value)
        except OverflowError:  # an integer past float's range
            number = math.inf
        # TOML has nan and inf; no setting here means anything by them (a NaN timeout
        # passes every "> 0" check and then never fires).
        if not math.isfinite(number):
            raise ConfigError(f"{where}: expected a finite number, got {str(value)[:24]}")
        return number
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {type(value).__name__}")
        # TOML's integers are 64-bit; Python's parser takes any. A 400-digit rate limit
        # loaded, then failed every connection (OverflowError where it met a float).
        if not -(2**63) <= value < 2**63:
            raise ConfigError(f"{where}: expected a 64-bit integer, got {str(value)[:24]}...")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {type(value).__name__}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {type(value).__name__}")
        return value
    raise ConfigError(f"{where}: unsupported type {_type_name(tp)}")  # pragma: no cover


def _fill(obj: Any, table: Mapping[str, Any], where: str) -> None:
    hints = typing.get_type_hints(type(obj))
    names = {f.name for f in dataclasses.fields(obj)}
    for key, value in table.items():
        if key not in names:
            known = ", ".join(sorted(names))
            raise ConfigError(f"{where}.{key}: unknown key (known keys: {known})")
        setattr(obj, key, _coerce(value, hints[key], f"{where}.{key}"))


def _tools_from(value: Any, where: str) -> list[ToolSpec]:
    if not isinstance(value, list):
        raise ConfigError(f"{where}: expected an array of tables ([[tools]])")
    tools = []
    for i, item in enumerate(value):
        if not isinstance(item, dict):
            raise ConfigError(f"{where}[{i}]: expected a table")
        spec = ToolSpec(name="", description="")
        _fill(spec, item, f"{where}[{i}]")
        if not spec.name:
            raise ConfigError(f"{where}[{i}].name: a tool needs a name")
        tools.append(spec)
    return tools


def from_mapping(data: Mapping[str, Any], source: str) -> Config:
    cfg = Config(source=source)
    for key, value in data.items():
        where = f"{source}: {key}"
        if key == "tools":
            cfg.tools = _tools_from(value, where)
        elif key == "personas":
            cfg.personas = _coerce(value, dict[str, str], where)
        elif key == "demo":
            cfg.demo = _coerce(value, bool, where)
        elif key in ("server", "engines", "chat", "tool", "turn", "admin", "logging", "awq"):
            if not isinstance(value, dict):
                raise ConfigError(f"{where}: expected a table [{key}]")
            _fill(getattr(cfg, key), value, where)
        else:
            raise ConfigError(
                f"{where}: unknown section or key (known: server, engines, chat, tool, turn, "
                "personas, tools, admin, logging, awq, demo)"
            )
    return cfg


def _bool_env(text: str) -> bool:
    low = text.strip().lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"{text!r} is not a boolean (use 1/0, true/false)")


def _list_env(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


# The original server's environment variables, and where each lands.
ENV_OVERRIDES: dict[str, tuple[tuple[str, str], ...]] = {
    "YAP_API_KEY": (("server", "api_keys"),),
    "YAP_API_KEYS": (("server", "api_keys"),),
    "YAP_HOST": (("server", "host"),),
    "YAP_PORT": (("server", "port"),),
    "MAX_CONCURRENT_CONNECTIONS": (("server", "max_connections"),),
    "DEPLOY_MODELS": (("engines", "deploy"),),
    "YAP_CACHE_DIR": (("engines", "cache_dir"),),
    "YAP_ENGINE_START_METHOD": (("engines", "start_method"),),
    "YAP_ENGINE_MPS": (("engines", "mps"),),
    "YAP_ENGINE_MPS_PRIORITY": (("engines", "mps_priority"),),
    "CHAT_MODEL": (("chat", "model"),),
    "TOOL_MODEL": (("tool", "model"),),
    "CHAT_GPU_FRAC": (("chat", "gpu_memory_utilization"),),
    "TOOL_GPU_FRAC": (("tool", "gpu_memory_utilization"),),
    "QUANTIZATION": (("chat", "quantization"),),
    "KV_DTYPE": (("chat", "kv_cache_dtype"), ("tool", "kv_cache_dtype")),
    "CHAT_MAX_LEN": (("chat", "max_model_len"),),
    "CHAT_TENSOR_PARALLEL_SIZE": (("chat", "tensor_parallel_size"),),
    "CHAT_OWN_PROCESS": (("chat", "own_process"),),
    "TOOL_OWN_PROCESS": (("tool", "own_process"),),
    "AWQ_CHAT_MODEL": (("chat", "awq_model"),),
    "AWQ_TOOL_MODEL": (("tool", "awq_model"),),
    "CONCURRENT_MODEL_CALL": (("turn", "concurrent"),),
    "YAP_TURN_REQUEST_ORDER": (("turn", "request_order"),),
    "STREAM_FLUSH_MS": (("turn", "stream_flush_ms"),),
    "CHAT_MAX_OUT": (("turn", "chat_max_out"),),
    "HISTORY_MAX_TOKENS": (("turn", "history_max_tokens"),),
    "USER_UTT_MAX_TOKENS": (("turn", "user_utt_max_tokens"),),
    "EXACT_TOKEN_TRIM": (("turn", "exact_token_trim"),),
    "TOOL_TIMEOUT_S": (("turn", "tool_timeout_s"),),
    "YAP_LOG_LEVEL": (("logging", "level"),),
    "YAP_ADMIN_SOCKET": (("admin", "socket"),),
    "HF_AWQ_PUSH": (("awq", "push"),),
    "HF_TOKEN": (("awq", "hf_token"),),
    "HF_AWQ_CHAT_REPO": (("awq", "chat_repo"),),
    "HF_AWQ_TOOL_REPO": (("awq", "tool_repo"),),
    "HF_AWQ_BRANCH": (("awq", "branch"),),
    "HF_AWQ_PRIVATE": (("awq", "private"),),
    "HF_AWQ_ALLOW_CREATE": (("awq", "allow_create"),),
    "HF_AWQ_COMMIT_MSG_CHAT": (("awq", "commit_message_chat"),),
    "HF_AWQ_COMMIT_MSG_TOOL": (("awq", "commit_message_tool"),),
    "HF_ENDPOINT": (("awq", "hub_endpoint"),),
}


def _parse_env(name: str, text: str, tp: Any) -> Any:
    origin = typing.get_origin(tp)
    try:
        if origin is list:
            return _list_env(text)
        if tp is bool:
            return _bool_env(text)
        if tp is int:
            return int(text)
        if tp is float:
            return float(text)
        return text
    except ValueError as exc:
        raise ConfigError(f"environment {name}: {exc}") from None


def apply_env(cfg: Config, env: Mapping[str, str]) -> dict[str, str]:
    """The variables of ENV_OVERRIDES that ``env`` sets, on ``cfg``; returns where each key
    set came from ("environment NAME"), for an error to name it."""
    origins = {}
    for name, targets in ENV_OVERRIDES.items():
        if name not in env:
            continue
        for section, key in targets:
            obj = getattr(cfg, section)
            tp = typing.get_type_hints(type(obj))[key]
            value = _parse_env(name, env[name], tp)
            setattr(obj, key, _coerce(value, tp, f"environment {name} ({section}.{key})"))
            origins[f"{section}.{key}"] = f"environment {name}"
        # QUANTIZATION=awq means the original's "awq" mode: both engines 4-bit.
        if name == "QUANTIZATION" and env[name] == "awq":
            cfg.tool.quantization = "awq"
            origins["tool.quantization"] = f"environment {name}"
    return origins


def check_prompt_room(cfg: Config, running: str = "") -> None:
    """A prompt holds the utterance (up to its cap) and leaves room for the reply: settings
    that cannot fit would load and then fail every turn at the engine. ``running``: said of
    engines whose max_model_len is the one they run with (a reload's engine keys wait)."""
    t = cfg.turn
    fits = {"chat": ("chat_max_out", "user_utt_max_tokens"),
            "tool": ("tool_max_tokens", "user_utt_max_tokens", "tool_history_tokens")}
    for role, keys in fits.items():
        need, room = sum(getattr(t, k) for k in keys), getattr(cfg, role).max_model_len
        if cfg.deployed(role) and need >= room:
            key, parts = keys[0], " + ".join(f"turn.{k}" for k in keys)
            raise ConfigError(f"{cfg.source or '<config>'}: turn.{key}: {parts} = {need} leaves no room for a prompt "
                              f"in {running}{role}.max_model_len ({room})")


def validate(cfg: Config) -> None:
    """Cross-field checks; raises ConfigError naming the key."""
    src = cfg.source
    s = cfg.server
    if not 0 <= s.port <= 65535:
        raise ConfigError(f"{src}: server.port: {s.port} is not a TCP port (0-65535)")
    if not s.api_keys or any(not k for k in s.api_keys):
        raise ConfigError(f"{src}: server.api_keys: at least one non-empty key is required")
    for key in ("max_connections", "max_connections_per_key"):
        if getattr(s, key) < 0:
            raise ConfigError(f"{src}: server.{key}: must be >= 0 (0 = default)")
    if s.max_frame_bytes < 1024:
        raise ConfigError(f"{src}: server.max_frame_bytes: must be at least 1024")
    if s.event_loop not in ("auto", "asyncio", "uvloop"):
        raise ConfigError(f"{src}: server.event_loop must be auto, asyncio or uvloop, got {s.event_loop!r}")
    for key in ("idle_timeout_s", "rate_limit_per_s", "send_timeout_s", "drain_timeout_s"):
        if getattr(s, key) <= 0:
            raise ConfigError(f"{src}: server.{key}: must be > 0")
    if s.rate_limit_burst < 1:
        raise ConfigError(f"{src}: server.rate_limit_burst: must be >= 1")
    if s.write_buffer_bytes < 4096:
        raise ConfigError(f"{src}: server.write_buffer_bytes: must be at least 4096")
    for i, origin in enumerate(s.allowed_origins):
        if origin_of(origin) != origin.lower():
            # A browser sends "https://app.example": "https://app.example/" locked every one out.
            raise ConfigError(f"{src}: server.allowed_origins[{i}]: {origin!r} is not an origin: "
                              "scheme://host[:port], no path (what a browser sends as its Origin header)")
    for role in ("chat", "tool"):
        e: EngineConfig = getattr(cfg, role)
        if cfg.deployed(role) and not e.model and not cfg.demo:
            raise ConfigError(f"{src}: {role}.model: required when deploy is {cfg.engines.deploy!r}")
        if not 0 <= e.gpu_memory_utilization < 1:
            raise ConfigError(f"{src}: {role}.gpu_memory_utilization: must be in (0, 1), got "
                              f"{e.gpu_memory_utilization}")
        if e.max_model_len < 256:
            raise ConfigError(f"{src}: {role}.max_model_len: must be at least 256")
        for key in ("tensor_parallel_size", "data_parallel_size", "max_num_seqs", "cpu_workers"):
            if getattr(e, key) < 1:
                raise ConfigError(f"{src}: {role}.{key}: must be >= 1")
        if e.max_num_batched_tokens < 0:
            raise ConfigError(f"{src}: {role}.max_num_batched_tokens: must be >= 0 (0: vLLM's default)")
        if e.max_num_batched_tokens and not e.enable_chunked_prefill and e.max_num_batched_tokens < e.max_model_len:
            # vLLM refuses it at the engine's start, minutes later: say so at load and reload
            raise ConfigError(f"{src}: {role}.max_num_batched_tokens: {e.max_num_batched_tokens} is below "
                              f"max_model_len ({e.max_model_len}) with enable_chunked_prefill = false: a prompt "
                              "could never be scheduled")
    from yapd.vllm_plugin import MAX_INTERVAL_MS, MIN_INTERVAL_MS

    interval = cfg.engines.core_switch_interval_ms
    if interval and not MIN_INTERVAL_MS <= interval <= MAX_INTERVAL_MS:
        raise ConfigError(f"{src}: engines.core_switch_interval_ms: must be 0 (Python's own) or in "
                          f"[{MIN_INTERVAL_MS:g}, {MAX_INTERVAL_MS:g}], got {interval}")
    if cfg.engines.detokenizer_context < 0:
        raise ConfigError(f"{src}: engines.detokenizer_context: must be >= 0 (0: the whole prompt)")
    if cfg.engines.deploy == "both":
        total = cfg.gpu_fraction("chat") + cfg.gpu_fraction("tool")
        if total > 0.98:
            raise ConfigError(f"{src}: chat + tool gpu_memory_utilization = {total:.2f} leaves no room (> 0.98)")
    t = cfg.turn
    for key in ("chat_max_out", "history_trim_step", "user_utt_max_tokens", "tool_max_tokens"):
        if getattr(t, key) < 1:
            raise ConfigError(f"{src}: turn.{key}: must be >= 1")
    for key in ("history_max_tokens", "tool_history_tokens"):
        if getattr(t, key) < 0:
            raise ConfigError(f"{src}: turn.{key}: must be >= 0")
    check_prompt_room(cfg)
    if t.stream_flush_ms < 0 or t.tool_timeout_s <= 0:
        raise ConfigError(f"{src}: turn.stream_flush_ms must be >= 0 and turn.tool_timeout_s > 0")
    if not 0 <= t.temperature <= 2 or not 0 < t.top_p <= 1:
        raise ConfigError(f"{src}: turn.temperature must be in [0, 2] and turn.top_p in (0, 1]")
    from yapd.prompts import GENDERS, persona_styles, style_key

    if t.default_gender not in GENDERS:
        raise ConfigError(f"{src}: turn.default_gender: {t.default_gender!r} is not one of {sorted(GENDERS)}")
    styles = persona_styles(cfg.personas)
    if style_key(t.default_persona_style) not in styles:
        raise ConfigError(
            f"{src}: turn.default_persona_style: {t.default_persona_style!r} is not a style "
            f"(known: {', '.join(sorted(styles))})"
        )
    names = [tool.name for tool in cfg.tools]
    if len(set(names)) != len(names):
        raise ConfigError(f"{src}: tools: duplicate tool names in {names}")
    if t.repetition_penalty <= 0:
        raise ConfigError(f"{src}: turn.repetition_penalty: must be > 0")
    if not 0 <= cfg.admin.mode <= 0o777:
        raise ConfigError(f"{src}: admin.mode: {cfg.admin.mode} is not a file mode (0 to 0o777)")
    lg = cfg.logging
    if lg.ring_lines < 1 or lg.file_max_bytes < 0 or lg.file_backups < 0:
        raise ConfigError(f"{src}: logging: ring_lines must be >= 1, file_max_bytes and file_backups >= 0")
    if cfg.logging.level.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
        raise ConfigError(f"{src}: logging.level: {cfg.logging.level!r} is not a log level")
    if cfg.awq.bits != 4 or cfg.awq.group_size not in (32, 64, 128):
        raise ConfigError(f"{src}: awq: only bits = 4 with group_size 32, 64 or 128 are supported")
    if cfg.awq.calibration_samples < 1 or cfg.awq.calibration_max_len < 16:
        raise ConfigError(f"{src}: awq: calibration_samples must be >= 1 and calibration_max_len >= 16")
    dev = cfg.awq.device
    if dev not in ("auto", "cpu", "cuda") and not (dev.startswith("cuda:") and dev[5:].isdigit()):
        raise ConfigError(f"{src}: awq.device: {dev!r} is not auto, cpu, cuda or cuda:N")


def load(
    path: str | os.PathLike[str] | None,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Config:
    """Read ``path`` (None: defaults only), apply ``env`` and dotted ``overrides``, validate."""
    env = os.environ if env is None else env
    if path is None:
        cfg = Config()
    else:
        p = Path(path)
        try:
            data = tomllib.loads(p.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"{p}: no such file") from None
        except PermissionError:
            raise ConfigError(f"{p}: permission denied") from None
        except IsADirectoryError:
            raise ConfigError(f"{p}: is a directory, not a config file") from None
        except OSError as exc:
            raise ConfigError(f"{p}: cannot read: {exc.strerror or exc}") from None
        except RecursionError:  # arrays or tables nested thousands deep
            raise ConfigError(f"{p}: invalid TOML: nested too deeply") from None
        except UnicodeDecodeError as exc:
            raise ConfigError(f"{p}: not UTF-8 text ({exc.reason})") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{p}: invalid TOML: {exc}") from None
        except ValueError as exc:  # e.g. an integer of over 4300 digits, which Python refuses
            raise ConfigError(f"{p}: invalid TOML: {str(exc)[:200]}") from None
        cfg = from_mapping(data, str(p))
    origins = apply_env(cfg, env)
    for dotted, value in (overrides or {}).items():
        if value is None:
            continue
        section, _, key = dotted.partition(".")
        if not key:
            setattr(cfg, section, value)
            continue
        obj = getattr(cfg, section)
        tp = typing.get_type_hints(type(obj))[key]
        setattr(obj, key, _coerce(value, tp, f"command line ({dotted})"))
        origins[dotted] = "command line"
    try:
        validate(cfg)
    except ConfigError as exc:
        raise _from_where_it_came(exc, cfg.source, origins) from None
    return cfg


def _from_where_it_came(exc: ConfigError, source: str, origins: Mapping[str, str]) -> ConfigError:
    """A check's error names the file; where the key it names came from the environment
    or the command line, that instead (the file may hold another value, or none)."""
    text = str(exc)
    head = f"{source}: "
    named = re.match(r"[a-z_]+\.[a-z_]+", text[len(head):]) if text.startswith(head) else None
    key = named.group() if named else ""
    return ConfigError(f"{origins[key]}: {text[len(head):]}") if key in origins else exc


def diff_keys(old: Config, new: Config) -> tuple[list[str], list[str], list[str]]:
    """Changed keys split into (live, engine, restart): what a reload can apply now,
    what needs an engine restart, and what needs the daemon restarted."""
    live: list[str] = []
    engine: list[str] = []
    restart: list[str] = []
    for section in ("server", "engines", "chat", "tool", "turn", "admin", "logging", "awq"):
        a, b = getattr(old, section), getattr(new, section)
        for f in dataclasses.fields(a):
            if getattr(a, f.name) == getattr(b, f.name):
                continue
            dotted = f"{section}.{f.name}"
            if dotted in RESTART_KEYS:
                restart.append(dotted)
            elif section in ENGINE_SECTIONS:
                engine.append(dotted)
            else:
                live.append(dotted)
    if old.personas != new.personas:
        live.append("personas")
    if old.tools != new.tools:
        live.append("tools")
    return live, engine, restart
