"""`livevlm serve` under bad input: 200 malformed messages each get an `error` (or a clean close) while a
well-behaved session beside them loses nothing, and a client killed mid-response leaves no session behind."""

import io
import json
import signal
import struct
import subprocess
import sys
import threading
import time
import zlib

import numpy as np
import pytest
from PIL import Image
from websockets.exceptions import ConnectionClosed

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
)
from server_helpers import wait_for_sessions as sessions_after

LIMITS = ServerLimits(max_fps=1000.0, max_sessions=8)


@pytest.fixture(scope="module")
def tiny_model(tiny_checkpoint):
    import livevlm

    return livevlm.load(tiny_checkpoint[0], device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def server(tiny_model):
    with LiveServer(tiny_model, ServerOptions(limits=LIMITS)) as live:
        yield live


def png_header(width: int, height: int) -> bytes:
    """A PNG whose header claims width × height (its pixel data is a few bytes)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + \
        chunk(b"IEND", b"")


def image_bytes(format: str) -> bytes:
    out = io.BytesIO()
    Image.fromarray(make_frames(1)[0]).save(out, format=format)
    return out.getvalue()


def before_start() -> list[str | bytes]:
    """Messages refused because no `start` came first (valid or not)."""
    rng = np.random.default_rng(0)
    return [png(f) for f in make_frames(5)] + [rng.bytes(100 + i) for i in range(5)] + [
        json.dumps({"type": "query", "text": "Hello?"}), json.dumps({"type": "query", "text": "x", "time_s": 1}),
        json.dumps({"type": "frame", "time_s": 1.0}), json.dumps({"type": "frame", "time_s": 0.0}),
        json.dumps({"type": "end"}), json.dumps({"type": "end"}), json.dumps({"type": "query", "text": "Again?"})]


def malformed_text() -> list[str]:
    bad_json = ["{", "not json", "", " ", "[1, 2", '{"type": "start"', "\x00", "{'type': 'start'}", "nan", "}{",
                '{"type": "query", "text": "a"} trailing', "[" * 50_000, '{"a": ' * 10_000, "1e99999x",
                '{"type": "query", "text": "\\ud800"}', '{"type": "start", "system": "a\\udfff"}',
                '{"type": "query", "text": "\\ud800"', "tru", '{"type"}', '{"type": "end",}', "\ufeff{}"]
    not_objects = ["1", "[]", '"start"', "null", "true", "3.14", '[{"type": "start"}]']
    bad_types = ['{"type": 1}', "{}", '{"kind": "start"}', '{"type": null}', '{"type": ["start"]}',
                 '{"type": "hello"}', '{"type": "START"}', '{"type": ""}', json.dumps({"type": "x" * 1000}),
                 '{"type": "frames"}', '{"type": "image"}', '{"type": "summary"}', '{"type": "ready"}']
    bad_fields = [{"type": "query", "text": "a", "path": "/etc/passwd"}, {"type": "start", "file": "/etc/passwd"},
                  {"type": "end", "now": True}, {"type": "frame", "time_s": 1, "data": "AAAA"},
                  {"type": "query", "text": 5}, {"type": "query"}, {"type": "query", "text": ""},
                  {"type": "query", "text": "   "}, {"type": "query", "text": None}, {"type": "query", "text": ["a"]},
                  {"type": "frame"}, {"type": "frame", "time_s": "1"}, {"type": "frame", "time_s": -1},
                  {"type": "frame", "time_s": True}, {"type": "frame", "time_s": None},
                  {"type": "query", "text": "a", "time_s": -5}, {"type": "query", "text": "a", "time_s": "now"},
                  {"type": "start", "fps": 0}, {"type": "start", "fps": -2}, {"type": "start", "fps": 1e9},
                  {"type": "start", "fps": True}, {"type": "start", "fps": "2"}, {"type": "start", "threshold": 2},
                  {"type": "start", "threshold": -0.1}, {"type": "start", "threshold": "high"},
                  {"type": "start", "max_new_tokens": 100_000}, {"type": "start", "max_new_tokens": 1.5},
                  {"type": "start", "max_new_tokens": 0}, {"type": "start", "query": 7},
                  {"type": "start", "system": {"a": 1}}, {"type": "start", "system": "s" * 3000},
                  {"type": "start"}, {"type": "start", "threshold": 0.5}]  # the last two: already started
    non_finite = ['{"type": "frame", "time_s": NaN}', '{"type": "frame", "time_s": Infinity}',
                  '{"type": "frame", "time_s": 1e999}', '{"type": "start", "fps": -Infinity}',
                  '{"type": "query", "text": "a", "time_s": NaN}']
    too_long = [json.dumps({"type": "query", "text": "q" * 1_000_000}),  # 1 MB query: above max_text_bytes
                json.dumps({"type": "query", "text": "q" * 3000}),  # above max_query_chars
                json.dumps({"type": "query", "text": "é" * 2001}), "x" * 70_000, " " * 65_537]
    return bad_json + not_objects + bad_types + [json.dumps(m) for m in bad_fields] + non_finite + too_long


def malformed_frames() -> list[bytes]:
    rng = np.random.default_rng(1)
    whole = png(make_frames(1)[0])
    jpeg = image_bytes("JPEG")
    return [rng.bytes(n) for n in (1, 10, 1000, 100_000)] + [b"", b"\x89PNG", b"\xff\xd8\xff", b"GIF89a",
                                                                  b"hello world", b"\0" * 5000] + [
        image_bytes("GIF"), image_bytes("BMP"), image_bytes("TIFF"), image_bytes("WEBP"), image_bytes("ICO"),
        whole[:40], whole[: len(whole) // 2], jpeg[:30], jpeg[: len(jpeg) // 2], png_header(20_000, 20_000),
        png_header(5000, 5000), png_header(0, 0), png_header(1, 2**31 - 1), png_header(4097, 4097),
        b"\x89PNG\r\n\x1a\n" + b"\0" * 100, rng.bytes(2 * 1024 * 1024)]


def test_200_malformed_messages_each_get_an_error_and_a_good_session_beside_them_loses_nothing(server, tiny_model):
    early, texts, frames = before_start(), malformed_text(), malformed_frames()
    oversize = [b"\0" * (50 * 1024 * 1024), b"\0" * (LIMITS.max_message_bytes + 1)]
    total = len(early) + len(texts) + len(frames) + len(oversize)
    padding = [np.random.default_rng(100 + i).bytes(64) for i in range(200 - total)]  # more garbage frames
    assert total <= 200 and len(early) + len(texts) + len(frames) + len(padding) + len(oversize) == 200

    good_frames = make_frames(40, seed=5)
    good: dict = {}
    beside = threading.Thread(target=lambda: good.update(result=run_session(
        server.ws, [png(f) for f in good_frames], start={"threshold": 0.5, "max_new_tokens": 4},
        queries={20: "What happened?"}, max_fps=100.0)))
    beside.start()
    time.sleep(0.2)  # the good session runs while the bad messages arrive

    errors = 0
    with connect(server.ws) as ws:  # refused before start
        for message in early:
            ws.send(message)
            reply = recv_json(ws, timeout=10)
            assert reply["type"] == "error" and "start" in reply["message"], (message[:40], reply)
            errors += 1
    with connect(server.ws) as ws:  # refused after start
        ws.send(json.dumps({"type": "start"}))
        assert recv_json(ws)["type"] == "ready"
        for message in texts + frames + padding:
            ws.send(message)
            reply = recv_json(ws, timeout=10)
            assert reply["type"] == "error" and reply["message"], (message[:40], reply)
            errors += 1
        assert health(server.http)[1]["status"] == "ok"
    for message in oversize:  # larger than the server reads: it closes the connection (1009) from the header
        ws = connect(server.ws)
        ws.send(json.dumps({"type": "start"}))
        assert recv_json(ws)["type"] == "ready"
        try:
            ws.send(message)
            code = close_code(ws, timeout=10)
        except (OSError, ConnectionClosed) as exc:  # closed while the client still wrote: the reset that
            code = getattr(getattr(exc, "rcvd", None), "code", None)  # follows may swallow the close frame
        finally:
            ws.close()
        assert code in (1009, None)
        deadline = time.monotonic() + 10  # that session is gone (the good one may still run)
        while health(server.http)[1]["sessions"] > int(beside.is_alive()) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert health(server.http)[1]["sessions"] <= int(beside.is_alive())
    assert errors == 200 - len(oversize)

    beside.join(timeout=60)
    result = good["result"]
    assert result.close_code == 1000 and result.of("error") == [] and result.of("dropped") == []
    assert [m["index"] for m in result.of("frame")] == list(range(40))
    assert result.messages[-1]["type"] == "summary" and result.messages[-1]["frames"] == 40
    assert as_triples(result.messages) == local_messages(tiny_model, good_frames, 0.5, 4, None, {20: "What happened?"})
    assert sessions_after(server.http, 0) == 0


@pytest.mark.parametrize(("message", "named"), [
    (json.dumps({"type": "query", "text": "q" * 1_000_000}), "max_text_bytes=65536"),
    (json.dumps({"type": "query", "text": "q" * 3000}), "max_query_chars=2000"),
    (png_header(20_000, 20_000), "max_image_pixels=16777216"),
    (png_header(5000, 5000), "max_image_pixels=16777216"),
    (b"GIF89a" + b"\0" * 20, "JPEG or PNG"),
    (json.dumps({"type": "start", "fps": 1e9}), "max_fps=1000"),
], ids=["1MB-query", "long-query", "20000x20000-png", "5000x5000-png", "gif", "fps"])
def test_each_limit_is_named_in_its_error(server, message, named):
    with connect(server.ws) as ws:
        ws.send(json.dumps({"type": "start"}))
        assert recv_json(ws)["type"] == "ready"
        ws.send(message)
        reply = recv_json(ws, timeout=10)
    assert reply["type"] == "error" and named in reply["message"], reply


KILLED_CLIENT = """
import json, sys, time
import numpy as np
from PIL import Image
import io
from websockets.sync.client import connect
with connect(sys.argv[1], compression=None, proxy=None) as ws:
    ws.send(json.dumps({"type": "start", "threshold": 0.0, "max_new_tokens": 250}))
    json.loads(ws.recv(timeout=30))
    for i in range(30):
        out = io.BytesIO()
        Image.fromarray(np.full((32, 32, 3), 8 * i, dtype=np.uint8)).save(out, format="PNG")
        ws.send(out.getvalue())
    while json.loads(ws.recv(timeout=30))["type"] != "delta":
        pass
    print("mid-response", flush=True)
    time.sleep(60)  # killed here
"""


def test_a_client_killed_mid_response_leaves_no_session_behind(server):
    proc = subprocess.Popen([sys.executable, "-c", KILLED_CLIENT, server.ws], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "mid-response"
        assert health(server.http)[1]["sessions"] == 1
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        proc.kill()
    assert sessions_after(server.http, 0) == 0
    result = run_session(server.ws, [png(f) for f in make_frames(4)], start={"max_new_tokens": 2})
    assert len(result.of("frame")) == 4 and result.close_code == 1000  # the server goes on
