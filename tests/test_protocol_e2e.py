"""The WebSocket protocol against a real yapd process (CPU engine, demo models)."""

from __future__ import annotations

import asyncio
import json
import socket
import time

import pytest
from prometheus_client.parser import text_string_to_metric_families
from websockets.exceptions import ConnectionClosed

from tests.conftest import KEY, recv, run_turn, send, send_in_one_write, until_done, ws_connect

TURN_TYPES = {"ack", "toolcall", "token", "final", "done"}


def check_turn(msgs: list[dict], request_id: str | None = None, *, tool: bool = True, chat: bool = True) -> str:
    types = [m["type"] for m in msgs]
    assert types[0] == "ack" and types[-1] == "done", types
    rid = msgs[0]["request_id"]
    if request_id is not None:
        assert rid == request_id
    assert all(m.get("request_id") == rid for m in msgs), msgs
    body = types[1:-1]
    if tool:
        assert body[0] == "toolcall"
        body = body[1:]
    else:
        assert "toolcall" not in body
    if chat:
        assert body[-1] == "final", [m.get("message") for m in msgs if m["type"] == "error"]
        assert set(body[:-1]) <= {"token"}
        text = "".join(m["text"] for m in msgs if m["type"] == "token")
        assert msgs[-2]["text"] == text
    else:
        assert body == []
    return rid


async def test_full_turn_messages_and_order(shared_yapd):
    before = prompt_counts(shared_yapd)
    async with ws_connect(shared_yapd.url()) as ws:
        msgs = await run_turn(ws, session_id="abc", user_utterance="who was Columbus?", request_id="r-1",
                              history_text="User: hi\nAssistant: hello!")
        check_turn(msgs, "r-1")
        ack = msgs[0]
        assert ack["ok"] is True and ack["for"] == "start" and ack["session_id"] == "abc"
        assert isinstance(ack["seed"], int) and abs(ack["now"] - time.time()) < 30
        assert ack["persona_style"] == "wholesome" and ack["assistant_gender"] == "woman"
        assert ack["persona_text_override"] is False
        assert set(ack["models"]) == {"chat", "tool"} and all(ack["models"].values())
        tool = msgs[1]
        assert tool["status"] in ("yes", "no") and isinstance(tool["raw"], str) and isinstance(tool["calls"], list)
        done = msgs[-1]
        assert done["cancelled"] is False
        assert done["usage"]["prompt_tokens"] > 0
        assert done["usage"]["completion_tokens"] >= sum(1 for m in msgs if m["type"] == "token")
        t = done["timings"]
        assert t["tool_ms"] > 0 and t["total_ms"] >= t["tool_ms"]
        # Where each engine's time to its first output went, in its own words (the CPU
        # engines keep these always): queued, taken up, first token; the first output
        # reached the turn after that.
        for role, first in (("chat", t["engine_ttft_ms"]), ("tool", t["tool_first_ms"])):
            st = t["engines"][role]
            assert 0 <= st["queued_ms"] <= st["scheduled_ms"] <= st["first_token_ms"] <= first + 0.01, t
            assert st["cached_tokens"] == 0, t  # the CPU engine keeps no prefix cache
        if any(m["type"] == "token" for m in msgs):
            assert t["tool_ms"] <= t["ttft_ms"] <= t["total_ms"]
        # A second turn without request_id gets a server-made one, distinct.
        msgs2 = await run_turn(ws, session_id="abc", user_utterance="and then?")
        rid2 = check_turn(msgs2)
        assert rid2 and rid2 != "r-1"
        # An empty request_id is still the client's: echoed, not replaced (the parser keeps
        # it too; the fuzzer found the server making a new one).
        msgs3 = await run_turn(ws, session_id="abc", user_utterance="and now?", request_id="")
        check_turn(msgs3, "")
    # Every prompt sent is counted, per engine, as are the tokens its prefix cache held.
    after = prompt_counts(shared_yapd)
    sent = sum(m[-1]["usage"]["prompt_tokens"] for m in (msgs, msgs2, msgs3))
    assert after["chat"][0] - before["chat"][0] == sent
    assert after["tool"][0] - before["tool"][0] > 0
    assert after["chat"][1] == before["chat"][1] and after["tool"][1] == before["tool"][1]


def prompt_counts(d) -> dict[str, tuple[float, float]]:
    """Per engine role, yapd's counts of prompt tokens sent and found in the prefix cache."""
    got: dict[str, list[float]] = {"chat": [0.0, 0.0], "tool": [0.0, 0.0]}
    for family in text_string_to_metric_families(d.http("/metrics")[1]):
        for s in family.samples:
            if s.name in ("yapd_prompt_tokens_total", "yapd_prompt_cached_tokens_total"):
                got[s.labels["role"]][s.name == "yapd_prompt_cached_tokens_total"] = s.value
    return {role: (sent, cached) for role, (sent, cached) in got.items()}


async def test_cancel_ends_turn_and_no_token_follows(shared_yapd):
    async with ws_connect(shared_yapd.url()) as ws:
        for _ in range(5):
            # The demo model's random weights sometimes end a reply at once (no token to
            # cancel after): then the turn is done and another one starts.
            await send(ws, type="start", session_id="c", user_utterance="tell me a long story", request_id="long")
            msgs = [await recv(ws)]  # ack
            while msgs[-1]["type"] not in ("token", "done"):
                msgs.append(await recv(ws))
            if msgs[-1]["type"] == "token":
                break
        assert msgs[-1]["type"] == "token", msgs
        await send(ws, type="cancel")
        msgs += await until_done(ws)
        done = msgs[-1]
        assert done["request_id"] == "long" and done["cancelled"] is True
        # Nothing of the cancelled turn may follow its done: the next message is our pong.
        await send(ws, type="ping")
        assert (await recv(ws))["type"] == "pong"
        # cancel with no turn in flight is a no-op.
        await send(ws, type="cancel", request_id="nothing")
        await send(ws, type="ping")
        assert (await recv(ws))["type"] == "pong"


async def test_barge_in_done_before_new_ack(shared_yapd):
    async with ws_connect(shared_yapd.url()) as ws:
        await send(ws, type="start", session_id="b", user_utterance="first", request_id="one")
        assert (await recv(ws))["type"] == "ack"
        await send(ws, type="start", session_id="b", user_utterance="second", request_id="two")
        msgs = await until_done(ws)
        if msgs[-1]["request_id"] == "one":  # the first finished before the barge-in landed
            assert msgs[-1]["cancelled"] in (True, False)
            msgs = await until_done(ws)
        else:
            raise AssertionError(f"expected the first turn's done first: {msgs}")
        check_turn(msgs, "two")
        assert not any(m["request_id"] == "one" for m in msgs)


async def test_a_starts_ack_comes_before_the_replies_to_frames_sent_after_it(shared_yapd):
    """Frames read together: on Python before 3.12 the start's ack went out a loop round
    later, after the set_persona's ack and the pong of the frames behind it."""
    async with ws_connect(shared_yapd.url()) as ws:
        send_in_one_write(ws, {"type": "start", "session_id": "o", "user_utterance": "hi", "request_id": "r1"},
                          {"type": "set_persona", "persona_style": "savage"}, {"type": "ping"})
        first = [await recv(ws) for _ in range(3)]
        assert first[0]["type"] == "ack" and first[0]["for"] == "start" and first[0]["request_id"] == "r1", first
        await until_done(ws, 30)


async def test_barge_in_storm_keeps_order(shared_yapd):
    async with ws_connect(shared_yapd.url()) as ws:
        for i in range(10):
            await send(ws, type="start", session_id="storm", user_utterance=f"utterance {i}", request_id=f"r{i}")
        seen_done: list[str] = []
        current = None
        while len(seen_done) < 10:
            m = await recv(ws)
            if m["type"] == "ack":
                assert current is None, f"ack of {m['request_id']} before done of {current}"
                current = m["request_id"]
            else:
                assert m["request_id"] == current, m
            if m["type"] == "done":
                seen_done.append(current)
                current = None
        assert seen_done == [f"r{i}" for i in range(10)]


async def test_persona_fields_persist_and_set_persona(shared_yapd):
    async with ws_connect(shared_yapd.url()) as ws:
        msgs = await run_turn(ws, persona_style="Savage", assistant_gender="male", user_identity="a pilot")
        ack = msgs[0]
        assert (ack["persona_style"], ack["assistant_gender"], ack["user_identity"]) == ("savage", "man", "a pilot")
        ack2 = (await run_turn(ws))[0]
        assert (ack2["persona_style"], ack2["assistant_gender"]) == ("savage", "man")
        await send(ws, type="set_persona", persona_style="flirty", assistant_gender="female")
        reply = await recv(ws)
        assert reply == {**reply, "type": "ack", "for": "set_persona", "changed": True}
        await send(ws, type="set_persona", persona_style="flirty")
        assert (await recv(ws))["changed"] is False
        await send(ws, type="set_persona", persona_text="You are a pirate.")
        await recv(ws)
        ack3 = (await run_turn(ws))[0]
        assert ack3["persona_text_override"] is True and ack3["persona_style"] == "flirty"


async def test_invalid_persona_style_lists_styles_and_keeps_turn(shared_yapd):
    async with ws_connect(shared_yapd.url()) as ws:
        await send(ws, type="start", session_id="p", user_utterance="hi", persona_style="grumpy", request_id="x")
        err = await recv(ws)
        assert err["type"] == "error" and err["error_code"] == "invalid_persona_style"
        assert err["request_id"] == "x" and "wholesome" in err["message"] and "savage" in err["message"]
        check_turn(await run_turn(ws))


async def test_warm_persona_and_history(shared_yapd):
    async with ws_connect(shared_yapd.url()) as ws:
        await send(ws, type="warm_persona", persona_style="chill")
        w = await recv(ws)
        assert w["type"] == "warmed" and w["segment"] == "persona" and w["tokens"] > 10 and w["ms"] >= 0
        await send(ws, type="warm_history", history_text="User: hey\nAssistant: hi there\n" * 20)
        w2 = await recv(ws)
        assert w2["type"] == "warmed" and w2["segment"] == "history" and w2["tokens"] > w["tokens"]


async def test_a_newer_warm_up_or_a_start_supersedes_the_warm_up_in_flight(shared_yapd):
    """A client warming on each interim transcript: each warm_history supersedes the one in
    flight, and the start supersedes the last, each ending unanswered (every one ran, and
    answered, ahead of the turn: 12 of them put its TTFT at 0.87 s against 0.13 s)."""
    async with ws_connect(shared_yapd.url()) as ws:
        for i in range(12):
            await send(ws, type="warm_history", history_text=f"User: interim transcript {i} " * 40)
        msgs = await run_turn(ws)
        assert len([m for m in msgs if m["type"] == "warmed"]) <= 1, [m["type"] for m in msgs]
        check_turn([m for m in msgs if m["type"] != "warmed"])
        # a warm-up nothing supersedes is answered
        await send(ws, type="warm_persona", persona_style="chill")
        assert (await recv(ws))["type"] == "warmed"


@pytest.mark.parametrize("frame,code,needle", [
    ("{not json", "invalid_json", "JSON"),
    ("[" * 60_000, "invalid_json", "nested more than 100 levels deep"),
    ('{"type": "ping", "x": ' + "[" * 101 + "]" * 101 + "}", "invalid_json", "nested more than 100"),
    ("[1, 2]", "invalid_message", "object"),
    ('{"session_id": "s"}', "invalid_message", "type"),
    ('{"type": "start", "user_utterance": "hi"}', "invalid_message", "session_id"),
    ('{"type": "start", "session_id": "s"}', "invalid_message", "user_utterance"),
    ('{"type": "start", "session_id": "s", "user_utterance": 42}', "invalid_message", "user_utterance"),
    ('{"type": "start", "session_id": ["s"], "user_utterance": "x"}', "invalid_message", "session_id"),
    ('{"type": "start", "session_id": "s", "user_utterance": "x", "history_text": {}}', "invalid_message",
     "history_text"),
    ('{"type": "start", "session_id": "s", "user_utterance": "x", "assistant_gender": "robot"}',
     "invalid_message", "assistant_gender"),
    ('{"type": "warm_history"}', "invalid_message", "history_text"),
    ('{"type": "set_persona"}', "invalid_message", "set_persona"),
    ('{"type": "dance"}', "unknown_type", "dance"),
    ('{"type": 7}', "invalid_message", "field 'type' must be a string, got number"),
    # half of a surrogate pair, as a JS string cut inside an emoji leaves it: refused, named
    ('{"type": "start", "session_id": "s", "user_utterance": "x", "request_id": "\\ud800"}', "invalid_message",
     "field 'request_id' is not valid text"),
    ('{"type": "start", "session_id": "s\\udfff", "user_utterance": "x"}', "invalid_message", "'session_id'"),
    ('{"type": "start", "session_id": "s", "user_utterance": "x", "history_text": "hi \\ud83d"}',
     "invalid_message", "'history_text' is not valid text"),
    ('{"type": "warm_history", "history_text": "\\ud83d"}', "invalid_message", "'history_text' is not valid text"),
])
async def test_bad_input_gets_error_and_connection_stays(shared_yapd, frame, code, needle):
    async with ws_connect(shared_yapd.url()) as ws:
        await ws.send(frame)
        err = await recv(ws)
        assert err["type"] == "error" and err["error_code"] == code, err
        assert needle in err["message"]
        await send(ws, type="ping")
        assert (await recv(ws))["type"] == "pong"


async def test_two_sessions_may_use_the_same_request_id_at_once(shared_yapd):
    """Clients choose their request ids: two that both number their turns "1" (or a
    barge-in reusing its id) each get their own turn, not "already running"."""
    async with ws_connect(shared_yapd.url()) as a, ws_connect(shared_yapd.url()) as b:
        turns = await asyncio.gather(run_turn(a, session_id="alice", request_id="1"),
                                     run_turn(b, session_id="bob", request_id="1"))
        for msgs in turns:
            check_turn(msgs, "1")
        await send(a, type="start", session_id="alice", user_utterance="hi", request_id="2")
        await send(a, type="start", session_id="alice", user_utterance="hi again", request_id="2")
        msgs = await until_done(a)  # the first "2", barged in on
        assert msgs[-1]["cancelled"] is True
        check_turn(await until_done(a), "2")


async def test_a_cancel_naming_another_turn_leaves_the_turn_in_flight(shared_yapd):
    async with ws_connect(shared_yapd.url()) as ws:
        await send(ws, type="start", session_id="s", user_utterance="hello", request_id="B")
        await send(ws, type="cancel", request_id="A")  # late: turn A is long over
        msgs = await until_done(ws)
        check_turn(msgs, "B")
        assert msgs[-1]["cancelled"] is False


async def test_an_utterance_of_many_tokens_a_character_is_cut_in_tokens_for_the_tool(make_yapd):
    """5,000 emoji: about 20,000 tokens, within the characters a clip keeps. The tool's
    prompt is cut to user_utt_max_tokens of its own tokens as the chat's is: the decision
    is read, not failed on a prompt over the tool engine's max_model_len."""
    d = make_yapd(env={"DEPLOY_MODELS": "tool"})
    async with ws_connect(d.url()) as ws:
        msgs = await run_turn(ws, user_utterance="\U0001F389" * 5000, history_text="\u6f22\u5b57" * 3000)
        check_turn(msgs, chat=False)
    assert not [line for line in d.lines if "exceeds max_model_len" in line or "tool engine failed" in line]


async def test_a_long_persona_is_warmed_as_a_turn_would_trim_it(shared_yapd):
    async with ws_connect(shared_yapd.url()) as ws:
        await send(ws, type="warm_persona", persona_text="be kind and brief. " * 3000)
        w = await recv(ws)
        assert w["type"] == "warmed" and w["segment"] == "persona", w
        check_turn(await run_turn(ws, persona_text="be kind and brief. " * 3000))


async def test_binary_frame(shared_yapd):
    async with ws_connect(shared_yapd.url()) as ws:
        await ws.send(b"\x00\x01binary")
        err = await recv(ws)
        assert err["error_code"] == "binary_frame"
        check_turn(await run_turn(ws))


async def test_huge_utterance_and_history_are_trimmed(shared_yapd):
    async with ws_connect(shared_yapd.url()) as ws:
        words = " ".join(f"word{i}" for i in range(20000))  # ~190 kB: inside the 1 MiB frame limit
        msgs = await run_turn(ws, user_utterance=words, history_text=words, timeout=60)
        check_turn(msgs)
        usage = msgs[-1]["usage"]
        # persona (< 200) + history (<= 3000) + utterance (<= 350) + template
        assert usage["prompt_tokens"] <= 200 + 3000 + 350 + 20, usage


async def test_oversize_frame_refused_connection_usable(make_yapd):
    d = make_yapd(server={"max_frame_bytes": 4096})
    async with ws_connect(d.url()) as ws:
        await send(ws, type="start", session_id="s", user_utterance="x" * 5000)
        err = await recv(ws)
        assert err["error_code"] == "message_too_large" and "4096" in err["message"]
        check_turn(await run_turn(ws))
    # Far past the limit websockets itself closes with 1009.
    async with ws_connect(d.url()) as ws:
        await ws.send("x" * (2 << 20))
        with pytest.raises(ConnectionClosed) as info:
            await recv(ws)
        assert info.value.rcvd is not None and info.value.rcvd.code == 1009


async def test_auth(shared_yapd):
    for url in (shared_yapd.url(key=None), shared_yapd.url(key="wrong")):
        async with ws_connect(url) as ws:
            err = await recv(ws)
            assert err["error_code"] == "authentication_failed"
            with pytest.raises(ConnectionClosed) as info:
                await recv(ws)
            assert info.value.rcvd is not None and info.value.rcvd.code == 1008
    async with ws_connect(shared_yapd.url(key=None), additional_headers={"X-API-Key": KEY}) as ws:
        await send(ws, type="ping")
        assert (await recv(ws))["type"] == "pong"
    # The key never reaches the log.
    assert not any(KEY in line for line in shared_yapd.lines)
    assert not any("wrong" in line for line in shared_yapd.lines)


async def test_http_routes(shared_yapd):
    code, body = shared_yapd.http("/healthz", key=None)
    assert code == 200 and json.loads(body)["status"] == "ok"
    assert shared_yapd.http("/status", key=None)[0] == 401
    assert shared_yapd.http("/status", key="nope")[0] == 401
    code, body = shared_yapd.http("/status")
    st = json.loads(body)
    assert code == 200 and st["deploy"] == "both" and st["ready"] is True and st["version"]
    assert st["capacity"]["max"] == 64 and "uptime_s" in st and set(st["engines"]) == {"chat", "tool"}
    assert KEY not in body
    assert shared_yapd.http("/metrics", key=None)[0] == 401
    code, text = shared_yapd.http("/metrics")
    assert code == 200
    for name in ("yapd_ttft_seconds_bucket", "yapd_tool_decision_seconds_bucket", "yapd_inter_token_seconds",
                 "yapd_active_connections", "yapd_turns_total", "yapd_errors_total"):
        assert name in text, name
    assert shared_yapd.http("/nope")[0] == 404


async def test_capacity_and_slot_release_after_abrupt_drop(make_yapd):
    d = make_yapd(server={"max_connections": 2})
    async with ws_connect(d.url()) as a, ws_connect(d.url()) as b:
        await send(a, type="ping")
        await send(b, type="ping")
        await recv(a)
        await recv(b)
        async with ws_connect(d.url()) as c:
            err = await recv(c)
            assert err["error_code"] == "server_at_capacity"
            assert err["capacity"] == {"active": 2, "max": 2, "available": 0, "at_capacity": True}
            with pytest.raises(ConnectionClosed) as info:
                await recv(c)
            assert info.value.rcvd is not None and info.value.rcvd.code == 1013
        # Drop one abruptly mid-turn: no close frame, just a dead TCP connection.
        gone = 'yapd_turns_total{outcome="client_gone"}'
        assert gone not in d.http("/metrics")[1]
        await send(a, type="start", session_id="x", user_utterance="go")
        await recv(a)
        a.transport.abort()
        for _ in range(200):
            st = json.loads(d.http("/status")[1])
            if st["capacity"]["active"] == 1:
                break
            await asyncio.sleep(0.05)
        assert st["capacity"]["active"] == 1
        assert f"{gone} 1.0" in d.http("/metrics")[1].splitlines()  # counted, as every turn started is
        async with ws_connect(d.url()) as e:
            check_turn(await run_turn(e))


def turns_counted(d) -> float:
    return sum(s.value for family in text_string_to_metric_families(d.http("/metrics")[1])
               for s in family.samples if s.name == "yapd_turns_total")


async def test_every_turn_is_counted_once_when_its_clients_vanish(make_yapd):
    """Concurrent mode, 30 clients each dropping its TCP connection right after its ack,
    and 30 right after sending their start (their ack finds them gone): each turn once in
    yapd_turns_total, whatever ended it (the connection's close cancelled a turn settling
    its requests after a failed send: that cancel was swallowed and the turn counted twice)."""
    d = make_yapd("[turn]\nconcurrent = true\n", server={"max_connections": 64})
    before = turns_counted(d)

    async def vanish(i: int) -> None:
        async with ws_connect(d.url()) as ws:
            await send(ws, type="start", session_id=f"v{i}", user_utterance="tell me a long story")
            assert (await recv(ws))["type"] == "ack"
            ws.transport.abort()  # no close frame: the TCP connection just ends

    async def gone_at_once(i: int) -> None:
        async with ws_connect(d.url()) as ws:
            await send(ws, type="start", session_id=f"g{i}", user_utterance="tell me a long story")
            ws.transport.abort()

    await asyncio.gather(*(vanish(i) for i in range(30)), *(gone_at_once(i) for i in range(30)))
    deadline = time.monotonic() + 30
    while json.loads(d.http("/status")[1])["capacity"]["active"] or \
            any(e["in_flight"] for e in json.loads(d.http("/status")[1])["engines"].values()):
        assert time.monotonic() < deadline, "the vanished clients' turns never settled"
        await asyncio.sleep(0.05)
    counted = turns_counted(d) - before
    assert 30 <= counted <= 60  # the acked 30, and those of the rest that began
    # ... each timed in yapd_turn_seconds and in the recent stats too (only turns that sent
    # their own done were: a duty cycle read off the histogram left out every barge-in)
    timed = next(s.value for family in text_string_to_metric_families(d.http("/metrics")[1])
                 for s in family.samples if s.name == "yapd_turn_seconds_count")
    assert timed == turns_counted(d) == d.admin(cmd="stats")[-1]["turns"], (timed, counted)


async def test_deploy_chat_only(make_yapd):
    d = make_yapd(env={"DEPLOY_MODELS": "chat"})
    async with ws_connect(d.url()) as ws:
        msgs = await run_turn(ws)
        check_turn(msgs, tool=False)
        assert msgs[0]["models"]["tool"] is None and msgs[-1]["timings"]["tool_ms"] is None
    st = json.loads(d.http("/status")[1])
    assert st["capacity"]["max"] == 24 and set(st["engines"]) == {"chat"}


async def test_deploy_tool_only(make_yapd):
    d = make_yapd(env={"DEPLOY_MODELS": "tool"})
    async with ws_connect(d.url()) as ws:
        msgs = await run_turn(ws)
        check_turn(msgs, chat=False)
        assert [m["type"] for m in msgs] == ["ack", "toolcall", "done"]
        assert msgs[0]["models"]["chat"] is None
    st = json.loads(d.http("/status")[1])
    assert st["capacity"]["max"] == 32


async def test_concurrent_mode_and_flush(make_yapd):
    d = make_yapd(env={"CONCURRENT_MODEL_CALL": "1", "STREAM_FLUSH_MS": "20"})
    async with ws_connect(d.url()) as ws:
        for _ in range(3):
            msgs = await run_turn(ws, user_utterance="what is up")
            check_turn(msgs)
        # Barge-in while both engines run.
        await send(ws, type="start", session_id="s", user_utterance="a", request_id="c1")
        await recv(ws)
        await send(ws, type="start", session_id="s", user_utterance="b", request_id="c2")
        first = await until_done(ws)
        assert first[-1]["request_id"] == "c1"
        check_turn(await until_done(ws), "c2")
    st = json.loads(d.http("/status")[1])
    assert st["concurrent_mode"] is True


async def test_ping_idle_timeout_and_rate_limit(make_yapd):
    d = make_yapd(server={"idle_timeout_s": 1.0, "rate_limit_per_s": 1.0, "rate_limit_burst": 3})
    async with ws_connect(d.url()) as ws:
        for _ in range(3):
            await send(ws, type="ping")
            assert (await recv(ws))["type"] == "pong"
        await send(ws, type="ping")
        err = await recv(ws)
        assert err["error_code"] == "rate_limited"
        err = await recv(ws, timeout=5)
        assert err["error_code"] == "idle_timeout"
        with pytest.raises(ConnectionClosed) as info:
            await recv(ws)
        assert info.value.rcvd is not None and info.value.rcvd.code == 1000


async def test_health_503_until_engines_ready(make_yapd):
    d = make_yapd(start=False, env={"YAPD_DEBUG_ENGINE_START_DELAY_S": "2"})
    d.start(wait=False)
    d.wait_for("yapd.server: listening")
    assert d.http("/healthz", key=None)[0] == 503
    async with ws_connect(d.url()) as ws:
        await send(ws, type="start", session_id="s", user_utterance="hi", request_id="early")
        err = await recv(ws)
        assert err["error_code"] == "engine_unavailable" and err["request_id"] == "early"
    d.wait_for("ready port=")
    assert d.http("/healthz", key=None)[0] == 200


def test_port_in_use_is_a_clear_start_failure(make_yapd):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen()
    port = s.getsockname()[1]
    d = make_yapd(start=False, server={"port": port})
    d.start(wait=False)
    try:
        d.wait_for("start failed", 60)
        assert d.proc is not None and d.proc.wait(30) == 1
    finally:
        s.close()
