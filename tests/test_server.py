"""`livevlm serve` end to end: a real uvicorn server on a loopback port, the tiny random model, the protocol."""

import json
import threading
import time

import pytest

from livevlm.server.app import ServerOptions
from livevlm.server.protocol import ServerLimits
from server_helpers import (
    LiveServer,
    as_triples,
    close_code,
    connect,
    health,
    local_messages,
    make_frames,
    png,
    recv_json,
    run_session,
    wait_for_sessions,
)

FAST = ServerLimits(max_fps=1000.0)


@pytest.fixture(scope="module")
def tiny_model(tiny_checkpoint):
    import livevlm

    return livevlm.load(tiny_checkpoint[0], device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def server(tiny_model):
    with LiveServer(tiny_model, ServerOptions(limits=FAST, model_name="tiny")) as live:
        yield live


def test_health_and_the_page(server):
    status, body = health(server.http)
    assert status == 200
    assert body == {"status": "ok", "sessions": 0, "max_sessions": FAST.max_sessions, "model": "tiny",
                    "device": "cpu float32"}
    import urllib.request

    with urllib.request.urlopen(server.http + "/", timeout=10) as page:
        assert page.status == 200 and "text/html" in page.headers["content-type"]


def test_a_session_end_to_end_is_the_engine_run_here(server, tiny_model):
    """ready → per-frame events, deltas that add up to each response, a query mid-stream answered at once,
    end → summary and a normal close; the events are those of the engine run in this process."""
    frames = make_frames(10)
    result = run_session(server.ws, [png(f) for f in frames], start={"threshold": 0.5, "max_new_tokens": 6,
                                                                       "query": "Narrate."},
                         queries={4: "What now?"})
    ready = result.messages[0]
    assert ready["type"] == "ready" and ready["fps"] == tiny_model.fps and ready["threshold"] == 0.5
    assert ready["image_size"] == 32 and ready["device"] == "cpu float32" and ready["limits"]["max_fps"] == 1000
    assert result.close_code == 1000
    summary = result.messages[-1]
    assert summary["type"] == "summary" and summary["frames"] == 10 and summary["dropped"] == 0
    assert {"frames", "fps", "max_lag_s", "threshold", "device"} <= set(summary)
    assert summary["responses"] == len(result.of("response")) and summary["threshold"] == 0.5

    frame_messages = result.of("frame")
    assert [m["index"] for m in frame_messages] == list(range(10))
    assert [m["time_s"] for m in frame_messages] == [i / tiny_model.fps for i in range(10)]
    deltas = ""  # the deltas of each response add up to its text
    for message in result.messages:
        if message["type"] == "delta":
            deltas += message["text"]
        elif message["type"] == "response":
            assert deltas == message["text"]
            deltas = ""
        else:
            assert deltas == "", f"a {message['type']} message inside a response"
    assert result.of("query")[1] == {"type": "query", "time_s": 2.0, "text": "What now?"}
    expected = local_messages(tiny_model, frames, 0.5, 6, "Narrate.", {4: "What now?"})
    assert as_triples(result.messages) == expected
    assert wait_for_sessions(server.http, 0) == 0


def test_a_query_during_a_response_is_answered_right_after_it(server):
    frames = [png(f) for f in make_frames(2)]
    with connect(server.ws) as ws:
        ws.send(json.dumps({"type": "start", "threshold": 0.0, "max_new_tokens": 200}))
        assert recv_json(ws)["type"] == "ready"
        ws.send(frames[0])
        messages = [recv_json(ws)]
        while messages[-1]["type"] != "delta":  # a response is being decoded
            messages.append(recv_json(ws))
        ws.send(json.dumps({"type": "query", "text": "Why?"}))
        ws.send(frames[1])
        ws.send(json.dumps({"type": "end"}))
        while messages[-1]["type"] != "summary":
            messages.append(recv_json(ws))
    kinds = [m["type"] for m in messages if m["type"] != "delta"]
    assert kinds == ["frame", "response", "query", "response", "frame", "response", "summary"]
    assert messages[[m["type"] for m in messages].index("query")]["time_s"] == 0.0


def test_frame_messages_time_the_next_frame_and_times_must_increase(server):
    frames = [png(f) for f in make_frames(3)]
    with connect(server.ws) as ws:
        ws.send(json.dumps({"type": "start", "fps": 4.0}))
        assert recv_json(ws)["fps"] == 4.0
        ws.send(json.dumps({"type": "frame", "time_s": 1.5}))
        ws.send(frames[0])
        ws.send(frames[1])  # untimed: index 1 / 4 fps = 0.25 s, before 1.5 s
        ws.send(json.dumps({"type": "frame", "time_s": 2.0}))
        ws.send(frames[2])
        ws.send(json.dumps({"type": "end"}))
        messages = []
        while not messages or messages[-1]["type"] != "summary":
            messages.append(recv_json(ws))
    frames_seen = [(m["index"], m["time_s"]) for m in messages if m["type"] == "frame"]
    assert frames_seen == [(0, 1.5), (2, 2.0)]
    error = next(m for m in messages if m["type"] == "error")
    assert error["index"] == 1 and "frame times must increase" in error["message"]


def test_a_full_server_refuses_with_1013(tiny_model):
    with LiveServer(tiny_model, ServerOptions(limits=ServerLimits(max_sessions=2, max_fps=1000.0))) as live:
        first, second = connect(live.ws), connect(live.ws)
        for ws in (first, second):
            ws.send(json.dumps({"type": "start"}))
            assert recv_json(ws)["type"] == "ready"
        assert health(live.http)[1]["sessions"] == 2
        with connect(live.ws) as third:
            error = recv_json(third)
            assert error["type"] == "error" and "max_sessions=2" in error["message"]
            assert close_code(third) == 1013
        first.close()
        assert wait_for_sessions(live.http, 1) == 1
        with connect(live.ws) as fourth:
            fourth.send(json.dumps({"type": "start"}))
            assert recv_json(fourth)["type"] == "ready"
        second.close()


def test_the_api_key_guards_health_and_the_stream_but_not_the_page(tiny_model):
    import urllib.request

    with LiveServer(tiny_model, ServerOptions(limits=FAST, api_key="s3cret")) as live:
        assert health(live.http)[0] == 401
        assert health(live.http, key="wrong")[0] == 401
        assert health(live.http, query_key="wrong")[0] == 401
        assert health(live.http, key="s3cret")[0] == 200
        assert health(live.http, query_key="s3cret")[0] == 200
        with urllib.request.urlopen(live.http + "/", timeout=10) as page:
            assert page.status == 200
        for url, headers in ((live.ws, None), (live.ws + "?key=wrong", None),
                             (live.ws, {"Authorization": "Bearer wrong"})):
            with connect(url, additional_headers=headers) as ws:
                assert close_code(ws) == 1008
        assert health(live.http, key="s3cret")[1]["sessions"] == 0  # refused before any work
        for url, headers in ((live.ws + "?key=s3cret", None), (live.ws, {"Authorization": "Bearer s3cret"})):
            with connect(url, additional_headers=headers) as ws:
                ws.send(json.dumps({"type": "start"}))
                assert recv_json(ws)["type"] == "ready"


def test_an_idle_session_is_closed(tiny_model):
    limits = ServerLimits(max_fps=1000.0, idle_timeout_s=0.5)
    with LiveServer(tiny_model, ServerOptions(limits=limits)) as live, connect(live.ws) as ws:
        ws.send(json.dumps({"type": "start"}))
        assert recv_json(ws)["type"] == "ready"
        ws.send(png(make_frames(1)[0]))
        assert recv_json(ws)["type"] == "frame"
        started = time.monotonic()
        messages = []
        while not messages or messages[-1]["type"] != "error":
            messages.append(recv_json(ws, timeout=10))
        assert "idle_timeout_s" in messages[-1]["message"]
        assert close_code(ws) == 1000
        assert time.monotonic() - started < 5
        assert wait_for_sessions(live.http, 0) == 0


def test_a_client_that_disconnects_frees_its_session(server):
    ws = connect(server.ws)
    ws.send(json.dumps({"type": "start", "threshold": 0.0, "max_new_tokens": 200}))
    assert recv_json(ws)["type"] == "ready"
    for frame in make_frames(20):
        ws.send(png(frame))
    while recv_json(ws)["type"] != "delta":  # mid-response
        pass
    assert health(server.http)[1]["sessions"] == 1
    ws.socket.close()  # gone, without a closing handshake
    assert wait_for_sessions(server.http, 0) == 0


def test_frames_beyond_the_queue_drop_the_oldest_waiting(tiny_model):
    """A slow model (an encoder that takes 50 ms) and 20 frames at once: the oldest waiting frames are dropped
    and reported, the rest are answered in order, and nothing else is lost."""
    limits = ServerLimits(max_fps=1000.0, queue_frames=3)
    with LiveServer(tiny_model, ServerOptions(limits=limits)) as live:
        worker = live.worker
        encode = worker.encoder.encode

        class Slow:
            image_size = worker.encoder.image_size
            resample = worker.encoder.resample

            def encode(self, frames, previous=None):
                time.sleep(0.05)
                return encode(frames, previous=previous)

        worker.encoder = Slow()
        result = run_session(live.ws, [png(f) for f in make_frames(20)], start={"threshold": 1.0}, window=100)
    answered = [m["index"] for m in result.of("frame")]
    dropped = [m["index"] for m in result.of("dropped")]
    assert dropped and all(m["count"] == 1 for m in result.of("dropped"))
    assert sorted(answered + dropped) == list(range(20)) and answered == sorted(answered)
    assert answered[-1] == 19  # the newest frames survive
    assert result.messages[-1]["dropped"] == len(dropped) and result.messages[-1]["frames"] == len(answered)


def test_frames_above_max_fps_are_refused_naming_the_limit(tiny_model):
    with LiveServer(tiny_model, ServerOptions(limits=ServerLimits(max_fps=2.0))) as live:
        result = run_session(live.ws, [png(f) for f in make_frames(12)], start={"threshold": 1.0}, window=100)
    refused = [m for m in result.of("error") if "max_fps=2" in m["message"]]
    assert len(result.of("frame")) + len(refused) == 12
    answered = [m["index"] for m in result.of("frame")]
    assert answered[:2] == [0, 1] and len(answered) <= 6  # a burst of one second's worth, then 2 per second


def test_sessions_share_one_model_but_no_state(server, tiny_model):
    """Two sessions at once, different settings: each gets what it would get alone."""
    frames = [make_frames(8, seed=1), make_frames(8, seed=2)]
    settings = [{"threshold": 0.0, "max_new_tokens": 5}, {"threshold": 1.0, "max_new_tokens": 3, "query": "Hi."}]
    results = [None, None]

    def run(k):
        results[k] = run_session(server.ws, [png(f) for f in frames[k]], start=settings[k])

    threads = [threading.Thread(target=run, args=(k,)) for k in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    for k in range(2):
        expected = local_messages(tiny_model, frames[k], settings[k]["threshold"], settings[k]["max_new_tokens"],
                                  settings[k].get("query"))
        assert as_triples(results[k].messages) == expected


def assert_same_triples(got, expected):
    """as_triples' lists, p_speak within 1e-6: a batched forward may sum in another order (tests/test_batch.py)."""
    assert [(kind, time_s) for kind, time_s, _ in got] == [(kind, time_s) for kind, time_s, _ in expected]
    for (kind, _, value), (_, _, wanted) in zip(got, expected, strict=True):
        assert value == pytest.approx(wanted, abs=2e-5) if kind == "frame" else value == wanted


def test_batched_sessions_say_what_each_says_alone(tiny_model):
    """`batch_sessions`: two sessions' frames share LLM forwards (rows of one batch), with different settings
    and a query mid-stream, and each gets the messages of the engine run alone here. A slow one-row forward
    (0.2 s) lets the second session's frames queue up beside the first's."""
    frames = [make_frames(24, seed=1), make_frames(24, seed=2)]
    settings = [{"threshold": 0.5, "max_new_tokens": 5, "query": "Narrate."}, {"threshold": 0.3, "max_new_tokens": 3}]
    queries = [{}, {10: "What now?"}]
    rows = []

    def slow_single_rows(module, args, kwargs):
        rows.append(kwargs["inputs_embeds"].shape[0])
        if rows[-1] == 1 and kwargs["inputs_embeds"].shape[1] > 1:
            time.sleep(0.2)

    results = [None, None]
    with LiveServer(tiny_model, ServerOptions(limits=FAST, batch_sessions=True)) as live:
        hook = tiny_model.model.llm.register_forward_pre_hook(slow_single_rows, with_kwargs=True)
        try:
            threads = [threading.Thread(target=lambda k=k: results.__setitem__(k, run_session(
                live.ws, [png(f) for f in frames[k]], start=settings[k], queries=queries[k]))) for k in range(2)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(timeout=60)
        finally:
            hook.remove()
        assert live.worker.batch.free_rows == FAST.max_sessions  # both rows freed at their ends
    assert 2 in rows
    for k in range(2):
        assert results[k].close_code == 1000
        expected = local_messages(tiny_model, frames[k], settings[k]["threshold"], settings[k]["max_new_tokens"],
                                  settings[k].get("query"), queries[k])
        assert_same_triples(as_triples(results[k].messages), expected)
    assert results[0].of("response") and results[1].of("response")


@pytest.fixture(scope="module")
def notes_model(tiny_checkpoint, tmp_path_factory):
    """The tiny model in the layout with notes (`format.note_role: Note`, as the shipped default model)."""
    import shutil

    import yaml

    import livevlm

    folder = tmp_path_factory.mktemp("notes") / "ckpt"
    shutil.copytree(tiny_checkpoint[0], folder)
    settings = yaml.safe_load((folder / "livevlm.yaml").read_text())
    settings["format"]["note_role"] = "Note"
    (folder / "livevlm.yaml").write_text(yaml.safe_dump(settings))
    return livevlm.load(folder, device="cpu", dtype="float32")


def scripted_choices(self, logits, first, second):
    """Each session's choices in turn: note and watch on, note and answer, respond at once; again. Every path
    of a note, whatever the random weights prefer (the model's own choice: tests/test_engine_notes.py)."""
    self.choices_made = getattr(self, "choices_made", 0) + 1
    return [True, False, True, True, False][(self.choices_made - 1) % 5]


@pytest.mark.parametrize("batch_sessions", [False, True])
def test_notes_come_as_note_messages_and_are_never_said(notes_model, monkeypatch, batch_sessions):
    """A model with notes: each note comes as a `note` message, in the engine's order and never inside a
    response's deltas, and the session says what the engine run here says."""
    from livevlm.engine.session import StreamSession

    monkeypatch.setattr(StreamSession, "_prefers", scripted_choices)
    frames, start = make_frames(12, seed=3), {"threshold": 0.3, "max_new_tokens": 4, "query": "Tell me when."}
    with LiveServer(notes_model, ServerOptions(limits=FAST, batch_sessions=batch_sessions)) as live:
        result = run_session(live.ws, [png(f) for f in frames], start=start)
    assert result.close_code == 1000
    assert_same_triples(as_triples(result.messages), local_messages(notes_model, frames, 0.3, 4, "Tell me when."))
    notes = result.of("note")
    assert {n["answered"] for n in notes} == {True, False}
    assert all(set(n) == {"type", "time_s", "text", "answered", "latency_s"} for n in notes)
    kinds = [m["type"] for m in result.messages]
    assert all(kinds[i - 1] != "delta" for i, kind in enumerate(kinds) if kind == "note")


def test_a_batched_sessions_row_is_taken_by_the_next_session(tiny_model):
    """One row: the second session waits for the first's row to be freed, then says what it says alone."""
    frames = make_frames(6)
    expected = local_messages(tiny_model, frames, 0.5, 4)
    limits = ServerLimits(max_fps=1000.0, max_sessions=1)
    with LiveServer(tiny_model, ServerOptions(limits=limits, batch_sessions=True)) as live:
        for _ in range(2):
            result = run_session(live.ws, [png(f) for f in frames], start={"threshold": 0.5, "max_new_tokens": 4})
            assert result.close_code == 1000
            assert_same_triples(as_triples(result.messages), expected)


def test_a_start_with_no_free_row_is_refused_with_1013(tiny_model, monkeypatch):
    """`batch_sessions`: a new session waits for a closing session's row, and past the wait gets an `error`
    and close code 1013 (try again later), as a full server does. Here the one row is held by hand."""
    from livevlm.config import EngineConfig
    from livevlm.server import worker

    monkeypatch.setattr(worker, "_ROW_WAIT_S", 0.5)
    with LiveServer(tiny_model, ServerOptions(limits=ServerLimits(max_fps=1000.0, max_sessions=1),
                                              batch_sessions=True)) as live:
        live.worker.batch.add(EngineConfig())
        with connect(live.ws) as ws:
            ws.send(json.dumps({"type": "start"}))
            message = recv_json(ws, timeout=10)
            assert message["type"] == "error" and "every one of the 1 batched rows" in message["message"]
            assert close_code(ws) == 1013


def test_queries_beyond_queue_queries_are_refused_until_they_are_answered(server):
    with connect(server.ws) as ws:
        ws.send(json.dumps({"type": "start", "max_new_tokens": 2, "query": "First?"}))
        assert recv_json(ws)["type"] == "ready"
        for k in range(5):  # before any frame nothing is answered: the first query and 3 more wait
            ws.send(json.dumps({"type": "query", "text": f"Q{k}?"}))
        refused = [recv_json(ws, timeout=10), recv_json(ws, timeout=10)]
        assert all(m["type"] == "error" and "queue_queries=4" in m["message"] for m in refused)
        ws.send(png(make_frames(1)[0]))
        ws.send(json.dumps({"type": "end"}))
        messages = []
        while not messages or messages[-1]["type"] != "summary":
            messages.append(recv_json(ws))
    assert [m["text"] for m in messages if m["type"] == "query"] == ["First?", "Q0?", "Q1?", "Q2?"]


def test_static_decode_serves_what_eager_decode_says(tiny_model, monkeypatch):
    """`livevlm serve --decode static`: every session decodes through the static-shape step, and the
    messages are those of the eager engine run here (the step is exact on the CPU, docs/engine.md)."""
    from livevlm.engine import session as engine_session

    static_steps = []
    real_init = engine_session.StaticStepCache.__init__

    def counting_init(self, *args, **kwargs):
        static_steps.append(1)
        real_init(self, *args, **kwargs)

    monkeypatch.setattr(engine_session.StaticStepCache, "__init__", counting_init)
    frames = make_frames(10)
    with LiveServer(tiny_model, ServerOptions(limits=FAST, decode="static")) as live:
        result = run_session(live.ws, [png(f) for f in frames], start={"threshold": 0.5, "max_new_tokens": 6,
                                                                         "query": "Narrate."},
                             queries={4: "What now?"})
    assert result.close_code == 1000 and result.of("response") and static_steps
    assert as_triples(result.messages) == local_messages(tiny_model, frames, 0.5, 6, "Narrate.", {4: "What now?"})


def test_an_unknown_decode_mode_is_refused_before_serving(tiny_model):
    from livevlm.server.app import create_app

    with pytest.raises(ValueError, match="engine.decode must be one of.*eager.*got 'fast'"):
        create_app(tiny_model, ServerOptions(decode="fast"))


@pytest.fixture(scope="module")
def change_hues_model(tiny_checkpoint, tmp_path_factory):
    """The tiny model with `model.change_hues`: each frame's tokens depend on the frame before it."""
    import torch

    import livevlm
    from conftest import save_tiny_llm
    from livevlm.checkpoint import save_checkpoint
    from livevlm.config import FormatConfig, ModelConfig
    from livevlm.model import build_live_model

    root = tmp_path_factory.mktemp("change_hues")
    tokenizer, placeholder, llm = save_tiny_llm(root / "llm")
    config = ModelConfig(llm=str(root / "llm"), vision=str(tiny_checkpoint[0].parent / "vision"), frame_size=32,
                         grid=2, hue_bins=3, change_hues=True, finetune="connector")
    torch.manual_seed(0)
    model = build_live_model(config, llm, vision_dim=16 + 3 + 3, placeholder_id=placeholder)
    save_checkpoint(model, tokenizer, config, FormatConfig(), root / "ckpt")
    return livevlm.load(root / "ckpt", device="cpu", dtype="float32")


def test_each_frame_is_compared_with_the_one_before_it_across_encoder_batches(change_hues_model):
    """40 frames are more than one encoder call takes (max_batch 16): each call must be given the last frame
    of the call before, or the first frame of each would show no change and the events would differ."""
    frames = make_frames(40)
    with LiveServer(change_hues_model, ServerOptions(limits=FAST, model_name="tiny")) as live:
        result = run_session(live.ws, [png(f) for f in frames], start={"threshold": 0.5, "max_new_tokens": 4})
    assert result.close_code == 1000
    assert as_triples(result.messages) == local_messages(change_hues_model, frames, 0.5, 4)
