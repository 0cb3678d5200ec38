"""The model worker of `livevlm serve`: one model in memory, many sessions, each with its own engine state.

Two threads share the model, as the stages of `engine.pipeline` do for one stream (so that frame encoding
overlaps the LLM, as it does in `livevlm stream`):

    connection (event loop): decoded frames [S, S, 3] and queries → session.waiting (≤ queue_frames frames)
    encoder thread: round robin over the sessions; all of one session's waiting frames (≤ max_batch) in one
                    `encoder.encode` call → session.encoded
    LLM thread:     round robin over the sessions, one engine step at a time: `step_events` / `flush_events`
                    are generators and each `next` runs at most one LLM forward, so one session's long
                    response is interleaved, token by token, with the other sessions' frames
    events → protocol messages → `session.send` (thread-safe: it hands them to the connection)

With `batch_sessions` the LLM thread forwards the frames of every session that has some in one batched
forward (`engine.batch.SessionBatch`: each session a row of one KV cache): a round takes each ready
session's encoded frames and runs them together, a session's response is still decoded alone (token by
token, interleaved with the sessions outside the round: their queries and ends), and the next round starts
when this one is done. Each session says what it says alone (p_speak up to summation order). A GPU serving
many cameras gains the most (one small forward costs about what K do); the rows hold every session's full
KV budget from the start (~380 MB a session for the default model in float32, at SmolLM2's 8k tokens).

Overflow policy: a session may have `queue_frames` frames waiting to be encoded; a frame arriving past that
drops the oldest waiting frame, which is counted and reported (`dropped`). Queries travel in the same queue
as frames, so a query enters the stream after the frames that arrived before it, and one that arrives
while nothing is waiting is answered at once. Only the LLM thread touches a session's engine state; a
closed session is unlinked at once, and its state is freed when the LLM thread next looks at it (within
one forward).
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from livevlm.config import DecodeMode, EngineConfig
from livevlm.detokenize import TextDeltas
from livevlm.engine.batch import SessionBatch
from livevlm.engine.session import Event, FrameEvent, NoteEvent, QueryEvent, ResponseEvent, StreamSession, TokenEvent
from livevlm.server import protocol

if TYPE_CHECKING:
    from livevlm.api import LiveVLM

log = logging.getLogger(__name__)

_WAIT_S = 0.5  # how often an idle worker thread checks the stop flag
_JOIN_S = 10.0
_ROW_WAIT_S = 30.0  # how long a new batched session waits for the row of a closed one to be freed


class ServerFull(RuntimeError):
    """`max_sessions` sessions are open."""


@dataclass(frozen=True)
class CloseConnection:
    """Sent after a session's last message: close the connection with this code."""

    code: int
    reason: str


Send = Callable[[dict[str, Any] | CloseConnection], None]


@dataclass
class _Frame:
    index: int
    time_s: float
    arrived: float  # time.monotonic() when it was queued (lag = decision time - arrival)
    pixels: np.ndarray  # [S, S, 3] uint8


@dataclass
class _Query:
    text: str
    time_s: float | None


@dataclass
class _Encoded:
    indices: list[int]
    times: list[float]
    arrived: list[float]
    tokens: torch.Tensor  # [T, N, D]


_FINISH = object()  # the LLM thread's work item for an ended session whose queues are empty


class WorkerSession:
    """One connection's state. The connection calls the worker's methods with it; the worker's threads own
    its engine state (`engine`, `events`, the counters)."""

    def __init__(self, session_id: str, send: Send) -> None:
        self.id = session_id
        self.send = send
        self.engine: StreamSession | None = None
        self.deltas: TextDeltas | None = None
        self.fps = 0.0
        self.threshold = 0.0
        self.waiting: deque[_Frame | _Query] = deque()  # decoded, not yet encoded
        self.waiting_frames = 0
        self.waiting_queries = 0  # queries that have not entered the stream yet (no QueryEvent)
        self.encoded: deque[_Encoded | _Query] = deque()
        self.encoded_frames = 0
        self.encoding = False
        self.last_pixels: np.ndarray | None = None  # the last frame encoded: the encoder's `previous` (change_hues)
        self.events: Iterator[Event] | None = None  # the engine step in progress
        self.in_step: deque[tuple[int, float]] = deque()  # (index, arrival) of the frames being stepped
        self.in_round = False  # batch_sessions: its frames are in the batched round in progress
        self.ended = self.finished = self.closed = False
        self.frames = self.responses = self.dropped = 0
        self.max_lag_s = 0.0
        self.began: float | None = None  # when the first frame arrived (the summary's fps counts from it)

    @property
    def started(self) -> bool:
        return self.engine is not None


class ModelWorker:
    """Runs every session of one model: see the module docstring. `start()` the threads, `stop()` them.

    Args:
        model: the loaded model (its frame encoder is loaded here, not on the first frame).
        limits: the server's limits (`max_sessions`, `queue_frames`, `max_new_tokens` are used here).
        max_frames_per_forward: frames of one session in one LLM forward when it catches up.
        max_batch: the most frames of one session encoded in one call.
        threads: torch intra-op threads of each of the two threads (None: half the usable cores, at least 1).
        decode: how every session decodes response tokens (`EngineConfig.decode`); checked here, not at the
            first session's start.
        batch_sessions: the sessions' frame forwards batched (see the module docstring); their rows, one per
            `limits.max_sessions`, are allocated here.
    Raises:
        ConfigError: an unknown `decode`. ValueError: `batch_sessions` with an LLM that cannot batch them
            (sliding-window layers, an attention without 4D masks).
    """

    def __init__(self, model: LiveVLM, limits: protocol.ServerLimits, *, max_frames_per_forward: int = 8,
                 max_batch: int = 16, threads: int | None = None, decode: DecodeMode = "eager",
                 batch_sessions: bool = False) -> None:
        from livevlm.runtime import stage_threads

        self.model = model
        self.encoder = model.encoder
        self.device = model.runs_on
        self.limits = limits
        self.max_frames_per_forward = max_frames_per_forward
        self.max_batch = max_batch
        self.decode = EngineConfig(decode=decode).decode  # EngineConfig's own check: ConfigError on a bad mode
        self.threads = threads or stage_threads()
        self._cond = threading.Condition()
        self._sessions: dict[str, WorkerSession] = {}
        self._stop = threading.Event()
        # batch_sessions: the rows; the round in progress (its events tagged by row) and its sessions by row;
        # the sessions holding a row (a closed one until the LLM thread frees it).
        self.batch = SessionBatch(model.model, model.fmt, rows=limits.max_sessions) if batch_sessions else None
        self._round: Iterator[tuple[int, Event]] | None = None
        self._round_sessions: dict[int, WorkerSession] = {}
        self._holding: list[WorkerSession] = []
        llm_loop = self._batched_llm_loop if batch_sessions else self._llm_loop
        self._threads = [threading.Thread(target=self._encoder_loop, name="livevlm-serve-encoder", daemon=True),
                         threading.Thread(target=llm_loop, name="livevlm-serve-llm", daemon=True)]

    # -- the connection's side -----------------------------------------------------------------------

    @property
    def count(self) -> int:
        """Open sessions (started or not)."""
        with self._cond:
            return len(self._sessions)

    def connect(self, send: Send) -> WorkerSession:
        """Reserve a session for a new connection. Raises ServerFull at `max_sessions`."""
        with self._cond:
            if len(self._sessions) >= self.limits.max_sessions:
                raise ServerFull(f"the server is full: {len(self._sessions)} sessions are open (the limit "
                                 f"max_sessions={self.limits.max_sessions}); try again later")
            session = WorkerSession(secrets.token_hex(8), send)
            self._sessions[session.id] = session
            return session

    def begin(self, session: WorkerSession, start: protocol.Start) -> None:
        """Give the session its engine state from a `start` message.

        Raises:
            ValueError (ConfigError, StreamFormatError): a value the model cannot take.
        """
        config = self.model.engine_config(start.threshold, start.max_new_tokens or 64, self.max_frames_per_forward,
                                          realtime=False, decode=self.decode)
        if start.query is not None:
            self.model.fmt.query_ids(start.query, run_open=False)  # checked before a row is taken
        if self.batch is None:
            engine = StreamSession(self.model.model, self.model.fmt, config, system_prompt=start.system)
        else:
            engine = self._add_to_batch(session, config, start.system)
        if start.query is not None:
            engine.add_query(start.query)  # answered after the first frame
        with self._cond:
            session.fps = start.fps or self.model.fps
            session.threshold = engine.config.threshold
            session.deltas = TextDeltas(self.model.fmt.tokenizer)
            session.waiting_queries = int(start.query is not None)
            session.engine = engine

    def add_frame(self, session: WorkerSession, index: int, time_s: float, pixels: np.ndarray) -> int | None:
        """Queue a decoded frame `[S, S, 3]`; returns the index of the waiting frame dropped for it, if any."""
        dropped = None
        with self._cond:
            if session.closed:
                return None
            if session.waiting_frames >= self.limits.queue_frames:
                for k, item in enumerate(session.waiting):
                    if isinstance(item, _Frame):
                        dropped = item.index
                        del session.waiting[k]
                        break
                session.waiting_frames -= 1
                session.dropped += 1
            now = time.monotonic()
            if session.began is None:
                session.began = now
            session.waiting.append(_Frame(index, time_s, now, pixels))
            session.waiting_frames += 1
            self._cond.notify_all()
        return dropped

    def add_query(self, session: WorkerSession, text: str, time_s: float | None = None) -> None:
        """Queue a query after the frames that came before it.

        Raises:
            ProtocolError: `queue_queries` queries are waiting already (each costs a whole response).
            StreamFormatError: an empty text.
        """
        self.model.fmt.query_ids(text, run_open=False)  # checked now, not on the LLM thread
        with self._cond:
            if session.waiting_queries >= self.limits.queue_queries:
                raise protocol.ProtocolError(f"query refused: {session.waiting_queries} queries of this session "
                                             f"wait for an answer (the limit queue_queries="
                                             f"{self.limits.queue_queries})")
            session.waiting_queries += 1
            if session.waiting or session.encoding:  # frames ahead of it: it follows them
                session.waiting.append(_Query(text, time_s))
            else:  # nothing ahead: straight to the LLM, which answers it at once
                session.encoded.append(_Query(text, time_s))
            self._cond.notify_all()

    def end(self, session: WorkerSession) -> None:
        """No more input: finish what is queued, then send the summary and close."""
        with self._cond:
            session.ended = True
            self._cond.notify_all()

    def busy(self, session: WorkerSession) -> bool:
        """Whether the session has work waiting or running (it is not idle, whatever its client sends)."""
        with self._cond:
            return bool(session.waiting or session.encoded or session.encoding or session.events is not None
                        or session.in_round or (session.ended and not session.finished))

    def close(self, session: WorkerSession) -> None:
        """The connection is gone: unlink the session now (idempotent). Its state is freed once no thread
        holds it (the LLM thread lets go within one forward)."""
        with self._cond:
            session.closed = True
            self._sessions.pop(session.id, None)
            session.waiting.clear()
            session.encoded.clear()
            session.events = None
            self._cond.notify_all()

    # -- lifecycle -----------------------------------------------------------------------------------

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def stop(self) -> None:
        """Stop both threads (each finishes the forward it is in)."""
        self._stop.set()
        with self._cond:
            self._cond.notify_all()
        for thread in self._threads:
            if thread.ident is not None:
                thread.join(timeout=_JOIN_S)

    # -- scheduling ----------------------------------------------------------------------------------

    def _next(self, ready: Callable[[WorkerSession], bool], last: str | None) -> WorkerSession | None:
        """The first session after `last` (round robin, in connection order) that has work. Under the lock."""
        sessions = list(self._sessions.values())
        ids = [s.id for s in sessions]
        first = ids.index(last) + 1 if last in ids else 0
        for k in range(len(sessions)):
            session = sessions[(first + k) % len(sessions)]
            if ready(session):
                return session
        return None

    def _wait_for(self, ready: Callable[[WorkerSession], bool], last: str | None) -> WorkerSession | None:
        """Block (on the condition, never spinning) until a session has work; None when stopping. Under the lock."""
        while not self._stop.is_set():
            session = self._next(ready, last)
            if session is not None:
                return session
            self._cond.wait(_WAIT_S)
        return None

    def _fail(self, session: WorkerSession, what: str, error: BaseException) -> None:
        log.error("session %s: %s failed: %s", session.id, what, error, exc_info=error)
        with self._cond:
            session.closed = True
            self._sessions.pop(session.id, None)
            session.events = None
            self._cond.notify_all()
        session.send(protocol.error(f"{what} failed on the server ({type(error).__name__}: {error}); "
                                    "the session is closed"))
        session.send(CloseConnection(1011, f"{what} failed"))

    # -- the encoder thread --------------------------------------------------------------------------

    def _encoder_ready(self, session: WorkerSession) -> bool:
        # Encoded frames wait for the LLM up to queue_frames: the encoder runs ahead while a response is decoded.
        return not session.closed and bool(session.waiting) and session.encoded_frames < self.limits.queue_frames

    def _encoder_loop(self) -> None:
        torch.set_num_threads(self.threads)  # this thread's own count
        last = None
        while True:
            with self._cond:
                session = self._wait_for(self._encoder_ready, last)
                if session is None:
                    return
                last = session.id
                frames = self._take_waiting(session)
                session.encoding = bool(frames)
                self._cond.notify_all()
            if not frames:
                continue
            try:
                with torch.no_grad():  # frames [T, H, W, 3] → tokens [T, N, D]
                    tokens = self.encoder.encode(np.stack([frame.pixels for frame in frames]),
                                                 previous=session.last_pixels)
                session.last_pixels = frames[-1].pixels
            except Exception as error:  # noqa: BLE001  (one session fails, the server goes on)
                self._fail(session, "frame encoding", error)
                continue
            with self._cond:
                session.encoding = False
                if not session.closed:
                    session.encoded.append(_Encoded([f.index for f in frames], [f.time_s for f in frames],
                                                    [f.arrived for f in frames], tokens))
                    session.encoded_frames += len(frames)
                self._cond.notify_all()

    def _take_waiting(self, session: WorkerSession) -> list[_Frame]:
        """Pass the leading queries on; take the frames that follow (≤ max_batch, up to the next query)."""
        frames: list[_Frame] = []
        while session.waiting:
            item = session.waiting[0]
            if isinstance(item, _Query):
                if frames:
                    break
                session.encoded.append(session.waiting.popleft())
                continue
            if len(frames) >= self.max_batch:
                break
            frames.append(session.waiting.popleft())  # type: ignore[arg-type]
            session.waiting_frames -= 1
        return frames

    # -- the LLM thread ------------------------------------------------------------------------------

    def _llm_ready(self, session: WorkerSession) -> bool:
        if session.closed or session.finished or session.engine is None:
            return False
        drained = not (session.waiting or session.encoding or session.encoded)
        return session.events is not None or bool(session.encoded) or (session.ended and drained)

    def _llm_loop(self) -> None:
        torch.set_num_threads(self.threads)
        last = None
        while True:
            with self._cond:
                session = self._wait_for(self._llm_ready, last)
                if session is None:
                    return
                last = session.id
                events = session.events
                work = self._take_encoded(session) if events is None else None
            self._serve_alone(session, events, work)

    def _serve_alone(self, session: WorkerSession, events: Iterator[Event] | None, work: Any) -> None:
        """One step of one session: its end, or one event of its step in progress, or of the step `work` begins."""
        try:
            if work is _FINISH:
                self._finish(session)
                return
            if work is not None:
                events = self._begin_step(session, work)
            if events is not None:
                self._advance(session, events)
        except Exception as error:  # noqa: BLE001  (one session fails, the server goes on)
            self._fail(session, "the model", error)

    def _take_encoded(self, session: WorkerSession) -> Any:
        """The next work item: a query, every encoded frame up to the next query (merged), or _FINISH."""
        if not session.encoded:
            return _FINISH
        item = session.encoded.popleft()
        if isinstance(item, _Query):
            return item
        batch = [item]
        while session.encoded and isinstance(session.encoded[0], _Encoded):
            batch.append(session.encoded.popleft())  # type: ignore[arg-type]
        session.encoded_frames -= sum(len(b.indices) for b in batch)
        self._cond.notify_all()  # room for the encoder
        if len(batch) == 1:
            return item
        return _Encoded([i for b in batch for i in b.indices], [t for b in batch for t in b.times],
                        [a for b in batch for a in b.arrived], torch.cat([b.tokens for b in batch]))

    def _begin_step(self, session: WorkerSession, work: _Encoded | _Query) -> Iterator[Event]:
        engine = session.engine
        assert engine is not None
        if isinstance(work, _Query):
            engine.add_query(work.text, work.time_s)
            events = engine.flush_events()  # answers now, or after the first frame if none was seen
        else:
            session.in_step.extend(zip(work.indices, work.arrived, strict=True))
            events = engine.step_events(work.tokens, work.times)
        with self._cond:
            if session.closed:
                return iter(())
            session.events = events
        return events

    def _advance(self, session: WorkerSession, events: Iterator[Event]) -> None:
        """One event of the step in progress (at most one forward), sent as a message."""
        try:
            event = next(events)
        except StopIteration:
            with self._cond:
                if session.events is events:
                    session.events = None
            return
        self._send_event(session, event)

    def _send_event(self, session: WorkerSession, event: Event) -> None:
        """An engine event as its protocol message, unless the session is closed (its events are dropped)."""
        if session.closed:
            return
        message = self._message(session, event)
        if message is not None:
            session.send(message)

    def _message(self, session: WorkerSession, event: Event) -> dict[str, Any] | None:
        assert session.deltas is not None
        if isinstance(event, FrameEvent):
            index, arrived = session.in_step.popleft()
            session.frames += 1
            session.max_lag_s = max(session.max_lag_s, time.monotonic() - arrived)
            return protocol.frame(index, event.time_s, event.p_speak)
        if isinstance(event, TokenEvent):
            text = session.deltas.add(event.token_id)
            return protocol.delta(text) if text else None
        if isinstance(event, ResponseEvent):
            # What the deltas held back (a trailing half character, whitespace) goes out before the response,
            # so that the deltas add up to its text whenever they are a prefix of it.
            if rest := session.deltas.finish(event.text):
                session.send(protocol.delta(rest))
            session.responses += 1
            return protocol.response(event.time_s, event.text, event.latency_s, event.answer_to_query, event.reason)
        if isinstance(event, QueryEvent):
            with self._cond:
                session.waiting_queries -= 1
            return protocol.query(event.time_s, event.text)
        if isinstance(event, NoteEvent):
            return protocol.note(event.time_s, event.text, event.answered, event.latency_s)
        raise TypeError(f"unknown engine event {event!r}")

    # -- the LLM thread, batch_sessions ----------------------------------------------------------------

    def _add_to_batch(self, session: WorkerSession, config: EngineConfig, system_prompt: str | None) -> StreamSession:
        """The session's engine on a free row. A closed session's row is freed by the LLM thread (within one
        round), so a new connection may wait for it."""
        assert self.batch is not None
        deadline = time.monotonic() + _ROW_WAIT_S
        with self._cond:
            while not self.batch.free_rows:
                if self._stop.is_set() or time.monotonic() > deadline:
                    raise ServerFull(f"every one of the {len(self.batch.sessions)} batched rows is held by a session "
                                     "that is still finishing; try again later")
                self._cond.wait(_WAIT_S)
            engine = self.batch.add(config, system_prompt=system_prompt)
            self._holding.append(session)
            return engine

    def _alone_ready(self, session: WorkerSession) -> bool:
        """Work of its own: a step in progress, a query to answer, or its end (its frames go to rounds)."""
        if session.closed or session.finished or session.engine is None or session.in_round:
            return False
        if session.events is not None:
            return True
        if session.encoded:
            return isinstance(session.encoded[0], _Query)
        return session.ended and not (session.waiting or session.encoding)

    def _round_ready(self, session: WorkerSession) -> bool:
        return (not (session.closed or session.finished or session.in_round) and session.engine is not None
                and session.events is None and bool(session.encoded) and isinstance(session.encoded[0], _Encoded))

    def _batched_llm_loop(self) -> None:
        torch.set_num_threads(self.threads)
        last = None
        while True:
            with self._cond:
                while True:
                    if self._stop.is_set():
                        return
                    self._free_rows()
                    if self._round is None:
                        self._start_round()
                    session = self._next(self._alone_ready, last)
                    if self._round is not None or session is not None:
                        break
                    self._cond.wait(_WAIT_S)
                if session is not None:
                    last = session.id
                    events = session.events
                    work = self._take_encoded(session) if events is None else None
            if self._round is not None:
                self._advance_round()
            if session is not None:
                self._serve_alone(session, events, work)

    def _free_rows(self) -> None:
        """The rows of closed and finished sessions back to the batch (not mid-round). Under the lock."""
        assert self.batch is not None
        for session in [s for s in self._holding if (s.closed or s.finished) and not s.in_round]:
            assert session.engine is not None
            self.batch.remove(session.engine)
            self._holding.remove(session)
            self._cond.notify_all()  # a new session may be waiting for the row

    def _start_round(self) -> None:
        """Every session with encoded frames ahead of its next query: all of them, one batched step. Under the lock."""
        assert self.batch is not None
        ready = [s for s in self._sessions.values() if self._round_ready(s)]
        if not ready:
            return
        rows = len(self.batch.sessions)
        tokens: list[torch.Tensor] = [torch.empty(0)] * rows
        times: list[list[float]] = [[] for _ in range(rows)]
        for session in ready:
            work = self._take_encoded(session)
            row = self.batch.sessions.index(session.engine)
            tokens[row], times[row] = work.tokens, work.times
            session.in_step.extend(zip(work.indices, work.arrived, strict=True))
            session.in_round = True
            self._round_sessions[row] = session
        self._round = self.batch.step_events(tokens, times)

    def _advance_round(self) -> None:
        """One event of the round in progress (at most one forward), sent to its session."""
        assert self._round is not None
        try:
            row, event = next(self._round)
        except StopIteration:
            self._end_round()
            return
        except Exception as error:  # noqa: BLE001  (the round's sessions fail, the server goes on)
            failed = list(self._round_sessions.values())
            self._end_round()
            for session in failed:  # a forward failed midway: none of their caches can be trusted
                self._fail(session, "the model", error)
            return
        self._send_event(self._round_sessions[row], event)

    def _end_round(self) -> None:
        with self._cond:
            for session in self._round_sessions.values():
                session.in_round = False
            self._round, self._round_sessions = None, {}
            self._cond.notify_all()

    def _finish(self, session: WorkerSession) -> None:
        elapsed = time.monotonic() - session.began if session.began is not None else 0.0
        with self._cond:
            session.finished = True
        session.send(protocol.summary(session.frames, session.frames / elapsed if elapsed > 0 else 0.0,
                                      session.max_lag_s, session.threshold, self.device, session.responses,
                                      session.dropped, elapsed))
        session.send(CloseConnection(1000, "end of stream"))
