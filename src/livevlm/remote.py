"""A client of `livevlm serve`: send a local file, camera or URL to a server and get the engine's events back.

    from livevlm.remote import stream_to_server

    stream = stream_to_server("ws://127.0.0.1:8000", "video.mp4", queries=[(0.0, "Please narrate.")])
    for event in stream:        # FrameEvent, QueryEvent, TextDelta, ResponseEvent, then a RemoteSummary
        ...
    stream.summary              # the server's summary (frames, fps, lag, responses, dropped)

The events are the engine's own types (`livevlm.engine.session`), as `LiveVLM.stream` yields them, so code
written for a local stream runs on a remote one; a response's text arrives word by word as `TextDelta`s
before its `ResponseEvent` (whose `token_ids` are empty: the protocol carries text). Frames are read here
at the server's fps and letterboxed to its image size (`video.read_frames`), sent as PNG (lossless: the
server sees the pixels a local run would) or JPEG (smaller, for slow links), on a thread of their own while
this thread receives. The sender keeps at most `queue_frames` frames unanswered and stays under
`max_fps` (both from the server's `ready`), so a file is never dropped from, as in a local run.
Prints nothing and changes no process setting; the protocol is in docs/server.md.
"""

from __future__ import annotations

import io
import json
import math
import threading
import time
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit, urlunsplit

import numpy as np

from livevlm.config import Query, check_queries, check_threshold

STREAM_PATH = "/v1/stream"
_POLL_S = 0.1  # how often a blocked sender checks that the stream still runs
_CLOSE_REASONS = {1008: "the server refused the API key (give it with --api-key, or LIVEVLM_API_KEY)",
                  1009: "a message was above the server's max_message_bytes",
                  1011: "the server failed", 1013: "the server is full (max_sessions); try again later"}


class ServerError(ConnectionError):
    """The server cannot be reached, refused the session or closed it early; the message says why."""


class ServerWarning(UserWarning):
    """An error message of the server that did not end the session (a refused frame or query)."""


@dataclass(frozen=True)
class TextDelta:
    """The next piece of the response being decoded (the pieces of one response add up to its text)."""

    text: str


@dataclass(frozen=True)
class RemoteSummary:
    """The server's summary of a finished session (`livevlm stream --jsonl`'s fields, and more)."""

    frames: int
    fps: float
    max_lag_s: float
    threshold: float
    device: str
    responses: int
    dropped: int
    elapsed_s: float


def stream_url(server: str) -> str:
    """`ws://host:port` (or http://…, or a full …/v1/stream URL) → the stream endpoint's ws(s) URL.

    Raises:
        ValueError: not a ws/wss/http/https URL with a host.
    """
    parts = urlsplit(server)
    scheme = {"ws": "ws", "wss": "wss", "http": "ws", "https": "wss"}.get(parts.scheme.lower())
    if scheme is None or not parts.hostname:
        raise ValueError(f"--server {server!r}: give the server's address as ws://HOST:PORT (wss:// behind TLS)")
    path = parts.path.rstrip("/") or STREAM_PATH
    return urlunsplit((scheme, parts.netloc, path, parts.query, ""))


def stream_to_server(server: str, source: str | int | Path, queries: Iterable[Query] = (), *,
                     threshold: float | None = None, fps: float | None = None, max_new_tokens: int | None = None,
                     system_prompt: str | None = None, api_key: str | None = None, realtime: bool = False,
                     image_format: Literal["png", "jpeg"] = "png", open_timeout_s: float = 10.0) -> RemoteStream:
    """Open a session on a `livevlm serve` server and the source; iterate the result to run it.

    Args:
        server: ws://HOST:PORT (the stream path is added) or the full stream URL.
        source: a video file, a camera (index or /dev/videoN) or a URL, read here.
        queries: `(time_s, text)` pairs, sent after the last frame shown at or before time_s.
        threshold, fps, max_new_tokens, system_prompt: the session's settings (None: the server's defaults).
        api_key: the server's key (sent as `Authorization: Bearer`).
        realtime: send frames at wall-clock pace (a file played "live"); cameras and URLs are live anyway.
        image_format: "png" (lossless) or "jpeg" (quality 90).
    Raises:
        ServerError: the server cannot be reached or refused the session (the message says why).
        VideoError: the source cannot be opened. ConfigError / ValueError: a bad setting.
    """
    from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidURI
    from websockets.sync.client import connect

    import livevlm.engine.pipeline  # noqa: F401  (the event types, imported before the session's clock runs)
    from livevlm.video import read_frames

    checked = check_queries(queries)
    check_threshold(threshold)
    if image_format not in ("png", "jpeg"):
        raise ValueError(f"image_format {image_format!r}: use 'png' or 'jpeg'")
    url = stream_url(server)
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else None
    try:  # entered as a context manager (websockets ≥ 17.1 deprecates a bare connect()); closed by close()
        ws = connect(url, additional_headers=headers, compression=None, open_timeout=open_timeout_s,
                     max_size=2**22, proxy=None).__enter__()
    except (OSError, TimeoutError, InvalidHandshake, InvalidURI) as exc:
        raise ServerError(f"cannot open a session on {url}: {exc}") from None
    start = {"type": "start", "fps": fps, "threshold": threshold, "max_new_tokens": max_new_tokens,
             "system": system_prompt}
    try:
        ws.send(json.dumps({k: v for k, v in start.items() if v is not None}))
        ready = json.loads(ws.recv(timeout=open_timeout_s + 30.0))
        if ready.get("type") != "ready":
            raise ServerError(f"the server refused the session: {ready.get('message', ready)}")
        frames = read_frames(source if isinstance(source, int) else str(source), fps=ready["fps"],
                             size=ready["image_size"], realtime=realtime, timeout_s=open_timeout_s,
                             resample=ready.get("resample", "bilinear"))
    except ConnectionClosed as exc:
        ws.close()
        raise ServerError(_closed(url, exc)) from None
    except TimeoutError:
        ws.close()
        raise ServerError(f"{url} did not answer the session's start within {open_timeout_s + 30:g} s") from None
    except BaseException:
        ws.close()
        raise
    return RemoteStream(ws, url, ready, frames, checked, image_format)


def _closed(url: str, exc: Any) -> str:
    received = getattr(exc, "rcvd", None)
    code, reason = (received.code, received.reason) if received is not None else (1006, "no close frame")
    why = _CLOSE_REASONS.get(code, reason or "no reason given")
    return f"{url} closed the session (code {code}: {why})"


class RemoteStream:
    """One session on a server. Iterate it for the events, once; `ask` adds a query from any thread while it
    runs; `summary` is set when the iteration ends. Breaking out of the loop or `close()` ends the session."""

    def __init__(self, ws: Any, url: str, ready: dict[str, Any], frames: Any, queries: list[Query],
                 image_format: str) -> None:
        self._ws = ws
        self.url = url
        self._frames = frames
        self._queries = sorted(queries)
        self._format = image_format
        self.session: str = ready["session"]
        self.fps: float = ready["fps"]
        self.threshold: float = ready["threshold"]
        self.device: str = ready.get("device", "")
        limits = ready.get("limits", {})
        self.window = max(1, int(limits.get("queue_frames", 8)))  # frames sent and not yet answered, at most
        self.max_fps = float(limits.get("max_fps", math.inf))
        self.summary: RemoteSummary | None = None
        self.errors: list[str] = []  # the server's error messages, in order
        self.dropped = 0
        self._lock = threading.Lock()  # one sender at a time (the frame thread, `ask`)
        self._room = threading.Condition()
        self._unanswered = 0
        self._stop = threading.Event()
        self._failure: BaseException | None = None
        self._sender = threading.Thread(target=self._send_loop, name="livevlm-client-send", daemon=True)
        self._started = False

    def __iter__(self) -> Iterator[Any]:
        if self._started:
            raise RuntimeError("a RemoteStream runs once; open another with stream_to_server")
        self._started = True
        self._sender.start()
        try:
            yield from self._receive()
        finally:
            self.close()

    def ask(self, text: str) -> None:
        """Send a query now; it enters the stream after the frames sent before it."""
        if not text.strip():
            raise ValueError("empty query")
        self._send_json({"type": "query", "text": text})

    def close(self) -> None:
        """End the session (idempotent): stop the sender, close the connection and the source."""
        self._stop.set()
        with self._room:
            self._room.notify_all()
        self._ws.close()
        if self._sender.ident is not None and self._sender is not threading.current_thread():
            self._sender.join(timeout=10.0)
        self._frames.close()

    # -- receiving (the caller's thread) --------------------------------------------------------------

    def _receive(self) -> Iterator[Any]:
        from websockets.exceptions import ConnectionClosed

        from livevlm.engine.session import FrameEvent, NoteEvent, QueryEvent, ResponseEvent

        while True:
            try:
                message = json.loads(self._ws.recv())
            except ConnectionClosed as exc:
                if self._failure is not None:
                    raise self._failure from None
                if self.summary is not None:
                    return
                last = f"; its last error: {self.errors[-1]}" if self.errors else ""
                raise ServerError(_closed(self.url, exc) + last) from None
            kind = message.get("type")
            if kind == "frame":
                self._answered(1)
                yield FrameEvent(message["time_s"], message["p_speak"])
            elif kind == "delta":
                yield TextDelta(message["text"])
            elif kind == "response":
                yield ResponseEvent(message["time_s"], message["text"], (), message["latency_s"],
                                    message.get("reason", "eos"), message.get("answer_to_query", False))
            elif kind == "query":
                yield QueryEvent(message["time_s"], message["text"])
            elif kind == "note":
                yield NoteEvent(message["time_s"], message["text"], (), message["answered"], message["latency_s"])
            elif kind == "dropped":
                self.dropped += message["count"]
                self._answered(message["count"])
            elif kind == "error":
                self.errors.append(message["message"])
                if message.get("index") is not None:
                    self._answered(1)
                warnings.warn(f"server: {message['message']}", ServerWarning, stacklevel=2)
            elif kind == "summary":
                fields = {name: message[name] for name in RemoteSummary.__dataclass_fields__}
                self.summary = RemoteSummary(**fields)
                yield self.summary

    def _answered(self, count: int) -> None:
        with self._room:
            self._unanswered -= count
            self._room.notify_all()

    # -- sending (a thread) ---------------------------------------------------------------------------

    def _send_loop(self) -> None:
        try:
            pace = 1.0 / (0.95 * self.max_fps)  # under the server's max_fps, whose bucket absorbs jitter
            next_at = time.monotonic()
            for index, (time_s, frame) in enumerate(self._frames):
                self._send_due_queries(time_s)
                if not self._wait_for_room():
                    return
                delay = next_at - time.monotonic()
                if delay > 0 and self._stop.wait(delay):
                    return
                next_at = max(next_at + pace, time.monotonic())
                data = self._encode(frame)
                with self._lock:
                    if not math.isclose(time_s, index / self.fps, rel_tol=0.0, abs_tol=1e-9):
                        self._ws.send(json.dumps({"type": "frame", "time_s": time_s}))
                    with self._room:
                        self._unanswered += 1
                    self._ws.send(data)
            self._send_due_queries(math.inf)
            self._send_json({"type": "end"})
        except BaseException as exc:  # noqa: BLE001  (re-raised on the caller's thread)
            if not self._stop.is_set():
                self._failure = exc
                self._ws.close()

    def _send_due_queries(self, frame_time_s: float) -> None:
        """Queries at t go after the last frame shown at or before t (as `engine.pipeline.query_is_due`)."""
        from livevlm.engine.pipeline import query_is_due

        while self._queries and query_is_due(self._queries[0][0], frame_time_s):
            time_s, text = self._queries.pop(0)
            self._send_json({"type": "query", "text": text, "time_s": time_s})

    def _wait_for_room(self) -> bool:
        with self._room:
            while self._unanswered >= self.window:
                if self._stop.is_set():
                    return False
                self._room.wait(_POLL_S)
        return not self._stop.is_set()

    def _send_json(self, message: dict[str, Any]) -> None:
        from websockets.exceptions import ConnectionClosed

        try:
            with self._lock:
                self._ws.send(json.dumps(message))
        except ConnectionClosed as exc:
            raise ServerError(_closed(self.url, exc)) from None

    def _encode(self, frame: np.ndarray) -> bytes:
        from PIL import Image

        out = io.BytesIO()
        if self._format == "png":
            Image.fromarray(frame).save(out, format="PNG", compress_level=1)
        else:
            Image.fromarray(frame).save(out, format="JPEG", quality=90)
        return out.getvalue()
