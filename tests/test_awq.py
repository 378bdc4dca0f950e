"""AWQ W4A16 on the CPU: real llmcompressor runs on the tiny random-weight Qwen2 demo
model (hidden 64, 2 layers, 8 calibration samples of at most 64 tokens), the cache's
atomic commit, a real demo yapd that quantizes on first start and reuses the result,
``yapctl awq rebuild`` with its progress, and the Hub push through the real
huggingface_hub client against a local stand-in (tests/hub_standin.py)."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import run_turn, ws_connect
from tests.hub_standin import HubStandIn
from tests.test_daemon import NotifySocket
from yapd import awq, config
from yapd.awq import calibration
from yapd.awq.jobs import job_command
from yapd.engines.base import EngineError

pytest.importorskip("llmcompressor", reason="the awq extra (llmcompressor) is not installed")

ROOT = Path(__file__).resolve().parent.parent
TINY = ["--role", "tool", "--group-size", "32", "--samples", "8", "--max-len", "64"]
TINY_TOML = """
[engines]
deploy = "tool"

[tool]
quantization = "awq"

[awq]
group_size = 32
calibration_samples = 8
calibration_max_len = 64
"""
TOKEN = "hf_" + "Secret0Token1For2Tests3" * 2


def job_cmd(model: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "yapd.awq.job", "--model", str(model), *TINY, *args]


def run_job(model: Path, *args: str, env: dict[str, str] | None = None) -> tuple[int, list[dict[str, Any]], str]:
    r = subprocess.run(job_cmd(model, *args), capture_output=True, text=True, timeout=180, cwd=ROOT,
                       env={**os.environ, **(env or {})})
    return r.returncode, [json.loads(line) for line in r.stdout.splitlines()], r.stderr


@pytest.fixture(scope="module")
def demo_tool(cache_dir: Path) -> Path:
    return cache_dir / "demo" / "tool"


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory, demo_tool: Path) -> tuple[Path, list[dict[str, Any]]]:
    """One real quantization of the demo Qwen2 model, shared by the checks below."""
    out = tmp_path_factory.mktemp("awq-built") / "awq" / "tool"
    t0 = time.monotonic()
    rc, events, err = run_job(demo_tool, "--out", str(out))
    assert rc == 0, err[-4000:]
    print(f"quantized in {time.monotonic() - t0:.1f}s")
    return out, events


def daemon_cache(tmp_path: Path, cache_dir: Path) -> Path:
    """A cache directory of its own (no AWQ entry yet) that shares the built demo models."""
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "demo").symlink_to(cache_dir / "demo")
    return cache


# --- calibration -------------------------------------------------------------------------


def test_builtin_calibration_renders_like_the_daemon_prompts(demo_tool):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(demo_tool)
    chat = calibration.builtin_samples("chat", tok, 400)
    tool = calibration.builtin_samples("tool", tok, 400)
    assert len(chat) == 352 and len(tool) == 116  # every distinct sample the set can render
    assert calibration.builtin_samples("chat", tok, 5) == chat[:5]  # deterministic
    first = chat[0].text
    assert first.startswith("<|im_start|>system\nYou are a woman talking with the user.") and chat[0].templated
    assert "<|im_start|>user\nHey, how's it going?" in first and "speaking out loud" in first
    assert len({s.text for s in chat}) == len(chat)
    assert all("[BEGIN OF AVAILABLE TOOLS]" in s.text and "take_screenshot" in s.text for s in tool)
    calls = [s for s in tool if s.text.rstrip().endswith('[{"name": "take_screenshot", "arguments": {}}]<|im_end|>')]
    assert len(calls) == 8  # the dialogues that ask to look at something
    ids = calibration.tokenize(chat[:3], tok, 16)
    assert [len(x) for x in ids] == [16, 16, 16]
    full = calibration.load("chat", tok, 4)
    assert full.source == "builtin:yapd-conversations-v1" and len(full.sha256) == 64 and len(full.samples) == 4


def test_user_calibration_file(tmp_path, demo_tool):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(demo_tool)
    txt = tmp_path / "mine.txt"
    txt.write_text("first sample line\n\nsecond one\nthird\n")
    cal = calibration.load("chat", tok, 2, str(txt))
    assert [s.text for s in cal.samples] == ["first sample line", "second one"] and cal.source == str(txt)
    jl = tmp_path / "mine.jsonl"
    jl.write_text(json.dumps({"text": "plain"}) + "\n"
                  + json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    samples = calibration.load("tool", tok, 10, str(jl)).samples
    assert samples[0].text == "plain" and not samples[0].templated
    assert samples[1].templated and "<|im_start|>user\nhi<|im_end|>" in samples[1].text
    jl.write_text('{"prompt": 1}\n')
    with pytest.raises(ValueError, match=r"mine\.jsonl:1"):
        calibration.load("tool", tok, 10, str(jl))


# --- the job -----------------------------------------------------------------------------


def test_job_writes_a_compressed_tensors_awq_checkpoint(built, demo_tool):
    out, events = built
    cfg = json.loads((out / "config.json").read_text())
    q = cfg["quantization_config"]
    assert q["quant_method"] == "compressed-tensors" and q["format"] == "pack-quantized"
    assert q["quantization_status"] == "compressed" and q["ignore"] == ["lm_head"]
    w = q["config_groups"]["group_0"]["weights"]
    assert (w["num_bits"], w["group_size"], w["strategy"], w["symmetric"], w["type"]) == (4, 32, "group", False, "int")
    from safetensors import safe_open

    with safe_open(str(out / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    q_proj = "model.layers.0.self_attn.q_proj"
    assert {f"{q_proj}.weight_packed", f"{q_proj}.weight_scale", f"{q_proj}.weight_zero_point"} <= keys
    assert f"{q_proj}.weight" not in keys  # no float copy of a quantized layer

    import llmcompressor

    meta = awq.read_metadata(out)
    assert meta is not None and meta["method"] == "awq" and meta["role"] == "tool"
    assert meta["source"]["model"] == str(demo_tool) and meta["source"]["revision"] is None
    assert meta["library"]["name"] == "llmcompressor" and meta["library"]["version"] == llmcompressor.__version__
    assert meta["quantization"]["group_size"] == 32 and meta["quantization"]["format"] == "pack-quantized"
    assert meta["quantization"]["bits"] == 4 and meta["quantization"]["scheme"] == "W4A16"
    assert meta["calibration"] == {**meta["calibration"], "source": "builtin:yapd-conversations-v1", "samples": 8,
                                   "max_seq_len": 64}
    assert 8 * 2 <= meta["calibration"]["tokens"] <= 8 * 64
    created = dt.datetime.fromisoformat(meta["created"])
    assert abs((dt.datetime.now(dt.timezone.utc) - created).total_seconds()) < 600
    card = (out / "README.md").read_text()
    assert card.startswith("---\n") and "- awq" in card and "group size 32" in card and "vllm serve" in card
    recipe = (out / "recipe.yaml").read_text()
    assert "AWQModifier" in recipe and "YapdProgress" not in recipe  # our progress hook is not part of the model
    assert (out / "tokenizer.json").read_bytes() == (demo_tool / "tokenizer.json").read_bytes()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no temporary directory left

    # Progress: stages in order, layer i of n with elapsed time and an ETA, then the result.
    stages = [e.get("stage") for e in events if e["event"] == "progress"]
    assert stages[0] == "loading" and stages[-1] == "saving" and "calibrating" in stages
    layers = [(e["layer"], e["layers"]) for e in events if e.get("stage") == "calibrating"]
    assert layers == [(0, 2), (1, 2), (2, 2)]
    assert all("eta_s" in e and e["elapsed_s"] >= 0 for e in events if e.get("stage") == "calibrating")
    assert events[-1]["event"] == "result" and events[-1]["ok"] and events[-1]["path"] == str(out)


def test_quantized_checkpoint_loads_and_generates(built):
    """transformers reads the checkpoint back (compressed-tensors decompresses it): the
    files are a model, not just the right names. vLLM loading it is the GPU test's part."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out, _ = built
    tok = AutoTokenizer.from_pretrained(out)
    model: Any = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    ids = tok("Hello there", return_tensors="pt")
    gen: Any = model.generate(**ids, max_new_tokens=4, do_sample=False)
    assert gen.shape[1] == ids["input_ids"].shape[1] + 4


def test_killed_job_leaves_no_cache_entry(tmp_path, demo_tool):
    """SIGKILL after everything but the final rename: no entry appears, the engine side
    sees nothing cached, and the leftover temporary directory is swept next time."""
    cache = tmp_path / "cache"
    proc = subprocess.Popen(job_cmd(demo_tool, "--cache-dir", str(cache)), stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True, cwd=ROOT,
                            env={**os.environ, "YAPD_DEBUG_AWQ_COMMIT_DELAY_S": "60"})
    final = awq.cache_path(cache, str(demo_tool))
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            if json.loads(line).get("stage") == "committing":
                break
        tmp = awq.tmp_path(final, proc.pid)
        assert awq.is_complete(tmp)  # weights, config and metadata all written...
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert not final.exists()  # ...and still nothing a restart would load
    assert tmp.exists()
    assert awq.find_cached(cache, str(demo_tool)) is None
    assert not tmp.exists()  # swept: its job is dead


def _fake_entry(path: Path, created: str) -> None:
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps({"quantization_config": {"quant_method": "compressed-tensors"}}))
    (path / awq.METADATA_FILE).write_text(json.dumps({"created": created}))


def test_commit_replaces_by_rename_and_recovers_an_interrupted_swap(tmp_path):
    final = tmp_path / "awq" / "m"
    _fake_entry(final, "old")
    new = awq.tmp_path(final)
    _fake_entry(new, "new")
    (new / awq.METADATA_FILE).unlink()
    with pytest.raises(awq.AwqError, match="not a complete"):
        awq.commit(new, final)  # an entry without metadata is never committed
    (new / awq.METADATA_FILE).write_text(json.dumps({"created": "new"}))
    awq.commit(new, final)
    assert awq.read_metadata(final) == {"created": "new"} and not new.exists()
    assert [p.name for p in final.parent.iterdir()] == ["m"]
    # A crash between the two renames of a rebuild: the old entry is moved aside, the new
    # one is not in place. The old one comes back rather than nothing (or a half model).
    dead_pid = _dead_pid()
    final.rename(final.parent / f".m{awq.OLD_MARK}{dead_pid}")
    _fake_entry(awq.tmp_path(final, dead_pid), "half")
    (awq.tmp_path(final, dead_pid) / awq.METADATA_FILE).unlink()
    assert awq.cache_path(tmp_path, "m") == final and not final.exists()
    assert awq.find_cached(tmp_path, "m") == final
    assert awq.read_metadata(final) == {"created": "new"}
    assert [p.name for p in final.parent.iterdir()] == ["m"]  # the half-built one is swept


def _dead_pid() -> int:
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


def test_slugs_and_engine_resolution(tmp_path, demo_tool):
    assert awq.model_slug("SicariusSicariiStuff/Impish_Nemo_12B") == "SicariusSicariiStuff--Impish_Nemo_12B"
    a, b = tmp_path / "x" / "tool", tmp_path / "y" / "tool"
    a.mkdir(parents=True)
    b.mkdir(parents=True)
    assert awq.model_slug(str(a)).startswith("tool-") and awq.model_slug(str(a)) != awq.model_slug(str(b))
    cfg = config.load(None, env={"QUANTIZATION": "awq", "YAP_CACHE_DIR": str(tmp_path)})
    with pytest.raises(EngineError, match="yapctl awq rebuild"):
        awq.resolve_model("tool", cfg.tool, cfg)
    assert awq.needs_build(cfg.tool, cfg)
    cfg.tool.awq_model = "someone/Hammer2.1-3b-AWQ"
    assert awq.resolve_model("tool", cfg.tool, cfg) == "someone/Hammer2.1-3b-AWQ" and not awq.needs_build(cfg.tool, cfg)
    cfg.tool.awq_model = ""
    cfg.tool.model = "someone/Model-awq-int4"  # any repo id containing "awq" is taken as already quantized
    assert awq.resolve_model("tool", cfg.tool, cfg) == cfg.tool.model and not awq.needs_build(cfg.tool, cfg)
    assert not awq.is_prequantized("/srv/awq-builds/Hammer2.1-3b") and awq.is_prequantized("/srv/m/Hammer-AWQ")
    cfg.tool.model = "MadeAgents/Hammer2.1-3b"
    _fake_entry(awq.cache_path(tmp_path, cfg.tool.model), "2026-01-01T00:00:00+00:00")
    cached = awq.resolve_model("tool", cfg.tool, cfg)
    assert cached == str(tmp_path / "awq" / "MadeAgents--Hammer2.1-3b") and not awq.needs_build(cfg.tool, cfg)
    from yapd.engines.vllm import engine_kwargs

    cfg.tool.revision = "abc123"
    kw = engine_kwargs("tool", cfg, cached, (9, 0))
    # compressed-tensors is read from config.json; the float model's revision is not the cache's.
    assert kw["quantization"] is None and kw["revision"] is None and kw["tokenizer"] == cached
    assert engine_kwargs("tool", cfg, cfg.tool.model, (9, 0))["revision"] == "abc123"


def test_an_awq_entry_belongs_to_the_revision_it_was_built_from(tmp_path):
    # A config moved to another revision of the float model must not load the AWQ build
    # of the one before (other weights): it needs its own build, in its own folder.
    cfg = config.load(None, env={"QUANTIZATION": "awq", "YAP_CACHE_DIR": str(tmp_path)})
    cfg.tool.model = "MadeAgents/Hammer2.1-3b"
    _fake_entry(awq.cache_path(tmp_path, cfg.tool.model), "2026-01-01T00:00:00+00:00")
    cfg.tool.revision = "refs/pr/7"
    assert awq.needs_build(cfg.tool, cfg)
    with pytest.raises(EngineError, match="yapctl awq rebuild"):
        awq.resolve_model("tool", cfg.tool, cfg)
    out = awq.cache_path(tmp_path, cfg.tool.model, cfg.tool.revision)
    assert out == tmp_path / "awq" / "MadeAgents--Hammer2.1-3b@refs-pr-7"
    argv = job_command(cfg, "tool", cfg.tool.model, cfg.tool)
    assert argv[argv.index("--out") + 1] == str(out.absolute()) and argv[argv.index("--revision") + 1] == "refs/pr/7"
    _fake_entry(out, "2026-02-01T00:00:00+00:00")
    assert awq.resolve_model("tool", cfg.tool, cfg) == str(out) and not awq.needs_build(cfg.tool, cfg)
    # A local checkpoint has no revision: its entry is the same whatever the config says.
    local = tmp_path / "float" / "tool"
    local.mkdir(parents=True)
    assert awq.model_slug(str(local), "v2") == awq.model_slug(str(local))


# --- Hub push ------------------------------------------------------------------------------


@pytest.fixture
def no_xet(monkeypatch):
    """The stand-in speaks the LFS transfer, not Xet's storage protocol."""
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_DISABLE_XET", True)


def test_push_settings_are_checked_before_any_work(tmp_path, demo_tool):
    from yapd.awq.jobs import push_settings_error

    cfg = config.load(None, env={"HF_AWQ_PUSH": "1", "HF_AWQ_TOOL_REPO": "me/tool-AWQ", "HF_TOKEN": ""})
    assert "HF_TOKEN" in (push_settings_error(cfg, "tool") or "")
    cfg = config.load(None, env={"HF_AWQ_PUSH": "1", "HF_TOKEN": TOKEN})
    assert "HF_AWQ_CHAT_REPO" in (push_settings_error(cfg, "chat") or "")
    assert push_settings_error(config.load(None, env={}), "chat") is None  # push off: nothing to check
    # The job itself stops before loading anything, with exit code 2.
    t0 = time.monotonic()
    env = {k: v for k, v in os.environ.items() if k != "HF_TOKEN"}
    r = subprocess.run(job_cmd(demo_tool, "--out", str(tmp_path / "out"), "--push-repo", "me/tool-AWQ"),
                       capture_output=True, text=True, timeout=60, env=env, cwd=ROOT)
    assert r.returncode == 2 and time.monotonic() - t0 < 20
    assert "HF_TOKEN" in json.loads(r.stdout.splitlines()[-1])["error"] and not (tmp_path / "out").exists()


def test_push_uploads_through_the_hub_client(built, no_xet, caplog):
    from yapd.awq.push import PushSettings, push

    out, _ = built
    caplog.set_level(logging.DEBUG)
    with HubStandIn(TOKEN) as hub:
        base = PushSettings(repo="me/tool-AWQ", token=TOKEN, branch="w4a16", private=True,
                            commit_message="yapd: AWQ W4A16 tool model", endpoint=hub.url)
        with pytest.raises(awq.AwqError, match="HF_AWQ_ALLOW_CREATE"):
            push(out, base)
        assert hub.repos == {}
        res = push(out, PushSettings(**{**base.__dict__, "allow_create": True}))
        repo = hub.repos["me/tool-AWQ"]
        assert repo.private and res["repo"] == "me/tool-AWQ" and res["branch"] == "w4a16" and res["commit"]
        assert repo.commits[-1]["message"] == "yapd: AWQ W4A16 tool model"
        files = repo.branches["w4a16"]
        assert files["model.safetensors"] == (out / "model.safetensors").read_bytes()  # through LFS, sha-checked
        assert {"config.json", "awq_metadata.json", "README.md", "tokenizer.json"} <= set(files)
        assert hub.cards and hub.cards[0].startswith("---\n")
        assert any(p.endswith("/info/lfs/objects/batch") for _, p, _ in hub.requests)
        api_auth = {auth for _, p, auth in hub.requests if not p.startswith("/lfs-upload/")}
        assert api_auth == {f"Bearer {TOKEN}"}
        # An existing repo, its main branch: no creation.
        n_create = sum(p == "/api/repos/create" for _, p, _ in hub.requests)
        push(out, PushSettings(**{**base.__dict__, "branch": "main"}))
        assert sum(p == "/api/repos/create" for _, p, _ in hub.requests) == n_create
        assert "model.safetensors" in repo.branches["main"]
        # A rejected token: a clear error that carries neither token.
        wrong = "hf_" + "Wrong0Token" * 3
        with pytest.raises(awq.AwqError) as exc:
            push(out, PushSettings(**{**base.__dict__, "token": wrong}))
        assert "401" in str(exc.value) and wrong not in str(exc.value) and TOKEN not in str(exc.value)
    assert TOKEN not in caplog.text and wrong not in caplog.text
    assert TOKEN not in repr(base)
    assert awq.scrub(f"token {TOKEN} and hf_abcdefghijklmnop", TOKEN) == "token *** and hf_***"


# --- the daemon ------------------------------------------------------------------------------


def test_yapd_in_awq_mode_quantizes_on_first_start_then_reuses(make_yapd, tmp_path, cache_dir):
    cache = daemon_cache(tmp_path, cache_dir)
    notify = NotifySocket(tmp_path / "notify.sock")
    try:
        d = make_yapd(TINY_TOML, start=False, env={"YAP_CACHE_DIR": str(cache), "NOTIFY_SOCKET": str(notify.path)})
        t0 = time.monotonic()
        d.start(timeout=150)
        first_start = time.monotonic() - t0
        d.wait_for("quantizing it now")
        d.wait_for("using cached AWQ model")
        # The datagrams are read on the socket's own thread: wait for READY=1 there (the
        # log line that ended d.start() can overtake it).
        ready = notify.wait("READY=1", timeout=30)
        texts = notify.texts()
        quantizing = [i for i, m in enumerate(texts) if "STATUS=quantizing tool model (AWQ W4A16): layer" in m]
        assert quantizing and quantizing[0] < ready, texts
        assert any("layer 2/2" in texts[i] and "ETA" in texts[i] for i in quantizing)
        extend = [i for i, m in enumerate(texts) if m.startswith("EXTEND_TIMEOUT_USEC=")]
        assert extend and extend[0] < quantizing[0]  # systemd's start timeout pushed out first
    finally:
        notify.close()
    entry = awq.cache_path(cache, str(cache_dir / "demo" / "tool"))
    meta = awq.read_metadata(entry)
    assert meta is not None and meta["quantization"]["group_size"] == 32
    st = d.admin(cmd="awq", action="status")[-1]
    tool = next(m for m in st["models"] if m["role"] == "tool")
    assert st["ok"] and tool["cache"] == str(entry) and tool["created"] == meta["created"] and st["job"] is None

    async def turn() -> None:
        async with ws_connect(d.url()) as ws:
            msgs = await run_turn(ws, session_id="awq", user_utterance="can you look at my screen?")
        assert msgs[-1]["type"] == "done" and any(m["type"] == "toolcall" for m in msgs)

    asyncio.run(turn())  # served by the quantized model
    assert d.stop() == 0

    # Second start: the cache is reused, nothing is quantized again.
    d2 = make_yapd(TINY_TOML, start=False, env={"YAP_CACHE_DIR": str(cache)})
    t0 = time.monotonic()
    d2.start(timeout=60)
    second_start = time.monotonic() - t0
    d2.wait_for("using cached AWQ model")
    assert not any("quantizing it now" in line or "AWQ job starting" in line for line in d2.lines)
    assert awq.read_metadata(entry) == meta
    print(f"first start {first_start:.1f}s (quantizing), second {second_start:.1f}s")


def test_yapctl_awq_rebuild_streams_progress_pushes_and_switches(make_yapd, tmp_path, cache_dir, built):
    cache = daemon_cache(tmp_path, cache_dir)
    entry = awq.cache_path(cache, str(cache_dir / "demo" / "tool"))
    shutil.copytree(built[0], entry)  # a previous build: the daemon starts on it at once
    before_inode = entry.stat().st_ino
    with HubStandIn(TOKEN) as hub:
        env = {"YAP_CACHE_DIR": str(cache), "HF_AWQ_PUSH": "1", "HF_TOKEN": TOKEN, "HF_AWQ_TOOL_REPO": "me/tool-AWQ",
               "HF_AWQ_ALLOW_CREATE": "1", "HF_AWQ_BRANCH": "w4a16", "HF_ENDPOINT": hub.url,
               "HF_HUB_DISABLE_XET": "1", "YAPD_DEBUG_ADMIN": "1"}
        d = make_yapd(TINY_TOML, env=env)
        d.wait_for("using cached AWQ model")
        cmd = [sys.executable, "-m", "yapctl", "--socket", str(d.admin_socket), "awq", "rebuild", "tool", "--json"]
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
        events: list[dict[str, Any]] = []
        served: list[int] = []
        busy: list[dict[str, Any]] = []
        assert proc.stdout is not None
        for line in proc.stdout:
            events.append(json.loads(line))
            if len(events) == 1:
                # The job runs in its own process: the daemon answers and serves meanwhile.
                served.append(d.http("/healthz", key=None)[0])
                t = threading.Thread(target=lambda: busy.extend(d.admin(cmd="awq", action="rebuild", target="tool")))
                t.start()
                t.join(20)
        assert proc.wait(60) == 0, proc.stderr.read() if proc.stderr else ""
        err = proc.stderr.read() if proc.stderr else ""
    final = events[-1]
    assert final["ok"] and final["restarted"] == ["tool"] and final["built"] == {"tool": str(entry)}, final
    assert final["pushed"]["tool"]["repo"] == "me/tool-AWQ" and final["pushed"]["tool"]["branch"] == "w4a16"
    assert "model.safetensors" in hub.repos["me/tool-AWQ"].branches["w4a16"]
    progress = [e for e in events[:-1] if e["event"] == "progress"]
    stages = [e["stage"] for e in progress]
    for stage in ("starting", "loading", "calibrating", "saving", "pushing", "restarting"):
        assert stage in stages, stages
    assert [(e["layer"], e["layers"]) for e in progress if e["stage"] == "calibrating"] == [(0, 2), (1, 2), (2, 2)]
    assert served == [200]
    assert busy and busy[-1]["ok"] is False and "already running" in busy[-1]["error"]
    assert awq.is_complete(entry) and entry.stat().st_ino != before_inode  # a new entry, renamed into place
    d.wait_for("AWQ rebuild done")
    assert d.http("/healthz", key=None)[0] == 200
    logs = "\n".join(d.lines) + err + json.dumps(events)
    assert TOKEN not in logs
    # `yapctl awq status` reports the last job.
    status = subprocess.run([sys.executable, "-m", "yapctl", "--socket", str(d.admin_socket), "awq", "status"],
                            capture_output=True, text=True, timeout=30, cwd=ROOT)
    assert status.returncode == 0 and json.loads(status.stdout)["last"]["tool"]["ok"] is True


def test_stopping_yapd_mid_rebuild_ends_the_job_and_keeps_the_old_entry(make_yapd, tmp_path, cache_dir, built):
    cache = daemon_cache(tmp_path, cache_dir)
    entry = awq.cache_path(cache, str(cache_dir / "demo" / "tool"))
    shutil.copytree(built[0], entry)
    inode = entry.stat().st_ino
    # The job stops just before its rename, with the whole new checkpoint in its temporary directory.
    d = make_yapd(TINY_TOML, env={"YAP_CACHE_DIR": str(cache), "YAPD_DEBUG_AWQ_COMMIT_DELAY_S": "60"})
    replies: list[dict[str, Any]] = []
    t = threading.Thread(target=lambda: replies.extend(d.admin(cmd="awq", action="rebuild", target="tool")))
    t.start()
    job_pid = None
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        st = d.admin(cmd="awq", action="status")[-1]
        if st["job"] and st["job"]["stage"] == "committing":
            job_pid = st["job"]["pid"]
            break
        time.sleep(0.2)
    assert job_pid and awq.is_complete(awq.tmp_path(entry, job_pid))
    # No progress line while it waits; its elapsed time still runs (a Hub download's minutes showed 0 s).
    held = d.admin(cmd="awq", action="status")[-1]["job"]["elapsed_s"]
    time.sleep(1.1)
    assert d.admin(cmd="awq", action="status")[-1]["job"]["elapsed_s"] >= held + 1
    assert d.stop() == 0
    t.join(10)
    assert replies and replies[-1]["ok"] is False and "stopping" in replies[-1]["error"]
    with pytest.raises(ProcessLookupError):
        os.kill(job_pid, 0)
    assert [p.name for p in entry.parent.iterdir()] == [entry.name]  # the job removed its temporary directory
    assert entry.stat().st_ino == inode and awq.is_complete(entry)  # the old entry is untouched


def test_a_rebuild_cancelled_ends_its_job_and_keeps_the_old_entry(make_yapd, tmp_path, cache_dir, built):
    """`yapctl awq cancel` ends the running job (it removes its temporary directory) and
    the rebuild's roles still to come; the cached entry stays, the daemon serves on (a
    rebuild could be ended only by stopping the daemon)."""
    cache = daemon_cache(tmp_path, cache_dir)
    entry = awq.cache_path(cache, str(cache_dir / "demo" / "tool"))
    shutil.copytree(built[0], entry)
    inode = entry.stat().st_ino
    d = make_yapd(TINY_TOML, env={"YAP_CACHE_DIR": str(cache), "YAPD_DEBUG_AWQ_COMMIT_DELAY_S": "60"})
    none = subprocess.run([sys.executable, "-m", "yapctl", "--socket", str(d.admin_socket), "awq", "cancel"],
                          capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert none.returncode == 1 and "no AWQ job is running" in none.stderr, none
    rebuild, rebuilt = _in_thread(d, cmd="awq", action="rebuild", target="tool")
    deadline = time.monotonic() + 60
    while not ((job := d.admin(cmd="awq", action="status")[-1]["job"]) or {}).get("stage") == "committing":
        assert time.monotonic() < deadline, "the rebuild never got to its commit"
        time.sleep(0.1)
    out = subprocess.run([sys.executable, "-m", "yapctl", "--socket", str(d.admin_socket), "awq", "cancel"],
                         capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert out.returncode == 0 and "cancelled the AWQ job for the tool model" in out.stdout, out
    rebuild.join(60)
    assert rebuilt[-1]["ok"] is False and "cancelled" in rebuilt[-1]["error"], rebuilt[-1]
    with pytest.raises(ProcessLookupError):
        os.kill(job["pid"], 0)
    assert [p.name for p in entry.parent.iterdir()] == [entry.name]  # its temporary directory went
    assert entry.stat().st_ino == inode and awq.is_complete(entry)
    assert d.admin(cmd="awq", action="status")[-1]["job"] is None
    assert d.http("/healthz", key=None)[0] == 200


def test_job_paths_are_absolute_whatever_folder_the_job_runs_in(tmp_path, monkeypatch, demo_tool):
    """The job runs in the cache's awq folder: a calibration file, a local model and a
    cache dir given relative to yapd's folder must reach it as absolute paths."""
    from yapd.awq.jobs import job_command

    monkeypatch.chdir(tmp_path)
    (tmp_path / "cal.txt").write_text("hello\n")
    (tmp_path / "model").mkdir()
    cfg = config.from_mapping({"engines": {"cache_dir": "cache"}, "awq": {"calibration_file": "cal.txt"}}, "test")
    argv = job_command(cfg, "tool", "model", cfg.tool)
    assert argv[argv.index("--calibration-file") + 1] == str(tmp_path / "cal.txt")
    assert argv[argv.index("--model") + 1] == str(tmp_path / "model")
    assert Path(argv[argv.index("--out") + 1]).is_absolute()
    hub = job_command(cfg, "tool", "someone/Model", cfg.tool)
    assert hub[hub.index("--model") + 1] == "someone/Model"  # a Hub repo id stays one


def _in_thread(d: Any, **req: Any) -> tuple[threading.Thread, list[dict[str, Any]]]:
    replies: list[dict[str, Any]] = []
    t = threading.Thread(target=lambda: replies.extend(d.admin(timeout=300, **req)))
    t.start()
    return t, replies


def test_a_restart_during_a_rebuild_does_not_quantize_the_model_again(make_yapd, tmp_path, cache_dir, built):
    """The cache entry gone, a rebuild running (held before its commit), and an engine
    restart asked meanwhile: the restart waits for the rebuild and finds the entry built,
    instead of quantizing the same model a second time (an hour for a 12B model)."""
    cache = daemon_cache(tmp_path, cache_dir)
    entry = awq.cache_path(cache, str(cache_dir / "demo" / "tool"))
    shutil.copytree(built[0], entry)
    d = make_yapd(TINY_TOML, env={"YAP_CACHE_DIR": str(cache), "YAPD_DEBUG_AWQ_COMMIT_DELAY_S": "3"})
    shutil.rmtree(entry)
    rebuild, rebuilt = _in_thread(d, cmd="awq", action="rebuild", target="tool")
    deadline = time.monotonic() + 60
    while not (d.admin(cmd="awq", action="status")[-1]["job"] or {}).get("pid"):
        assert time.monotonic() < deadline, "the rebuild never started"
        time.sleep(0.1)
    restart, restarted = _in_thread(d, cmd="restart", target="tool")
    rebuild.join(120)
    restart.join(120)
    assert rebuilt[-1]["ok"] is True and restarted[-1]["ok"] is True, (rebuilt[-1], restarted[-1])
    assert sum("AWQ job starting" in line for line in d.lines) == 1, [x for x in d.lines if "AWQ job" in x]


def test_a_quantization_failing_at_a_restart_keeps_the_engine_and_the_keys_pending(make_yapd, tmp_path, cache_dir,
                                                                                   built):
    """A reloaded tool model that cannot be quantized (a config.json and no weights): the
    restart fails with its reason, the running engine is untouched, the reloaded key
    stays pending (it was dropped, and `awq status` named the broken model). A cache
    folder that cannot be made is such a failure too, not a dropped admin connection."""
    cache = daemon_cache(tmp_path, cache_dir)
    tool = cache_dir / "demo" / "tool"
    shutil.copytree(built[0], awq.cache_path(cache, str(tool)))
    models = TINY_TOML.replace('quantization = "awq"', f'quantization = "awq"\nbackend = "cpu"\nmodel = "{tool}"')
    d = make_yapd(models, demo=False, env={"YAP_CACHE_DIR": str(cache)})
    broken = tmp_path / "broken"
    broken.mkdir()
    shutil.copy(tool / "config.json", broken / "config.json")
    d.write_config(models.replace(f'model = "{tool}"', f'model = "{broken}"'))
    assert d.admin(cmd="reload")[-1]["needs_engine_restart"] == ["tool.model"]
    reply = d.admin(cmd="restart", target="tool", timeout=300)[-1]
    assert reply["ok"] is False and "AWQ quantization" in reply["error"], reply
    st = d.admin(cmd="status")[-1]
    assert st["pending_restart_keys"] == ["tool.model"] and st["engines"]["tool"]["state"] == "ready", st
    awq_tool = next(m for m in d.admin(cmd="awq", action="status")[-1]["models"] if m["role"] == "tool")
    assert awq_tool["model"] == str(tool)
    # The cache's awq folder replaced by a file: the job cannot begin; said as the restart's error.
    shutil.rmtree(cache / "awq")
    (cache / "awq").write_text("not a folder")
    d.write_config(models)
    d.admin(cmd="reload")
    reply = d.admin(cmd="restart", target="tool", timeout=300)[-1]
    assert reply["ok"] is False and "cannot write to the AWQ cache folder" in reply["error"], reply
    assert d.http("/healthz", key=None)[0] == 200
    # `awq rebuild --json` prints the failed rebuild's whole reply too (it printed nothing of it)
    out = subprocess.run([sys.executable, "-m", "yapctl", "--socket", str(d.admin_socket), "awq", "rebuild", "tool",
                          "--json"], capture_output=True, text=True, timeout=120, cwd=ROOT)
    final = json.loads(out.stdout.splitlines()[-1])
    assert out.returncode == 1 and final["ok"] is False and final["built"] == {}, (out.stdout, out.stderr)
    assert "cannot write to the AWQ cache folder" in final["error"] and "cannot write to" in out.stderr
    # A read-only folder: refused before the quantization, not at its save (after all of the
    # calibration's GPU time)
    (cache / "awq").unlink()
    (cache / "awq").mkdir()
    with read_only(cache / "awq") as unwritable:
        if unwritable:
            before = len(d.lines)
            reply = d.admin(cmd="restart", target="tool", timeout=300)[-1]
            assert reply["ok"] is False and "cannot write to the AWQ cache folder" in reply["error"], reply
            assert not any("AWQ job starting" in line for line in d.lines[before:])


@contextlib.contextmanager
def read_only(folder: Path) -> Iterator[bool]:
    """``folder`` unwritable for this process for the block: its mode for a user, a
    read-only bind mount of itself for root (whom modes do not stop); False where neither
    can be had (root without mount rights)."""
    if os.geteuid() != 0:
        folder.chmod(0o555)
        try:
            yield True
        finally:
            folder.chmod(0o755)
        return
    mounted = subprocess.run(["mount", "--bind", str(folder), str(folder)], capture_output=True).returncode == 0
    if mounted and subprocess.run(["mount", "-o", "remount,bind,ro", str(folder)], capture_output=True).returncode:
        subprocess.run(["umount", str(folder)], check=True)
        mounted = False
    try:
        yield mounted
    finally:
        if mounted:
            subprocess.run(["umount", str(folder)], check=True)
