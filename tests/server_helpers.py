"""Helpers of the server tests: a real uvicorn server on a free loopback port (in a thread or a process) and a
small protocol client with flow control. Every wait is bounded in time."""

from __future__ import annotations

import io
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image

TIMEOUT_S = 60.0  # the most any one wait of a test may take


class LiveServer:
    """`create_app(model, options)` served by uvicorn on 127.0.0.1:<free port>, in a background thread."""

    def __init__(self, model, options) -> None:
        import uvicorn

        from livevlm.cli.serve import uvicorn_settings
        from livevlm.server.app import create_app

        self.app = create_app(model, options)
        self.worker = self.app.state.worker
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.http = f"http://127.0.0.1:{self.port}"
        self.ws = f"ws://127.0.0.1:{self.port}/v1/stream"
        self.server = uvicorn.Server(uvicorn.Config(self.app, **uvicorn_settings(options.limits)))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self) -> LiveServer:
        self.thread.start()
        deadline = time.monotonic() + TIMEOUT_S
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "the server did not start"
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=TIMEOUT_S)
        self.sock.close()


class ServeProcess:
    """`livevlm serve --port 0 …` in a subprocess; `ws`/`http` are read from its log line."""

    def __init__(self, *args: str) -> None:
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen([sys.executable, "-m", "livevlm.cli", "serve", "--port", "0", *args],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
                                     text=True, env=env)
        self.log: list[str] = []
        deadline = time.monotonic() + 120
        while True:
            line = self.proc.stderr.readline()
            assert line and time.monotonic() < deadline, f"serve did not start: {''.join(self.log)}"
            self.log.append(line)
            found = re.search(r"(ws://127\.0\.0\.1:\d+/v1/stream)", line)
            if found:
                self.ws = found.group(1)
                self.http = self.ws.replace("ws://", "http://").removesuffix("/v1/stream")
                break
        threading.Thread(target=self._drain, daemon=True).start()

    def _drain(self) -> None:
        for line in self.proc.stderr:
            self.log.append(line)

    def rss_kb(self) -> int:
        with open(f"/proc/{self.proc.pid}/status") as status:
            return next(int(line.split()[1]) for line in status if line.startswith("VmRSS:"))


def health(http: str, key: str | None = None, query_key: str | None = None) -> tuple[int, dict]:
    url = f"{http}/health" + (f"?key={query_key}" if query_key else "")
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {key}"} if key else {})
    try:
        with urllib.request.urlopen(request, timeout=10) as answer:
            return answer.status, json.loads(answer.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")


def wait_for_sessions(http: str, count: int, key: str | None = None) -> int:
    """Poll /health until it shows `count` sessions (bounded); returns the last count seen."""
    deadline = time.monotonic() + 10
    while True:
        seen = health(http, key)[1]["sessions"]
        if seen == count or time.monotonic() > deadline:
            return seen
        time.sleep(0.05)


def png(frame: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(frame).save(out, format="PNG", compress_level=1)
    return out.getvalue()


def make_frames(count: int, seed: int = 0, size: int = 32) -> list[np.ndarray]:
    """Deterministic frames: a moving bright square on noise, `[size, size, 3]` uint8."""
    rng = np.random.default_rng(seed)
    frames = []
    for i in range(count):
        frame = rng.integers(0, 60, (size, size, 3), dtype=np.uint8)
        x = (3 * i) % (size - 8)
        frame[8:16, x:x + 8] = (250, 40 + 10 * (i % 20), 40)
        frames.append(frame)
    return frames


def connect(url: str, **kwargs: Any):
    """A client connection, usable with or without `with` (websockets ≥ 17.1 warns on a bare `connect()`)."""
    from websockets.sync.client import connect as ws_connect

    return ws_connect(url, compression=None, open_timeout=10, proxy=None, max_size=2**24, **kwargs).__enter__()


def recv_json(ws, timeout: float = TIMEOUT_S) -> dict:
    return json.loads(ws.recv(timeout=timeout))


def close_code(ws, timeout: float = TIMEOUT_S) -> int | None:
    """Read until the server closes; its close code (None if it did not send one)."""
    from websockets.exceptions import ConnectionClosed

    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ws.recv(timeout=max(0.01, deadline - time.monotonic()))
    except ConnectionClosed as exc:
        return exc.rcvd.code if exc.rcvd is not None else None
    raise AssertionError("the server did not close the connection")


@dataclass
class SessionResult:
    messages: list[dict] = field(default_factory=list)
    close_code: int | None = None
    elapsed_s: float = 0.0  # first frame sent → summary received

    def of(self, kind: str) -> list[dict]:
        return [m for m in self.messages if m["type"] == kind]


def run_session(url: str, frames: list[bytes], start: dict | None = None, queries: dict[int, str] | None = None,
                window: int = 8, max_fps: float | None = None, on_message=None) -> SessionResult:
    """A well-behaved client: start, every frame (at most `window` unanswered, under `max_fps`), a query after
    frame i for each `queries[i]`, end; returns every message up to the close."""
    from websockets.exceptions import ConnectionClosed

    result = SessionResult()
    queries = queries or {}
    room = threading.Condition()
    unanswered = [0]
    with connect(url) as ws:
        ws.send(json.dumps({"type": "start", **(start or {})}))
        result.messages.append(recv_json(ws))
        assert result.messages[0]["type"] == "ready", result.messages[0]
        began = time.monotonic()

        def send_all() -> None:
            pace = 1.0 / (0.9 * max_fps) if max_fps else 0.0
            try:
                for i, data in enumerate(frames):
                    with room:
                        if not room.wait_for(lambda: unanswered[0] < window, timeout=TIMEOUT_S):
                            return
                        unanswered[0] += 1
                    ws.send(data)
                    if i in queries:
                        ws.send(json.dumps({"type": "query", "text": queries[i]}))
                    if pace:
                        time.sleep(pace)
                ws.send(json.dumps({"type": "end"}))
            except ConnectionClosed:  # the receiver reports how it ended
                return

        sender = threading.Thread(target=send_all, daemon=True)
        sender.start()
        deadline = time.monotonic() + TIMEOUT_S
        try:
            while time.monotonic() < deadline:
                message = recv_json(ws, timeout=max(0.01, deadline - time.monotonic()))
                result.messages.append(message)
                if on_message is not None:
                    on_message(ws, message)
                if message["type"] in ("frame", "dropped") or (message["type"] == "error" and "index" in message):
                    with room:
                        unanswered[0] -= message.get("count", 1)
                        room.notify_all()
                if message["type"] == "summary":
                    result.elapsed_s = time.monotonic() - began
        except ConnectionClosed as exc:
            result.close_code = exc.rcvd.code if exc.rcvd is not None else None
        sender.join(timeout=TIMEOUT_S)
    return result


def local_messages(model, frames, threshold, max_new_tokens, first_query=None, queries=None):
    """What the engine says on these frames run here, one frame per step, as (type, time, value) triples."""
    from livevlm.engine.session import FrameEvent, NoteEvent, QueryEvent, ResponseEvent

    session = model.session(threshold=threshold, max_new_tokens=max_new_tokens)
    tokens = model.encoder.encode(np.stack(frames))
    if first_query:
        session.add_query(first_query)
    events = []
    for i in range(len(frames)):
        events += session.step(tokens[i:i + 1], [i / model.fps])
        if i in (queries or {}):
            session.add_query(queries[i])
            events += session.flush()
    kinds = {FrameEvent: "frame", QueryEvent: "query", ResponseEvent: "response", NoteEvent: "note"}
    return [(kinds[type(e)], e.time_s, round(e.p_speak, 5) if isinstance(e, FrameEvent) else e.text) for e in events]


def as_triples(messages):
    return [(m["type"], m["time_s"], round(m["p_speak"], 5) if m["type"] == "frame" else m["text"])
            for m in messages if m["type"] in ("frame", "query", "response", "note")]
