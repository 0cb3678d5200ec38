"""The asynchronous streaming pipeline: decode, frame encoding and LLM work overlap on separate threads.

    source (decode thread of `video.read_frames`) → reader thread (real-time pacing) → frame queue
      → encoder thread (encodes the frames waiting, up to max_batch in one call) → frame-token queue
      → LLM stage, on the caller's thread: `session.step` with all frames waiting (≤ max_frames_per_forward)

The LLM stage runs on the caller's thread so that Ctrl-C lands where the loop is and events are yielded
without another hand-off. While it generates a response, the encoder thread keeps encoding into its queue, so
a long response never stalls encoding; afterwards the LLM catches up with multi-frame forwards (frames are
never dropped: the queues block, they do not overflow). When the LLM stage has caught up and would wait for
the encoder (nothing it finished is queued), it encodes a few of the frames queued behind the encoder's batch
itself (`llm_encodes`): on a CPU the encoder is most of a frame's cost, and without this the LLM's core sits
idle for the better part of every batch. It takes one such run at a time (then waits for the encoder's batch
ahead of it), so that the LLM stage, which only it can do, never becomes the slower of the two. Runs are taken
from the frame queue whole (one taker at a time) and handed to `session.step` in stream order. The other way
round, while the encoder thread is ahead (its queue full) or done, its cores would idle, so the LLM stage runs
on them too (`idle_threads`, checked before each step and after each event): a response's tokens, a rebuild
and the last frames then go at the speed of every core. Once a slot frees, the encoder thread waits for the
LLM's current forward to end before it encodes again, so the two never run more threads than there are cores
(an OpenMP team sharing a core with another thread waits at every barrier: measured, a loss). A single-token
decode step gives bit-identical logits with 1 and 2 threads on a CPU (measured); longer forwards differ in the
last bits, as multi-frame forwards already do, and the responses stay those of the sequential loop (tests,
benchmark).

In real-time mode the reader releases frame i at `start + time_i`, as a live source would; the lag of a
frame is the wall time its decision was made minus that moment. Queries arrive from any thread (`ask`) or
are scheduled at stream times; a query at time t is injected after the frames shown at or before t (the
training layout: a turn at t follows frame floor(t·fps)). Events are yielded the moment the session makes
them, a response's tokens one by one (`TokenEvent`) before the response itself. A failure in any stage
stops every stage and is re-raised by the consumer.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from livevlm.engine.session import Event, ResponseEvent, StreamSession
from livevlm.runtime import stage_threads, usable_cores

log = logging.getLogger(__name__)

Encode = Callable[[np.ndarray], torch.Tensor]  # uint8 frames [T, H, W, 3] -> frame tokens [T, N, D]
_END = object()  # put by a stage after its last item
_POLL_S = 0.1  # how often a blocked stage checks the stop flag
_JOIN_S = 10.0
_EPS_S = 1e-6


def query_is_due(query_time_s: float, frame_time_s: float) -> bool:
    """Whether a query asked at `query_time_s` goes in before the frame at `frame_time_s`.

    A query at t follows the frame shown at t, so it is queued before the first frame later than t. A query
    at 0 s follows frame 0, and frame 0's decision is acted on.
    """
    return query_time_s < frame_time_s - _EPS_S


@dataclass(frozen=True)
class _Failure:
    """An exception raised in a stage thread, handed downstream to be re-raised by the consumer."""

    error: BaseException


@dataclass(frozen=True)
class StreamSummary:
    """What a finished run did. fps = frames / elapsed_s; max_lag_s is 0 in fast mode."""

    frames: int
    fps: float
    max_lag_s: float
    elapsed_s: float
    responses: int
    max_frames_per_step: int  # > 1 when the LLM caught up with multi-frame forwards


class StreamPipeline:
    """Run one stream through a session, asynchronously. Iterate `events()` or call `run()` once.

    Args:
        session: a fresh StreamSession (its config gives max_frames_per_forward).
        encoder: a `vision.FrameEncoder` (its `encode` is used, given the last frame of the batch before, which
            `change_hues` compares the batch's first frame with) or any callable frames → `[T, N, D]` (that
            encodes each frame on its own).
        source: an iterable of `(time_s, frame [H, W, 3] uint8)`, e.g. `video.read_frames(path, fps, size)`;
            closed (if it has `close`) when the run ends.
        realtime: release frames at wall-clock pace (for files played "live"); False: as fast as possible.
        queries: `(time_s, text)` pairs scheduled on the stream's clock.
        on_event: called with every event by `run()`.
        max_batch: the most frames the encoder thread encodes in one call (more: a little less work per frame;
            fewer: less left over for one thread at the end of the stream).
        llm_encodes: the most frames the LLM stage encodes itself when it would otherwise wait for the encoder
            (0: never). It calls the same `encoder` from its own thread, so the encoder must allow that
            (`FrameEncoder` does: PyTorch and ONNX Runtime both run concurrent calls).
        queue_size: capacity of each queue between stages: decoded frames before the encoder, encoded runs
            (up to max_batch frames each) after it. Full queues block the stage before them (nothing dropped).
        num_threads: torch intra-op threads of the LLM stage while the run lasts (None: `runtime.stage_threads`,
            half the usable cores, so that encoder and LLM overlap instead of fighting for the same cores);
            restored afterwards.
        encoder_threads: intra-op threads of the encoder thread (None: as num_threads). Thread counts are
            per thread (OpenMP), so the two stages can be sized apart.
        idle_threads: intra-op threads of the LLM stage while the encoder thread is ahead (blocked on a full
            queue) or done, so that its cores do not idle (None: every usable core; num_threads: never more).
            It assumes that this pipeline is the process's only heavy work, as in `livevlm stream`.
    """

    def __init__(self, session: StreamSession, encoder: Any, source: Iterable[tuple[float, np.ndarray]], *,
                 realtime: bool = False, queries: Iterable[tuple[float, str]] = (),
                 on_event: Callable[[Event], None] | None = None, max_batch: int = 8, queue_size: int = 64,
                 num_threads: int | None = None, encoder_threads: int | None = None, llm_encodes: int = 4,
                 idle_threads: int | None = None) -> None:
        if max_batch <= 0 or queue_size <= 0 or llm_encodes < 0:
            raise ValueError(f"max_batch and queue_size must be positive and llm_encodes ≥ 0, got {max_batch}, "
                             f"{queue_size} and {llm_encodes}")
        self.session = session
        # (frames [T, H, W, 3], the frame before them) → tokens: FrameEncoder.encode, or an Encode (frames alone)
        self._encode: Callable[..., torch.Tensor] = (encoder.encode if hasattr(encoder, "encode")
                                                     else lambda frames, previous: encoder(frames))
        self._source = source
        self.realtime = realtime
        self.on_event = on_event
        self.max_batch = max_batch
        self.llm_encodes = llm_encodes
        self.num_threads = num_threads or stage_threads()
        self.encoder_threads = encoder_threads or self.num_threads
        self.idle_threads = max(self.num_threads, idle_threads or usable_cores())
        self._encoder_ahead = threading.Event()  # the encoder thread waits on a full queue, or has finished
        self._llm_threads = self.num_threads  # the LLM stage's intra-op threads right now
        self._cores_returned = threading.Event()  # clear while the LLM stage runs on the encoder's cores
        self._cores_returned.set()
        self._scheduled = sorted((float(t), text) for t, text in queries)
        for _, text in self._scheduled:
            session.fmt.query_ids(text, run_open=False)  # validate before any thread starts
        self._asked: queue.SimpleQueue[tuple[float | None, str]] = queue.SimpleQueue()
        self._frames: queue.Queue[Any] = queue.Queue(maxsize=queue_size)
        self._tokens: queue.Queue[Any] = queue.Queue(maxsize=queue_size)
        self._take_lock = threading.Lock()  # frames leave the frame queue in contiguous runs, one taker at a time
        self._taken = 0  # frames taken from the frame queue so far: the stream index of the next one
        self._last_taken: np.ndarray | None = None  # the frame before the next run, for change_hues
        self._delivered = 0  # frames handed to the LLM stage so far, in stream order
        self._stop = threading.Event()
        self.threads = [threading.Thread(target=self._read_loop, name="livevlm-reader", daemon=True),
                        threading.Thread(target=self._encode_loop, name="livevlm-encoder", daemon=True)]
        self._start: float | None = None  # wall time of stream time `_first_time`
        self._first_time = 0.0
        self._started = False
        self.summary: StreamSummary | None = None

    # -- public API ----------------------------------------------------------------------------------

    def ask(self, text: str, time_s: float | None = None) -> None:
        """Queue a user query from any thread; it is injected before the next frame shown after `time_s`.

        time_s: None = now (real-time: the stream time of the wall clock; fast: after the last frame the LLM
        has seen). Raises StreamFormatError for an empty text.
        """
        self.session.fmt.query_ids(text, run_open=False)
        if time_s is None and self.realtime and self._start is not None:
            time_s = self._first_time + time.monotonic() - self._start
        self._asked.put((time_s, text))

    def run(self) -> StreamSummary:
        """Run to the end of the stream, sending each event to `on_event`; return the summary."""
        for event in self.events():
            if self.on_event is not None:
                self.on_event(event)
        assert self.summary is not None
        return self.summary

    def events(self) -> Iterator[Event]:
        """Run the stream, yielding events as they happen. Stops every thread however it ends."""
        if self._started:
            raise RuntimeError("a StreamPipeline runs once; build a new one (with a new session) for another run")
        self._started = True
        previous_threads = torch.get_num_threads()
        torch.set_num_threads(self.num_threads)
        try:
            for thread in self.threads:
                thread.start()
            yield from self._llm_loop()
        finally:
            self.close()
            torch.set_num_threads(previous_threads)

    def close(self) -> None:
        """Stop and join every stage thread (idempotent)."""
        self._stop.set()
        for thread in self.threads:
            if thread.ident is None:
                continue
            self._drain()
            thread.join(timeout=_JOIN_S)
            if thread.is_alive():
                log.warning("pipeline thread %s did not stop within %.0f s", thread.name, _JOIN_S)

    # -- stage threads -------------------------------------------------------------------------------

    def _put(self, target: queue.Queue[Any], item: Any) -> bool:
        """Blocking put that gives up when the pipeline stops; False if it did."""
        while not self._stop.is_set():
            try:
                target.put(item, timeout=_POLL_S)
                return True
            except queue.Full:
                continue
        return False

    def _get(self, source: queue.Queue[Any]) -> Any:
        """Blocking get that gives up (returns _END) when the pipeline stops."""
        while not self._stop.is_set():
            try:
                return source.get(timeout=_POLL_S)
            except queue.Empty:
                continue
        return _END

    def _drain(self) -> None:
        for pending in (self._frames, self._tokens):
            while True:
                try:
                    pending.get_nowait()
                except queue.Empty:
                    break

    def _read_loop(self) -> None:
        """Reader thread: pull frames from the source (pacing them in real time) into the frame queue."""
        iterator = iter(self._source)
        try:
            for time_s, frame in iterator:
                if self._start is None:
                    self._start, self._first_time = time.monotonic(), float(time_s)
                if self.realtime:
                    delay = self._start + float(time_s) - self._first_time - time.monotonic()
                    if delay > 0 and self._stop.wait(delay):
                        return
                if not self._put(self._frames, (float(time_s), frame)):
                    return
            self._put(self._frames, _END)
        except BaseException as error:  # noqa: BLE001  (re-raised by the consumer)
            self._put(self._frames, _Failure(error))
        finally:  # a FrameSource stops its decode thread here
            for closable in (iterator, self._source):
                close = getattr(closable, "close", None)
                if close is not None:
                    close()

    def _take(self, limit: int, block: bool) -> tuple[int, list[tuple[float, np.ndarray]], np.ndarray | None, Any]:
        """Take up to `limit` frames waiting in the frame queue, as one contiguous run of the stream.

        Returns (the stream index of the run's first frame, the run, the frame shown before it, the end marker
        (`_END` or a `_Failure`) if the run reached it, else None). block: wait for the first frame (the encoder
        thread); else take only what is there, and nothing if the other taker is busy taking (the LLM stage).
        An end marker taken without blocking is put back for the encoder thread, which hands it downstream."""
        if not self._take_lock.acquire(blocking=block):
            return 0, [], None, None
        try:
            start, previous = self._taken, self._last_taken
            run: list[tuple[float, np.ndarray]] = []
            end = None
            while len(run) < limit:
                if block and not run:
                    item = self._get(self._frames)
                else:
                    try:
                        item = self._frames.get_nowait()
                    except queue.Empty:
                        break
                if item is _END or isinstance(item, _Failure):
                    if block:
                        end = item
                    else:  # the reader has stopped, so the queue has room
                        self._frames.put_nowait(item)
                    break
                run.append(item)
            if run:
                self._taken += len(run)
                self._last_taken = run[-1][1]
            return start, run, previous, end
        finally:
            self._take_lock.release()

    def _encode_run(self, run: list[tuple[float, np.ndarray]], previous: np.ndarray | None,
                    ) -> tuple[list[float], torch.Tensor]:
        """A run of `(time_s, frame)` → its times and frame tokens `[T, N, D]`."""
        frames = np.stack([frame for _, frame in run])  # [T, H, W, 3]
        with torch.no_grad():
            tokens = self._encode(frames, previous=previous)
        return [t for t, _ in run], tokens

    def _encode_loop(self) -> None:
        """Encoder thread: encode the frames waiting (up to max_batch) in one call, until the end of the source."""
        torch.set_num_threads(self.encoder_threads)  # this thread's own count
        try:
            while not self._stop.is_set():
                start, run, previous, end = self._take(self.max_batch, block=True)
                if run:
                    if not self._wait_for_cores():
                        return
                    item = (start, *self._encode_run(run, previous))
                    if self._tokens.full():  # ahead of the LLM: it may use this thread's cores until a slot frees
                        self._encoder_ahead.set()
                    put = self._put(self._tokens, item)
                    self._encoder_ahead.clear()
                    if not put:
                        return
                if end is not None:
                    self._encoder_ahead.set()  # for good: every frame is encoded
                    self._put(self._tokens, end)
                    return
        except BaseException as error:  # noqa: BLE001  (re-raised by the consumer)
            self._put(self._tokens, _Failure(error))

    # -- the LLM stage (caller's thread) -------------------------------------------------------------

    def _llm_loop(self) -> Iterator[Event]:
        waiting: deque[tuple[float, torch.Tensor]] = deque()
        encoded: dict[int, tuple[list[float], torch.Tensor]] = {}  # runs that arrived before the runs ahead of them
        frames = responses = max_step = 0
        max_lag = 0.0
        began = time.monotonic()
        ended = False
        while not ended or waiting:
            if not ended:
                ended = self._receive(encoded, block=False)  # what the encoder finished meanwhile comes first
                self._in_order(encoded, waiting)
            if not ended and not waiting and not encoded and self.llm_encodes:
                start, run, previous, _ = self._take(self.llm_encodes, block=False)  # caught up: encode frames
                if run:  # queued behind the encoder's batch
                    encoded[start] = self._encode_run(run, previous)
                    self._in_order(encoded, waiting)
            if not ended and not waiting:
                self._size_llm_threads(may_borrow=False)  # about to wait for the encoder: it needs its cores
                ended = self._receive(encoded, block=True)
                self._in_order(encoded, waiting)
            if not waiting:
                continue
            batch = self._next_batch(waiting)
            tokens = torch.stack([t for _, t in batch])
            times = [t for t, _ in batch]
            self._size_llm_threads()
            for event in self.session.step_events(tokens, times):
                responses += isinstance(event, ResponseEvent)
                yield event
                self._size_llm_threads()  # before the session's next forward: a response's next token
            frames += len(batch)
            max_step = max(max_step, len(batch))
            if self.realtime and self._start is not None:  # the batch's oldest frame waited longest
                max_lag = max(max_lag, time.monotonic() - (self._start + times[0] - self._first_time))
        for event in self._final_queries():
            responses += isinstance(event, ResponseEvent)
            yield event
        elapsed = time.monotonic() - began
        self.summary = StreamSummary(frames, frames / elapsed if elapsed > 0 else 0.0, max_lag, elapsed,
                                     responses, max_step)

    def _wait_for_cores(self) -> bool:
        """Encoder thread: wait until the LLM stage is back on its own threads (after its current forward), so
        that the two never run more threads than there are cores. False if the pipeline stops meanwhile."""
        while not self._cores_returned.wait(timeout=_POLL_S):
            if self._stop.is_set():
                return False
        return True

    def _size_llm_threads(self, may_borrow: bool = True) -> None:
        """This thread's intra-op threads for the LLM's next forwards: idle_threads while the encoder is ahead
        (and `may_borrow`: the LLM stage gives the cores back before it waits for the encoder)."""
        if self._llm_threads == self.num_threads:  # cleared before the flag is read: an encoder thread that
            self._cores_returned.clear()  # clears the flag after this read waits for the cores, before: not lent
        wanted = self.idle_threads if may_borrow and self._encoder_ahead.is_set() else self.num_threads
        if wanted != self._llm_threads:
            torch.set_num_threads(wanted)
            self._llm_threads = wanted
        if wanted == self.num_threads:
            self._cores_returned.set()

    def _receive(self, encoded: dict[int, tuple[list[float], torch.Tensor]], block: bool) -> bool:
        """Move every encoded run available into `encoded` (waiting for one if `block`); True at the end."""
        while True:
            if block:
                item = self._get(self._tokens)
                block = False
            else:
                try:
                    item = self._tokens.get_nowait()
                except queue.Empty:
                    return False
            if item is _END:
                return True
            if isinstance(item, _Failure):
                raise item.error
            start, times, tokens = item
            encoded[start] = (times, tokens)

    def _in_order(self, encoded: dict[int, tuple[list[float], torch.Tensor]],
                  waiting: deque[tuple[float, torch.Tensor]]) -> None:
        """Move the runs that continue the stream from `encoded` to `waiting`, in stream order."""
        while self._delivered in encoded:
            times, tokens = encoded.pop(self._delivered)
            waiting.extend(zip(times, tokens, strict=True))
            self._delivered += len(times)

    def _next_batch(self, waiting: deque[tuple[float, torch.Tensor]]) -> list[tuple[float, torch.Tensor]]:
        """Up to max_frames_per_forward frames, cut before any frame that a query must precede."""
        self._queue_due_queries(waiting[0][0])
        batch = [waiting.popleft()]
        limit = self.session.config.max_frames_per_forward
        while waiting and len(batch) < limit and not self._has_due_query(waiting[0][0]):
            batch.append(waiting.popleft())
        return batch

    def _collect_asked(self) -> None:
        while True:
            try:
                time_s, text = self._asked.get_nowait()
            except queue.Empty:
                break
            when = self.session.last_time_s if time_s is None else time_s
            self._scheduled.append((when, text))
            self._scheduled.sort(key=lambda item: item[0])

    def _has_due_query(self, frame_time: float) -> bool:
        self._collect_asked()
        return bool(self._scheduled) and query_is_due(self._scheduled[0][0], frame_time)

    def _queue_due_queries(self, frame_time: float) -> None:
        while self._has_due_query(frame_time):
            when, text = self._scheduled.pop(0)
            self.session.add_query(text, time_s=when)

    def _final_queries(self) -> Iterator[Event]:
        """At the end of the stream, answer what is still queued (a query after the last frame)."""
        self._collect_asked()
        for when, text in self._scheduled:
            self.session.add_query(text, time_s=when)
        self._scheduled = []
        yield from self.session.flush_events()
