"""One live stream through a LiveModel: KV cache, the speak decision, queries, generation, bounded memory.

The session feeds exactly the token layout training saw (`StreamFormat`'s engine inputs), so
`session.fed_ids` (recorded when the session is made with `record_fed_ids=True`, as the tests do) always
equals `fmt.render(...)` of the conversation it had:

    <bos>{system}\\n\\n[<v>…,<v>…]\\nAssistant: {response}<eos>\\n[<v>…]\\nUser: {q}\\nAssistant: {answer}<eos>…

Decision rule (the official one, `model.silent_decisions`): after each frame, P(sep) = softmax(logits at the
frame's last token)[sep]; the separator is zeroed when P(sep) < threshold and the argmax decides, so the
model stays silent iff P(sep) >= threshold and the separator is the argmax; p_speak = 1 - P(sep).

Several waiting frames go through the LLM in one forward: the silence decision is read at every frame
end, and if frame k in the middle decides to speak, the KV cache is cropped back to the end of frame k,
the response is generated there, and frames k+1… are forwarded again after it. Causal attention makes
the logits at frame k independent of the frames after it, so the events are those of the one-frame-per-
forward loop (up to floating-point summation order).

Events come out as they happen (`step_events`): a response's tokens one by one while it is decoded
(`TokenEvent`, ids only: the engine knows no text beyond the finished response's), so a caller can show
words as they come or interleave several sessions between tokens.

Tokens that are known but not yet needed in the cache (the prompt before the first frame, the eos that
ends a response) wait in `_pending` and ride along with the next forward: no forward is spent on them.

Decoding (`EngineConfig.decode`). "eager" feeds each response token through the same forward as everything
else. On a GPU that loop is Python-bound (an 8B Llama decoded 30-41 tokens/s where the hardware allows
~250): each step launches hundreds of small kernels, with new shapes every time. "static" runs the tokens
through a static-shape step instead (`_static_step` on a `kv_cache.StaticStepCache`: the cache's buffers at
their fixed capacity, the token written at a position tensor, the unfilled part masked); "compiled" wraps
that step in `torch.compile` (CUDA graphs on a GPU), compiled at a session's first response token and then
replayed. Frames, the prefill of a response's header and rebuilds keep the eager forward (their lengths
vary), and so do the decision rule, sampling and events: the static step computes the same logits, only the
attention runs over the padded buffer (the masked positions weigh exactly 0).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass, field
from typing import Literal

import torch
from transformers import DynamicCache
from transformers.generation.logits_process import (
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopPLogitsWarper,
)

from livevlm.config import EngineConfig
from livevlm.engine.kv_cache import GrowingLayer, StaticStepCache, clear_cache, growing_cache
from livevlm.model import CACHE_KWARG, LiveModel, silent_decisions
from livevlm.stream_format import Frames, Message, StreamFormat, fork

log = logging.getLogger(__name__)

REBUILD_CHUNK_TOKENS = 512  # tokens per forward when the cache is rebuilt (bounds attention memory)


# ---------------------------------------------------------------------------------------------------
# events


@dataclass(frozen=True)
class FrameEvent:
    """The silence/speech decision of one frame: p_speak = 1 - P(separator)."""

    time_s: float
    p_speak: float


@dataclass(frozen=True)
class QueryEvent:
    """A user query, at the moment it was injected into the stream."""

    time_s: float
    text: str


@dataclass(frozen=True)
class TokenEvent:
    """One response token, the moment it is decoded (before the `ResponseEvent` that ends its response).

    Ids only: text is made outside the engine (`livevlm.detokenize.TextDeltas`), where it is shown.
    """

    time_s: float
    token_id: int
    answer_to_query: bool


@dataclass(frozen=True)
class ResponseEvent:
    """A finished response: spontaneous (after a frame) or the answer to a query.

    latency_s: wall time to produce it (prefill of "]\\nAssistant:" or of the query, plus decoding, plus
        whatever the caller did between its `TokenEvent`s); not compared by ==, so the events of two runs
        compare equal when the same things were said.
    reason: "eos" when the model ended it, "max_tokens" when `max_new_tokens` cut it.
    """

    time_s: float
    text: str
    token_ids: tuple[int, ...]
    latency_s: float = field(compare=False)  # a measurement, not part of what was said
    reason: Literal["eos", "max_tokens"]
    answer_to_query: bool

    @property
    def role(self) -> str:
        return "assistant"


@dataclass(frozen=True)
class NoteEvent:
    """The model's note to itself after a frame (a format with `note_role`): what it saw, written before it chose
    to answer (`answered`: a ResponseEvent at the same time follows) or to go on watching. Not a response: no
    TokenEvents come before it, and a caller shows it only to someone debugging the model.

    latency_s: wall time from the choice to write it to the choice after it; not compared by ==.
    """

    time_s: float
    text: str
    token_ids: tuple[int, ...]
    answered: bool
    latency_s: float = field(compare=False)


Event = FrameEvent | QueryEvent | TokenEvent | ResponseEvent | NoteEvent


# ---------------------------------------------------------------------------------------------------
# what was fed: a record that can be replayed into ids (the bounded-memory policy rebuilds from it)


@dataclass
class _Entry:
    kind: Literal["frame", "user", "response", "answer", "note"]
    time_s: float
    tokens: torch.Tensor | None = None  # [N, D] a frame's raw tokens (the model derives the rest when replayed)
    text: str = ""  # the query of a "user" entry, the decoded text of a response/answer/note
    token_ids: tuple[int, ...] = ()  # generated ids of a response/answer/note, without eos


class _Cursor:
    """Where the layout stands, and the ids of the next piece (the same pieces live and when replaying).

    state: "open" right after "\\n[" (the prompt), "frame" after a frame, "header" after "Assistant:" (or a
    note's header), "eos" after a response or answer, "note" after a note's eos.
    """

    def __init__(self, fmt: StreamFormat, state: str = "open") -> None:
        self.fmt = fmt
        self.state = state

    def frame(self) -> list[int]:
        prefix = self.fmt.reopen_ids() if self.state in ("eos", "note") else []
        ids = prefix + self.fmt.frame_ids(first_in_run=self.state != "frame")
        self.state = "frame"
        return ids

    def query(self, text: str) -> list[int]:
        if self.state not in ("frame", "eos", "note"):
            raise RuntimeError(f"a query cannot follow state {self.state!r}: the stream starts with a frame")
        ids = self.fmt.query_ids(text, run_open=self.state == "frame")
        self.state = "header"
        return ids

    def speak(self) -> list[int]:
        if self.state != "frame":
            raise RuntimeError(f"the model can only speak after a frame, not in state {self.state!r}")
        self.state = "header"
        return self.fmt.speak_ids()

    def note(self) -> list[int]:
        if self.state != "frame":
            raise RuntimeError(f"the model can only write a note after a frame, not in state {self.state!r}")
        self.state = "header"
        return self.fmt.note_ids()

    def answer_note(self) -> list[int]:
        if self.state != "note":
            raise RuntimeError(f"an answer after a note must follow the note's eos, not state {self.state!r}")
        self.state = "header"
        return self.fmt.answer_after_note_ids()

    def end_response(self) -> list[int]:
        self.state = "eos"
        return [self.fmt.eos_id]

    def end_note(self) -> list[int]:
        self.state = "note"
        return [self.fmt.eos_id]

    def replay(self, entry: _Entry) -> list[int]:
        if entry.kind == "frame":
            return self.frame()
        if entry.kind == "user":
            return self.query(entry.text)
        if entry.kind == "note":
            return self.note() + list(entry.token_ids) + self.end_note()
        prefix = [] if entry.kind == "answer" else self.answer_note() if self.state == "note" else self.speak()
        return prefix + list(entry.token_ids) + self.end_response()


# ---------------------------------------------------------------------------------------------------
# the session


class StreamSession:
    """One stream, one state. Not thread-safe: one caller drives it (the pipeline's LLM stage).

    Args:
        model: a LiveModel in eval mode (any device/dtype; inputs follow the model).
        fmt: the stream layout; `fmt.tokens_per_frame` must equal the N of the frame tokens.
        config: threshold, generation options, `max_frames_per_forward`, `window_frames`.
        system_prompt: None = `fmt.config.system_prompt`.
        seed: seeds the sampling generator (used only when `config.temperature > 0`).
        max_cache_tokens: the KV budget in tokens; None = the LLM's `max_position_embeddings`.
        compile_backend: the `torch.compile` backend of `config.decode="compiled"` ("inductor"; "aot_eager"
            traces the same graph without generating code, as the CPU tests do).
        cache: the KV cache to hold this stream instead of a fresh `growing_cache`: a row of a
            `kv_cache.BatchedCache` (what `engine.batch.SessionBatch` gives its sessions), whose capacity must
            hold `max_cache_tokens`.

    Raises:
        ValueError: `config.decode` "static" or "compiled" for an LLM with sliding-window layers, or a
            `max_cache_tokens` too small for the prompt, a frame and a response.

    Bounded memory (endless streams). The session keeps a record of what the cache holds after the
    prompt: each frame (with its raw frame tokens: a replay derives the model's inputs from them as they
    were derived when first fed, so with frame_delta the first kept frame keeps its change since the dropped
    frame before it), each query, each response/answer (its token ids).
    Before a forward that would leave less than a response's room under the token budget (or, with
    `window_frames` > 0, push the cache past that many frames), it drops the oldest part of the record in
    one generous chunk, down to half the budget (half the frame window), so that this happens rarely,
    and rebuilds the cache by re-forwarding what is kept: the system prompt, the user queries of the
    dropped part with their answers ("pinned", up to a quarter of the budget: an instruction such as
    "narrate the video" must outlive its frames), then the most recent frames and dialogue. The kept
    part is rendered exactly as training renders that shorter conversation, with contiguous positions
    0…L-1: with RoPE the cache of a fresh session fed the kept content is the *only* correct one, while
    keeping old keys (rotated for their old positions) next to a gap would show the model relative
    distances it never saw in training. The cost is one re-forward of half the budget every ~half budget
    of stream. Within the budget nothing is dropped, so the events equal those of an unbounded session.
    The cache itself is `engine.kv_cache.growing_cache`: buffers written in place and reused by the
    rebuilds, so an endless stream's memory stays flat (transformers' DynamicCache reallocates every layer
    at every forward); with `config.decode` "static" or "compiled" they hold the whole budget from the first
    forward (the static decode step needs the same buffers at every step). The forwards' temporaries still
    grow with the cache and fragment glibc's heap; that is a process-wide allocator setting
    (`livevlm.runtime.pin_mmap_threshold`), which the `livevlm` command applies and a session never does on
    its own.
    """

    def __init__(self, model: LiveModel, fmt: StreamFormat, config: EngineConfig, system_prompt: str | None = None,
                 seed: int = 0, max_cache_tokens: int | None = None, record_fed_ids: bool = False,
                 compile_backend: str | Callable = "inductor", cache: DynamicCache | None = None) -> None:
        self.model = model
        self.fmt = fmt
        self.config = config
        self.system_prompt = fmt.config.system_prompt if system_prompt is None else system_prompt
        llm_config = getattr(model.llm, "config", None)
        self.max_cache_tokens = max_cache_tokens or int(getattr(llm_config, "max_position_embeddings", 4096))
        # Static decode steps need the budget allocated at once (the same buffers and shapes at every step).
        self._cache = cache if cache is not None else growing_cache(llm_config, self.max_cache_tokens,
                                                                    fixed=config.decode != "eager")
        self.compile_backend = compile_backend
        self._step_cache: StaticStepCache | None = None  # made at the first static step
        self._decode_step: Callable[..., torch.Tensor] | None = None
        if config.decode != "eager" and not all(isinstance(layer, GrowingLayer) for layer in self._cache.layers):
            raise ValueError(f"engine.decode={config.decode!r} needs an LLM of full-attention layers only; this one "
                             "has sliding-window layers: use engine.decode='eager'")
        self._generator = torch.Generator().manual_seed(seed)
        # Never guessed by prompt lookup: a response is text; the model itself decides where it ends.
        self._special_ids = frozenset(fmt.tokenizer.all_special_ids) | {fmt.placeholder_id, fmt.eos_id}
        self._cursor = _Cursor(fmt)
        self._head_ids = fmt.prompt_ids(self.system_prompt)  # what precedes the record in the cache
        self._pending: list[int] = list(self._head_ids)  # known ids not forwarded yet
        # Everything fed since the start (the logical stream), for checking the layout; off by default, as
        # it grows without bound (~2 M ids, ~17 MB, a day of 2-fps camera) while everything else here is bounded.
        self.record_fed_ids = record_fed_ids
        self.fed_ids: list[int] = list(self._head_ids) if record_fed_ids else []
        self.cache_ids: list[int] = []  # the ids the KV cache holds now (forwarded)
        self._entries: list[_Entry] = []  # the record of what the cache holds after the head
        self._pinned: list[tuple[str, str]] = []  # (query, answer text) kept from dropped parts
        self._queries: list[tuple[str, float | None]] = []
        self.frames_seen = 0
        # The stream state the model's frame inputs need (`LiveModel.frame_inputs`, e.g. frame_delta's changes):
        self._last_frame: torch.Tensor | None = None  # [N, D] the last frame fed (raw); None before the first
        self._before_record: torch.Tensor | None = None  # [N, D] the frame before the record's first (raw), which
        # a rebuild dropped; None while the stream's first frame is in the record
        self.last_time_s = 0.0
        self.windowed = False  # True once the bounded-memory policy first dropped something
        self._check_budget()

    # -- public API ----------------------------------------------------------------------------------

    @property
    def cache_length(self) -> int:
        """Tokens in the KV cache now."""
        return self._cache.get_seq_length()

    def add_query(self, text: str, time_s: float | None = None) -> None:
        """Queue a user query; it is injected before the next frame and answered at once (until eos).

        A query queued before the first frame follows the first frame (as in training: a turn at time t
        follows the frame shown at t), and that frame's decision is not acted on.

        Raises:
            StreamFormatError: empty text.
        """
        self.fmt.query_ids(text, run_open=False)  # validates now, not mid-stream
        self._queries.append((text, time_s))

    def step_events(self, frame_tokens: torch.Tensor, times: list[float]) -> Iterator[Event]:
        """Feed T >= 1 waiting frames; decide, speak and answer queries in stream order, yielding each event
        the moment it happens: a FrameEvent per frame, QueryEvents, and for each response its TokenEvents
        as they are decoded, then its ResponseEvent.

        The work happens as the iterator is consumed; consume it to the end before the next call (a session
        abandoned mid-response is left mid-response). The arguments are checked here, before any work.

        Args:
            frame_tokens: `[T, N, D]` (N = fmt.tokens_per_frame).
            times: T stream times in seconds, one per frame.
        Raises:
            ValueError: shapes that do not match `times` or the format's N.
        """
        self._check_frames(frame_tokens, times)
        return self._step(frame_tokens, times)

    def step(self, frame_tokens: torch.Tensor, times: list[float]) -> list[Event]:
        """`step_events` run to the end: the FrameEvents, QueryEvents and ResponseEvents (no TokenEvents)."""
        return [event for event in self.step_events(frame_tokens, times) if not isinstance(event, TokenEvent)]

    def flush_events(self) -> Iterator[Event]:
        """Answer the queries still queued now (at the end of a stream, or while no frame is coming), yielding
        their events as `step_events` does.

        Queries before the first frame cannot be answered (the stream starts with a frame) and stay queued.
        """
        if self.frames_seen:
            yield from self._answer_queries()

    def flush(self) -> list[Event]:
        """`flush_events` run to the end, without TokenEvents."""
        return [event for event in self.flush_events() if not isinstance(event, TokenEvent)]

    def _step(self, frame_tokens: torch.Tensor, times: list[float]) -> Iterator[Event]:
        i = 0
        while i < len(times):
            count, decide = yield from self._before_frames(len(times) - i)
            i += yield from self._forward_frames(frame_tokens[i:i + count], times[i:i + count], decide)

    def _before_frames(self, waiting: int) -> Iterator[Event]:
        """What comes before the next frame forward: the queries due are answered and room is made (a rebuild).
        Yields their events; returns (how many of the `waiting` frames go into the forward, whether their
        decisions are acted on). `engine.batch.SessionBatch` calls it too, then forwards with other sessions."""
        if self.frames_seen == 0 and self._queries:  # the stream must start with a frame; the queries follow it
            return 1, False
        yield from self._answer_queries()
        return self._make_room(min(self.config.max_frames_per_forward, waiting)), True

    # -- frames --------------------------------------------------------------------------------------

    def _check_frames(self, frame_tokens: torch.Tensor, times: list[float]) -> None:
        if frame_tokens.dim() != 3 or frame_tokens.shape[0] != len(times) or not times:
            raise ValueError(f"step needs frame_tokens [T, N, D] with T = len(times) >= 1; got shape "
                             f"{tuple(frame_tokens.shape)} and {len(times)} times")
        if frame_tokens.shape[1] != self.fmt.tokens_per_frame:
            raise ValueError(f"frame_tokens have N={frame_tokens.shape[1]} tokens per frame but the stream format "
                             f"expects {self.fmt.tokens_per_frame}; encode with the model's vision settings")
        width = self.model.frame_width
        if frame_tokens.shape[2] != width:  # else the connector's matmul fails with bare shapes
            raise ValueError(f"frame_tokens are D={frame_tokens.shape[2]} wide but the model takes {width}"
                             f"{' (before frame_delta doubles it)' if self.model.frame_delta else ''}; encode with "
                             "the model's vision settings (model.mean_rgb adds 3 colour channels, model.hue_bins its "
                             "bins, model.change_hues as many again)")

    def _forward_frames(self, frame_tokens: torch.Tensor, times: list[float],
                        decide: bool = True) -> Iterator[Event]:
        """Forward T frames at once; act on the first frame that speaks. Yields the events; returns the
        frames consumed."""
        ids, ends, inputs = self._prepare_frames(frame_tokens)
        logits = self._forward(ids, inputs, keep=[e - 1 for e in ends])  # [T, V]
        return (yield from self._act_on_frames(ids, ends, logits, frame_tokens, times, decide))

    def _prepare_frames(self, frame_tokens: torch.Tensor) -> tuple[list[int], list[int], torch.Tensor]:
        """What the forward of T frames `[T, N, D]` takes: its ids (the pending ids, then the frames' layout),
        the position in them just after each frame's last token, and the connector's inputs `[T, N, D']`.
        Moves the cursor on: the forward must follow."""
        ids = list(self._pending)
        ends = []
        for _ in range(len(frame_tokens)):
            ids += self._cursor.frame()
            ends.append(len(ids))
        return ids, ends, self.model.frame_inputs(frame_tokens, self._last_frame)  # after the frames fed

    def _act_on_frames(self, ids: list[int], ends: list[int], logits: torch.Tensor, frame_tokens: torch.Tensor,
                       times: list[float], decide: bool) -> Iterator[Event]:
        """After the forward of `ids` (the cache holds them all): decide at each frame end from `logits`
        `[T, V]`, keep the frames up to the first that speaks (the rest are cropped) and speak there; with
        `decide=False` (the stream's first frame) answer the queries asked before it instead. Yields the
        events; returns the frames consumed."""
        p_sep = torch.softmax(logits.float(), dim=-1)[:, self.fmt.separator_id].tolist()
        silent = silent_decisions(logits, self.fmt.separator_id, self.config.threshold).tolist()
        speak_at = next((k for k in range(len(times)) if decide and not silent[k]), None)
        consumed = len(times) if speak_at is None else speak_at + 1
        self._commit_frames(ids, ends[consumed - 1], frame_tokens[:consumed], times[:consumed])
        for k in range(consumed):  # after the commit: a caller that stops here leaves a consistent session
            yield FrameEvent(times[k], 1.0 - p_sep[k])
        if speak_at is not None:
            yield from self._speak(times[speak_at])
        if not decide:
            yield from self._answer_queries()
        return consumed

    def _commit_frames(self, ids: list[int], keep: int, frame_tokens: torch.Tensor, times: list[float]) -> None:
        """Keep `ids[:keep]` (the frames acted on) in the cache and the record; crop away the rest.

        The cursor needs no rewind: after any frame it stands at "frame".
        """
        if keep < len(ids):
            self._cache.crop(-(len(ids) - keep))  # negative = tokens to remove (every transformers version)
        self._record(ids[len(self._pending):keep])
        self.cache_ids += ids[:keep]
        self._pending = []
        for tokens, time_s in zip(frame_tokens, times, strict=True):
            self._entries.append(_Entry("frame", time_s, tokens=tokens.detach().clone()))
        self._last_frame = self._entries[-1].tokens
        self.frames_seen += len(times)
        self.last_time_s = times[-1]

    def _record(self, ids: list[int]) -> None:
        if self.record_fed_ids:
            self.fed_ids += ids

    # -- queries and responses -----------------------------------------------------------------------

    def _answer_queries(self) -> Iterator[Event]:
        while self._queries:
            text, time_s = self._queries.pop(0)
            time_s = self.last_time_s if time_s is None else time_s
            query_ids = self._cursor_preview_query(text)
            self._ensure_room(len(query_ids) + self.config.max_new_tokens + 2)
            self._entries.append(_Entry("user", time_s, text=text))
            prefix = self._cursor.query(text)
            yield QueryEvent(time_s, text)
            yield from self._generate(prefix, time_s, answer=True)

    def _cursor_preview_query(self, text: str) -> list[int]:
        return self.fmt.query_ids(text, run_open=self._cursor.state == "frame")

    def _speak(self, time_s: float) -> Iterator[Event]:
        """The model chose to speak after a frame: respond; or, in a format with notes, first choose between a
        response and a note, and after a note between answering and going on watching.

        Each choice is the model's prediction where the two continuations part (`stream_format.fork`), taken
        from a forward of the likelier one, the assistant's: a response costs no forward more than without
        notes, and a note the forward of its own header. Going on watching forgets the answer's header again
        (the eos waits for the next frame's forward, as after any response)."""
        if not self.fmt.config.note_role:
            yield from self._generate(self._cursor.speak(), time_s, answer=False)
            return
        start = time.perf_counter()
        header, note = self.fmt.speak_ids(), self.fmt.note_ids()
        shared = fork(header, note)
        ids = self._pending + header
        rows = self._forward(ids, None, keep=[len(self._pending) + shared - 1, len(ids) - 1])  # [2, V]
        self.cache_ids += ids
        self._pending = []
        if not self._prefers(rows[0], note[shared], header[shared]):
            yield from self._generate(self._cursor.speak(), time_s, answer=False, logits=rows[1], start=start)
            return
        self._drop_from_cache(len(header) - shared)
        self._cursor.note()
        self._record(note)
        self.cache_ids += note[shared:]
        logits = self._forward(note[shared:], None, keep=[len(note) - shared - 1])[0]
        out, _ = yield from self._decode_text(logits, time_s, answer=False, shown=False)
        self._pending += self._cursor.end_note()
        self._record([self.fmt.eos_id])
        text = self.fmt.tokenizer.decode(out, skip_special_tokens=True).strip()
        self._entries.append(_Entry("note", time_s, text=text, token_ids=tuple(out)))
        # After the note: answer ("\nAssistant:") or go on watching ("\n[").
        answer, reopen = self.fmt.answer_after_note_ids(), self.fmt.reopen_ids()
        shared = fork(answer, reopen)
        ids = self._pending + answer
        rows = self._forward(ids, None, keep=[len(self._pending) + shared - 1, len(ids) - 1])  # [2, V]
        answered = self._prefers(rows[0], answer[shared], reopen[shared])
        yield NoteEvent(time_s, text, tuple(out), answered, time.perf_counter() - start)
        if not answered:
            self._cache.crop(-len(ids))  # the eos stays pending, the cursor at "note": the next frame reopens
            return
        self.cache_ids += ids
        self._pending = []
        yield from self._generate(self._cursor.answer_note(), time_s, answer=False, logits=rows[1])

    def _prefers(self, logits: torch.Tensor, first: int, second: int) -> bool:
        """Whether the model's next token is likelier `first` than `second` (a choice between two continuations)."""
        return bool(logits[first] > logits[second])

    def _drop_from_cache(self, count: int) -> None:
        """Forget the last `count` forwarded ids (a continuation the model did not choose)."""
        if count:
            self._cache.crop(-count)
            del self.cache_ids[-count:]

    def _generate(self, prefix: list[int], time_s: float, answer: bool, logits: torch.Tensor | None = None,
                  start: float | None = None) -> Iterator[TokenEvent | ResponseEvent]:
        """Prefill `prefix` (speak or query header), decode until eos or the cap, leave eos pending.

        `logits`: the prediction after `prefix` where the caller has already forwarded it (`_speak`), which is then
        only recorded. Yields a TokenEvent per token as it is decoded, then the ResponseEvent."""
        start = time.perf_counter() if start is None else start
        self._record(prefix)
        if logits is None:
            ids = self._pending + prefix
            self.cache_ids += ids
            self._pending = []
            logits = self._forward(ids, None, keep=[len(ids) - 1])[0]
        out, reason = yield from self._decode_text(logits, time_s, answer)
        self._pending += self._cursor.end_response()
        self._record([self.fmt.eos_id])
        text = self.fmt.tokenizer.decode(out, skip_special_tokens=True).strip()
        self._entries.append(_Entry("answer" if answer else "response", time_s, text=text, token_ids=tuple(out)))
        yield ResponseEvent(time_s, text, tuple(out), time.perf_counter() - start, reason, answer)

    def _decode_text(self, logits: torch.Tensor, time_s: float, answer: bool, shown: bool = True
                     ) -> Generator[TokenEvent, None, tuple[list[int], Literal["eos", "max_tokens"]]]:
        """Decode from `logits` until eos or the cap (eos itself is neither fed nor kept). Yields a TokenEvent per
        token when `shown`; returns (the ids, why it ended). The cap's last token waits in `_pending`."""
        out: list[int] = []
        reason: Literal["eos", "max_tokens"] = "max_tokens"
        while True:
            token = self._sample(logits, out)
            if token == self.fmt.eos_id:
                reason = "eos"
                break
            out.append(token)
            if shown:
                yield TokenEvent(time_s, token, answer)
            if len(out) >= self.config.max_new_tokens:
                self._pending = [token]  # fed with the eos by the next forward: the cache stays in layout
                break
            self.cache_ids.append(token)
            guess = self._lookup(self.config.max_new_tokens - len(out) - 1)
            if not guess:
                logits = self._decode(token)
                continue
            # [token, *guess] in one forward: row i holds the logits after guess[:i]; keep the guessed tokens
            # the model picks itself, then forget the rest of the guess from the cache.
            rows = self._forward([token, *guess], None, keep=list(range(len(guess) + 1)))  # [G+1, V]
            kept = 0
            while kept < len(guess) and self._sample(rows[kept], out) == guess[kept]:
                out.append(guess[kept])
                self.cache_ids.append(guess[kept])
                if shown:
                    yield TokenEvent(time_s, guess[kept], answer)
                kept += 1
            if kept < len(guess):
                self._cache.crop(-(len(guess) - kept))
            logits = rows[kept]
        self._record(out)
        return out, reason

    def _lookup(self, room: int) -> list[int]:
        """Prompt lookup (`engine.prompt_lookup`): the tokens that followed the latest earlier occurrence of the
        cache's last 3 (else 2) tokens, at most `room` and `prompt_lookup` of them, up to the first special token
        (an eos, a frame placeholder): a guess at the response's next tokens; [] = none."""
        count = min(self.config.prompt_lookup, room)
        ids = self.cache_ids
        if count <= 0:
            return []
        for size in (3, 2):
            if len(ids) <= size:
                continue
            tail, found, start = ids[-size:], -1, 0
            try:  # list.index runs in C: only the occurrences of the tail's first token cost Python steps
                while True:
                    at = ids.index(tail[0], start, len(ids) - size)  # at + size <= len(ids) - 1: something follows
                    if ids[at:at + size] == tail:
                        found = at
                    start = at + 1
            except ValueError:
                pass
            guess: list[int] = []
            for token in ids[found + size:found + size + count] if found >= 0 else []:
                if token in self._special_ids:
                    break
                guess.append(token)
            if guess:
                return guess
        return []

    def _sample(self, logits: torch.Tensor, generated: list[int]) -> int:
        """Next token from `logits [V]`: greedy, or temperature / top-p sampling; repetition penalty on
        the tokens of this response. The frame placeholder is never generated (it has no embedding)."""
        scores = logits.float()[None].clone()  # [1, V]
        if self.fmt.placeholder_id < scores.shape[-1]:
            scores[0, self.fmt.placeholder_id] = -float("inf")
        if generated and self.config.repetition_penalty != 1.0:
            history = torch.tensor([generated], device=scores.device)
            scores = RepetitionPenaltyLogitsProcessor(self.config.repetition_penalty)(history, scores)
        if self.config.temperature <= 0:
            return int(scores.argmax(-1))
        scores = TemperatureLogitsWarper(self.config.temperature)(None, scores)
        if self.config.top_p < 1.0:
            scores = TopPLogitsWarper(self.config.top_p)(None, scores)
        probs = torch.softmax(scores, dim=-1).cpu()
        return int(torch.multinomial(probs[0], 1, generator=self._generator))

    # -- the LLM -------------------------------------------------------------------------------------

    @torch.no_grad()
    def _forward(self, ids: list[int], inputs: torch.Tensor | None, keep: list[int]) -> torch.Tensor:
        """Forward `ids` on the cache (which grows in place); logits `[len(keep), V]` at positions `keep`.

        `inputs` are the connector's inputs of the placeholders in `ids` (`model.frame_inputs`, `[..., D']`).
        Only the kept positions go through the LM head: a rebuild or a multi-frame forward needs a few.
        """
        device = self.model.device
        input_ids = torch.tensor([ids], device=device)
        if inputs is not None:
            inputs = inputs.reshape(-1, inputs.shape[-1]).to(device)  # [P, D']
        embeds = self.model.embed_inputs(input_ids, inputs)
        out = self.model.llm(inputs_embeds=embeds, use_cache=True, logits_to_keep=torch.tensor(keep, device=device),
                             **{CACHE_KWARG: self._cache})
        return out.logits[0]

    def _decode(self, token: int) -> torch.Tensor:
        """Feed one generated token; → the logits `[V]` after it (the eager forward or the static step)."""
        if self.config.decode == "eager":
            return self._forward([token], None, keep=[0])[0]
        return self._static_decode(token)

    @torch.no_grad()
    def _static_decode(self, token: int) -> torch.Tensor:
        """`_decode` through the static step (`_static_step`, compiled with "compiled"); logits `[V]`."""
        if self._step_cache is None:  # after the header's prefill: the layers exist and hold their buffers
            self._step_cache = StaticStepCache(self._cache)
            self._decode_step = _static_step
            if self.config.decode == "compiled":
                self._decode_step = compiled_step(self.model.device, self.compile_backend)
        assert self._decode_step is not None
        self._step_cache.prepare(self.cache_length)
        input_ids = torch.tensor([[token]], device=self.model.device)
        if self.config.decode == "compiled" and self.model.device.type == "cuda":
            torch.compiler.cudagraph_mark_step_begin()  # the previous step's logits may be overwritten now
        logits = self._decode_step(self.model.llm, self._step_cache, input_ids)  # [1, V]
        self._step_cache.advance()
        return logits[0]

    # -- bounded memory ------------------------------------------------------------------------------

    def _check_budget(self) -> None:
        need = len(self._head_ids) + self._reserve() + 2 * len(self.fmt.frame_ids(False))
        if self.max_cache_tokens < need:
            raise ValueError(f"max_cache_tokens={self.max_cache_tokens} is too small: the prompt, one frame and a "
                             f"response of max_new_tokens={self.config.max_new_tokens} need {need}; raise it or "
                             "lower engine.max_new_tokens")

    def _reserve(self) -> int:
        """Room a response needs after the last frame: "]\\nAssistant:", max_new_tokens, eos, "\\n["; with notes, a
        note before it ("]\\nNote:", max_new_tokens, eos, then "\\nAssistant:")."""
        reply = len(self.fmt.speak_ids()) + self.config.max_new_tokens + 1 + len(self.fmt.reopen_ids())
        if not self.fmt.config.note_role:
            return reply
        note = len(self.fmt.note_ids()) + self.config.max_new_tokens + 1 + len(self.fmt.answer_after_note_ids())
        return note + reply

    def _frames_in_cache(self) -> int:
        return sum(entry.kind == "frame" for entry in self._entries)

    def _make_room(self, count: int) -> int:
        """Make room for up to `count` frames (rebuilding when needed); return how many fit (>= 1)."""
        if self._frames_that_fit(count) < 1:
            self._rebuild()
        return max(1, self._frames_that_fit(count))

    def _frames_that_fit(self, count: int) -> int:
        per_frame = len(self.fmt.frame_ids(False))
        used = self.cache_length + len(self._pending) + len(self.fmt.reopen_ids()) + self._reserve()
        room = (self.max_cache_tokens - used) // per_frame
        if self.config.window_frames > 0:
            room = min(room, self.config.window_frames - self._frames_in_cache())
        return min(count, room)

    def _ensure_room(self, tokens: int) -> None:
        if self.cache_length + len(self._pending) + tokens > self.max_cache_tokens:
            self._rebuild()

    def _rebuild(self) -> None:
        """Drop the oldest part of the record and re-forward the rest (see the class docstring)."""
        keep_from = self._cut_index()
        dropped, kept = self._entries[:keep_from], self._entries[keep_from:]
        self._pinned = self._pin(dropped)
        self._head_ids = self._head()
        cursor = _Cursor(self.fmt)
        ids = list(self._head_ids)
        for entry in kept:
            ids += cursor.replay(entry)
        frames = [entry.tokens for entry in kept if entry.kind == "frame"]  # raw [N, D] each
        dropped_frames = [entry.tokens for entry in dropped if entry.kind == "frame"]
        if dropped_frames:  # the kept frames' inputs are derived as when they were first fed: exact replay
            self._before_record = dropped_frames[-1]
        if not self.windowed:
            log.info("stream reached %d cached tokens / %d frames: switching to a sliding window (system prompt, "
                     "%d pinned queries, the last %d frames; budget %d tokens%s)", self.cache_length,
                     self._frames_in_cache(), len(self._pinned), len(frames), self.max_cache_tokens,
                     f", {self.config.window_frames} frames" if self.config.window_frames else "")
            self.windowed = True
        clear_cache(self._cache)  # the buffers stay: a rebuild allocates nothing
        inputs = self.model.frame_inputs(torch.stack(frames), self._before_record) if frames else None
        self._forward_chunked(ids, inputs)
        self._entries, self._cursor, self.cache_ids, self._pending = kept, cursor, ids, []

    def _cut_index(self) -> int:
        """The first kept entry: a frame; the kept part within half the budget (or half the frame window).

        The last frame is always kept (a query must follow a frame).
        """
        cursor = _Cursor(self.fmt)
        sizes = [len(cursor.replay(entry)) for entry in self._entries]
        target = self.max_cache_tokens // 2 - len(self._head_ids) - self._reserve()
        frame_target = self.config.window_frames // 2 if self.config.window_frames else len(self._entries)
        tokens = frames = 0
        cut = len(self._entries)
        for index in range(len(self._entries) - 1, -1, -1):
            tokens += sizes[index]
            frames += self._entries[index].kind == "frame"
            over = tokens > target or frames > frame_target
            if over and cut < len(self._entries):
                break
            if self._entries[index].kind == "frame":
                cut = index
            if over:
                break
        return cut

    def _pin(self, dropped: list[_Entry]) -> list[tuple[str, str]]:
        """The queries (and answers) to keep after the system prompt: the latest, within a quarter budget."""
        turns = list(self._pinned)
        for index, entry in enumerate(dropped):
            if entry.kind == "user":
                answer = dropped[index + 1].text if index + 1 < len(dropped) else ""
                turns.append((entry.text, answer))
        kept: list[tuple[str, str]] = []
        budget = self.max_cache_tokens // 4
        for turn in reversed(turns):
            candidate = [turn, *kept]
            if len(self._render_head(candidate)) > budget:
                break
            kept = candidate
        return kept

    def _head(self) -> list[int]:
        return self._render_head(self._pinned) if self._pinned else self.fmt.prompt_ids(self.system_prompt)

    def _render_head(self, turns: list[tuple[str, str]]) -> list[int]:
        """System prompt + pinned turns, ending with "\\n[" as the training render of that conversation."""
        items: list[Message | Frames] = [Message("system", self.system_prompt)]
        for query, answer in turns:
            items.append(Message("user", query))
            if answer:
                items.append(Message("assistant", answer))
        items.append(Frames(1))
        return self.fmt.render(items).input_ids[:-len(self.fmt.frame_ids(first_in_run=True))]

    def _forward_chunked(self, ids: list[int], inputs: torch.Tensor | None) -> None:
        """Fill the (fresh) cache with `ids`, REBUILD_CHUNK_TOKENS at a time; `inputs` `[T, N, D']` are the
        connector's inputs of their frames (a chunk may end inside a frame)."""
        used = 0
        for start in range(0, len(ids), REBUILD_CHUNK_TOKENS):
            chunk = ids[start:start + REBUILD_CHUNK_TOKENS]
            count = sum(t == self.fmt.placeholder_id for t in chunk)
            tokens = None
            if count:
                assert inputs is not None
                tokens = inputs.reshape(-1, inputs.shape[-1])[used:used + count]
            used += count
            self._forward(chunk, tokens, keep=[len(chunk) - 1])


# ---------------------------------------------------------------------------------------------------
# the static decode step


def _static_step(llm: torch.nn.Module, cache: StaticStepCache, input_ids: torch.Tensor) -> torch.Tensor:
    """One response token `input_ids [1, 1]` at `cache.position` → logits `[1, V]`, with the same shapes at
    every step (what `torch.compile` captures). The token is never the frame placeholder (`_sample`), so its
    embedding is the table's, as `LiveModel.embed_inputs` gives it."""
    embeds = llm.get_input_embeddings()(input_ids)  # [1, 1, H]
    out = llm(inputs_embeds=embeds, position_ids=cache.position[None], use_cache=True, logits_to_keep=1,
              **{CACHE_KWARG: cache})
    return out.logits[0]


def compiled_step(device: torch.device, backend: str | Callable = "inductor") -> Callable[..., torch.Tensor]:
    """`_static_step` under `torch.compile`: CUDA graphs ("reduce-overhead") on a GPU, the default mode
    elsewhere. Compiling happens at the first call; dynamo keeps the result with `_static_step`'s code,
    so later calls, and later sessions of the same model and cache shapes, replay it."""
    mode = "reduce-overhead" if device.type == "cuda" and backend == "inductor" else None
    return torch.compile(_static_step, backend=backend, mode=mode)
