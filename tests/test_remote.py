"""`livevlm stream SOURCE --server ws://…` prints what a local `livevlm stream` prints, and the client library."""

import json
import re
import socket

import pytest

from livevlm.cli import run
from livevlm.server.app import ServerOptions
from livevlm.server.protocol import ServerLimits
from server_helpers import LiveServer

TIMING = ("latency_s", "fps", "max_lag_s")  # measurements: they differ between any two runs


@pytest.fixture(scope="module")
def server(tiny_checkpoint):
    import livevlm

    model = livevlm.load(tiny_checkpoint[0], device="cpu", dtype="float32")
    with LiveServer(model, ServerOptions(limits=ServerLimits(max_fps=1000.0), api_key="k3y")) as live:
        yield live


ARGS = ["--threshold", "0.5", "--query", "Narrate.", "--at", "1.0", "--query", "And now?", "--at", "2.2",
        "--max-new-tokens", "4"]


def test_jsonl_through_a_server_is_what_a_local_run_prints(tiny_checkpoint, server, capsys):
    ckpt, video = tiny_checkpoint
    assert run(["stream", str(video), "--model", str(ckpt), "--jsonl", *ARGS]) == 0
    local = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert run(["stream", str(video), "--server", server.ws.replace("/v1/stream", ""), "--api-key", "k3y", "--jsonl",
                *ARGS]) == 0
    captured = capsys.readouterr()
    remote = [json.loads(line) for line in captured.out.splitlines()]
    assert "running on cpu float32" in captured.err
    for line in local + remote:
        for name in TIMING:
            line.pop(name, None)
    assert remote == local
    assert [line["type"] for line in remote].count("frame") == 12
    assert {"type": "query", "time_s": 2.2, "text": "And now?"} in remote


def test_the_transcript_through_a_server_is_what_a_local_run_prints(tiny_checkpoint, server, capsys, monkeypatch):
    ckpt, video = tiny_checkpoint
    assert run(["stream", str(video), "--model", str(ckpt), *ARGS]) == 0
    local = capsys.readouterr().out
    monkeypatch.setenv("LIVEVLM_API_KEY", "k3y")
    assert run(["stream", str(video), "--server", server.ws, *ARGS]) == 0
    remote = capsys.readouterr().out

    def untimed(text):
        return re.sub(r"at [\d.]+ fps|max lag [\d.]+ s", "…", text)

    assert "User: Narrate." in remote and "frames at" in remote
    assert untimed(remote) == untimed(local)


@pytest.mark.parametrize(("extra", "said"), [
    (["--model", "x"], "--model: with --server the server's model runs"),
    (["--device", "cpu"], "--device: with --server"),
    (["--prompt-lookup", "0", "--decode", "static"], "--decode, --prompt-lookup: with --server"),
    (["--server", "ftp://host"], "give the server's address as ws://HOST:PORT"),
])
def test_options_of_a_local_model_are_refused_with_a_server(tiny_checkpoint, extra, said, capsys):
    _, video = tiny_checkpoint
    argv = ["stream", str(video), *(["--server", "ws://127.0.0.1:9"] if "--server" not in extra else []), *extra]
    assert run(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and said in err[0], err


def test_a_server_that_is_not_there_or_refuses_the_key_is_one_line(tiny_checkpoint, server, capsys):
    _, video = tiny_checkpoint
    with socket.socket() as sock:  # a port that nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    assert run(["stream", str(video), "--server", f"ws://127.0.0.1:{port}"]) == 2
    err = capsys.readouterr().err
    assert f"livevlm: error: cannot open a session on ws://127.0.0.1:{port}/v1/stream" in err
    assert "Traceback" not in err
    assert run(["stream", str(video), "--server", server.ws, "--api-key", "wrong"]) == 2
    err = capsys.readouterr().err
    assert "code 1008: the server refused the API key" in err and "Traceback" not in err


def test_the_library_client_yields_the_engines_events_and_words_as_they_come(tiny_checkpoint, server):
    from livevlm.engine.session import FrameEvent, QueryEvent, ResponseEvent
    from livevlm.remote import RemoteSummary, TextDelta, stream_to_server

    _, video = tiny_checkpoint
    stream = stream_to_server(server.ws, video, [(0.0, "Narrate.")], threshold=0.5, max_new_tokens=5,
                              api_key="k3y", image_format="jpeg")
    events = list(stream)
    assert sum(isinstance(e, FrameEvent) for e in events) == 12
    assert isinstance(events[-1], RemoteSummary) and stream.summary == events[-1] and stream.summary.frames == 12
    assert stream.summary.dropped == 0 and stream.threshold == 0.5
    assert [(e.time_s, e.text) for e in events if isinstance(e, QueryEvent)] == [(0.0, "Narrate.")]
    words = ""
    for event in events:
        if isinstance(event, TextDelta):
            words += event.text
        elif isinstance(event, ResponseEvent):
            assert words == event.text
            words = ""
