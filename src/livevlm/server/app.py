"""The FastAPI app of `livevlm serve`: the page, `/health` and the `/v1/stream` WebSocket around a `ModelWorker`.

    GET /            the page (server/static/index.html, with its style.css and app.js): public, see below
    GET /health      {"status": "ok", "sessions", "max_sessions", "model", "device"}
    WS  /v1/stream   one session per connection (protocol: docs/server.md)

API key (`api_key`): `/health` and `/v1/stream` need it, as `Authorization: Bearer KEY` or `?key=KEY`
(a browser cannot set headers on a WebSocket). A missing or wrong key gets 401 (HTTP) or close code 1008
(WebSocket, accepted then closed at once: a browser sees no HTTP status) before any work. The page and
its files stay public: they are static code that can do nothing without the key, and the page reads the
key from its own URL (`/?key=KEY`) or its key field.

Each connection has two tasks: the receiver parses client messages (images are decoded on a small thread
pool, off the event loop) and feeds the worker; the sender writes the worker's messages, which arrive
through `loop.call_soon_threadsafe` on an asyncio queue, and closes the connection when told to.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, Request, WebSocket
from fastapi.responses import JSONResponse
from fastapi.staticfiles import StaticFiles
from starlette.websockets import WebSocketState

from livevlm.config import DecodeMode
from livevlm.server import protocol
from livevlm.server.worker import CloseConnection, ModelWorker, ServerFull, WorkerSession

if TYPE_CHECKING:
    from livevlm.api import LiveVLM

log = logging.getLogger(__name__)

STATIC = Path(__file__).parent / "static"
MAX_OUTBOX = 10_000  # messages waiting for a client that does not read; past it the session is closed
_CLOSE_WAIT_S = 5.0  # how long the sender may take to flush and close after the receiver stopped

# close codes (RFC 6455 and the IANA registry)
NORMAL, POLICY, TOO_BIG, INTERNAL, TRY_LATER = 1000, 1008, 1009, 1011, 1013


@dataclass(frozen=True)
class ServerOptions:
    """What `create_app` needs besides the model.

    model_name: shown by /health ("default" or the checkpoint folder).
    api_key: required on /health and /v1/stream when set (None: no key).
    max_frames_per_forward: frames of one session per LLM forward when it catches up.
    decode: how every session decodes response tokens (`EngineConfig.decode`: eager, static, compiled).
    decode_threads: threads that decode images (PIL releases the GIL while it decodes).
    worker_threads: torch threads of each worker thread (None: half the usable cores).
    batch_sessions: the sessions' frames in one batched LLM forward (`ModelWorker`; for a GPU serving many
        streams); every session's KV budget is allocated at start.
    """

    limits: protocol.ServerLimits = protocol.ServerLimits()
    model_name: str = "default"
    api_key: str | None = None
    max_frames_per_forward: int = 8
    decode: DecodeMode = "eager"
    decode_threads: int = 2
    worker_threads: int | None = None
    batch_sessions: bool = False


def create_app(model: LiveVLM, options: ServerOptions = ServerOptions()) -> FastAPI:
    """The app serving `model` (loaded; its frame encoder is loaded here). The worker threads run while the
    app's lifespan does (uvicorn starts and stops them)."""
    worker = ModelWorker(model, options.limits, max_frames_per_forward=options.max_frames_per_forward,
                         threads=options.worker_threads, decode=options.decode,
                         batch_sessions=options.batch_sessions)
    decoder = ThreadPoolExecutor(max_workers=options.decode_threads, thread_name_prefix="livevlm-serve-decode")

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        worker.start()
        try:
            yield
        finally:
            worker.stop()
            decoder.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="livevlm", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.worker = worker

    @app.get("/health")
    async def health(request: Request) -> JSONResponse:
        if not _authorized(options.api_key, request.headers, request.query_params):
            return JSONResponse({"detail": "missing or wrong API key (Authorization: Bearer KEY, or ?key=KEY)"},
                                status_code=401, headers={"WWW-Authenticate": "Bearer"})
        return JSONResponse({"status": "ok", "sessions": worker.count, "max_sessions": options.limits.max_sessions,
                             "model": options.model_name, "device": worker.device})

    @app.websocket("/v1/stream")
    async def stream(websocket: WebSocket) -> None:
        await websocket.accept()
        if not _authorized(options.api_key, websocket.headers, websocket.query_params):
            await websocket.close(POLICY, "missing or wrong API key")
            return
        await _Connection(websocket, worker, options.limits, decoder).run()

    app.mount("/", StaticFiles(directory=STATIC, html=True, check_dir=False), name="page")
    return app


def _authorized(api_key: str | None, headers: Any, query: Any) -> bool:
    if not api_key:
        return True
    given = query.get("key") or ""
    auth = headers.get("authorization") or ""
    if auth[:7].lower() == "bearer ":
        given = auth[7:].strip()
    return hmac.compare_digest(given.encode(), api_key.encode())


class _Connection:
    """One WebSocket session: the receiver (this task) and the sender (a task of its own)."""

    def __init__(self, websocket: WebSocket, worker: ModelWorker, limits: protocol.ServerLimits,
                 decoder: ThreadPoolExecutor) -> None:
        self.websocket, self.worker, self.limits, self.decoder = websocket, worker, limits, decoder
        self.loop = asyncio.get_running_loop()
        self.outbox: asyncio.Queue[dict[str, Any] | CloseConnection] = asyncio.Queue()
        self.overflow = False
        self.session: WorkerSession | None = None
        self.index = 0  # of the next binary message (frame)
        self.next_time: float | None = None  # from a "frame" message, for the next binary message
        self.last_time = -1.0
        self.tokens = self.burst = max(1.0, limits.max_fps)  # rate limit: a bucket of one second's worth
        self.refilled = time.monotonic()
        self.closing = False  # a close is queued: read no more

    async def run(self) -> None:
        try:
            self.session = self.worker.connect(self.send)
        except ServerFull as exc:
            await self.websocket.send_json(protocol.error(str(exc)))
            await self.websocket.close(TRY_LATER, "max_sessions reached")
            return
        sender = asyncio.create_task(self._send_loop())
        try:
            disconnected = await self._receive_loop()
            if disconnected:
                sender.cancel()
            else:  # a close is queued behind the last messages: let the sender deliver them
                await asyncio.wait_for(sender, _CLOSE_WAIT_S)
        except (TimeoutError, asyncio.CancelledError):
            sender.cancel()
        finally:
            self.worker.close(self.session)  # a client that left frees its session at once

    # -- out -----------------------------------------------------------------------------------------

    def send(self, message: dict[str, Any] | CloseConnection) -> None:
        """Thread-safe: queue a message for the client (the worker calls this from its threads)."""
        try:
            self.loop.call_soon_threadsafe(self._deliver, message)
        except RuntimeError:  # the event loop is closed: the server is shutting down
            pass

    def _deliver(self, message: dict[str, Any] | CloseConnection) -> None:
        if self.outbox.qsize() >= MAX_OUTBOX and not isinstance(message, CloseConnection):
            if not self.overflow:
                self.overflow = True
                self.outbox.put_nowait(CloseConnection(POLICY, f"the client does not read its messages "
                                                               f"({MAX_OUTBOX} waiting)"))
            return
        self.outbox.put_nowait(message)

    def _close(self, code: int, reason: str, message: str | None = None) -> None:
        if message is not None:
            self.outbox.put_nowait(protocol.error(message))
        self.outbox.put_nowait(CloseConnection(code, reason))
        self.closing = True

    async def _send_loop(self) -> None:
        try:
            while True:
                message = await self.outbox.get()
                if isinstance(message, CloseConnection):
                    if self.session is not None:
                        self.worker.close(self.session)
                    if self.websocket.application_state == WebSocketState.CONNECTED:
                        await self.websocket.close(message.code, message.reason)
                    return
                await self.websocket.send_json(message)
        except Exception:  # noqa: BLE001  (the client went away while we wrote: the receiver sees it)
            return

    # -- in ------------------------------------------------------------------------------------------

    async def _receive_loop(self) -> bool:
        """Read until the client leaves (returns True) or a close is queued (False)."""
        while not self.closing:
            try:
                message = await asyncio.wait_for(self.websocket.receive(), self.limits.idle_timeout_s)
            except TimeoutError:
                if self.session is not None and self.worker.busy(self.session):
                    continue
                self._close(NORMAL, "idle timeout", f"no message for {self.limits.idle_timeout_s:g} s "
                                                    f"(the limit idle_timeout_s): the session is closed")
                return False
            if message["type"] == "websocket.disconnect":
                return True
            if self.overflow:
                return False
            try:
                if message.get("text") is not None:
                    await self._on_text(message["text"])
                elif message.get("bytes") is not None:
                    await self._on_frame(message["bytes"])
            except protocol.ProtocolError as exc:
                self.outbox.put_nowait(protocol.error(str(exc), exc.index))
            except ValueError as exc:  # a value the model cannot take (ConfigError, StreamFormatError)
                self.outbox.put_nowait(protocol.error(str(exc)))
        return False

    async def _on_text(self, raw: str) -> None:
        message = protocol.parse_text(raw, self.limits)
        session = self.session
        assert session is not None
        if isinstance(message, protocol.Start):
            if session.started:
                raise protocol.ProtocolError("the session has already started (one start per connection)")
            try:
                await self.loop.run_in_executor(self.decoder, self.worker.begin, session, message)
            except ServerFull as exc:  # --batch-sessions: every row still held by a finishing session
                self.outbox.put_nowait(protocol.error(str(exc)))
                self.outbox.put_nowait(CloseConnection(TRY_LATER, "no free row"))
                return
            encoder = self.worker.encoder
            self.outbox.put_nowait(protocol.ready(session.id, session.fps, session.threshold, encoder.image_size,
                                                  encoder.resample, self.worker.device, self.limits))
            return
        if not session.started:
            raise protocol.ProtocolError(f'a "{type(message).__name__.lower()}" message before "start": send '
                                         '{"type": "start"} first')
        if session.ended:
            raise protocol.ProtocolError("the session has ended (its summary is on the way)")
        if isinstance(message, protocol.FrameTime):
            self.next_time = message.time_s
        elif isinstance(message, protocol.Query):
            self.worker.add_query(session, message.text, message.time_s)
        else:
            self.worker.end(session)

    async def _on_frame(self, data: bytes) -> None:
        session = self.session
        assert session is not None
        if not session.started:
            raise protocol.ProtocolError('a frame before "start": send {"type": "start"} first')
        if session.ended:
            raise protocol.ProtocolError("the session has ended (its summary is on the way)")
        index, self.index = self.index, self.index + 1
        time_s = self.next_time if self.next_time is not None else index / session.fps
        self.next_time = None
        if time_s <= self.last_time:
            raise protocol.ProtocolError(f"frame {index} at {time_s:g} s is not after the previous frame "
                                         f"({self.last_time:g} s): frame times must increase", index)
        if not self._take_token():
            raise protocol.ProtocolError(f"frame {index} refused: frames arrive faster than the limit "
                                         f"max_fps={self.limits.max_fps:g} per second", index)
        try:
            pixels = await self.loop.run_in_executor(self.decoder, protocol.decode_image, data, self.limits,
                                                     self.worker.encoder.image_size, self.worker.encoder.resample)
        except protocol.ProtocolError as exc:
            raise protocol.ProtocolError(f"frame {index} refused: {exc}", index) from None
        self.last_time = time_s
        dropped = self.worker.add_frame(session, index, time_s, pixels)
        if dropped is not None:
            self.outbox.put_nowait(protocol.dropped(1, dropped))

    def _take_token(self) -> bool:
        now = time.monotonic()
        rate = self.limits.max_fps
        self.tokens = min(self.burst, self.tokens + (now - self.refilled) * rate)
        self.refilled = now
        if self.tokens < 1.0:
            return False
        self.tokens -= 1.0
        return True
