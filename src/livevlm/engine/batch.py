"""Several streams on one model, their frames in one LLM forward: a GPU serving many cameras.

On a GPU one stream's frame forward is tiny (11 tokens of an 8B model at the official layout): the GPU
mostly waits on kernel launches and weight reads, whatever the batch. `SessionBatch` runs K `StreamSession`s
whose caches are the rows of one `kv_cache.BatchedCache` and forwards their waiting frames together:
inputs `[K, L, H]` (each row its pending ids and its frames' layout, left-padded to the longest), position
ids `[K, L]` from each row's fill mark, a mask `[K, 1, L, kv_length]` (each row sees its own prefix and its
new tokens causally, no pad), the keys written at each row's fill mark.

Everything else stays each session's own, in stream order, as when it is stepped alone: before the forward
a session answers its due queries and makes room (a rebuild) on its own row (`StreamSession._before_frames`);
after it, it decides at its frame ends, keeps the frames up to the first that speaks (cropping the rest)
and generates its response alone (`_act_on_frames`); frames it did not consume (those after a speaking
frame) go into the next round. So each session says what it says stepped alone: the same decisions, token
ids and texts, p_speak up to floating-point summation order (a `[K·L, H]` matmul may sum in another order
than one row's `[L, H]`; `tests/test_batch.py` compares at 1e-5).

    batch = SessionBatch(model, fmt, rows=16)
    sessions = [batch.add(EngineConfig()) for _ in range(16)]
    for k, event in batch.step_events([tokens_k, ...], [times_k, ...]):  # [T_k, N, D] and T_k times each
        ...
    batch.remove(sessions[3])  # its row is emptied, and the next `add` takes it (a server's sessions come and go)
"""

from __future__ import annotations

from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass
from typing import TypeVar

import torch
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, eager_mask, sdpa_mask

from livevlm.config import EngineConfig
from livevlm.engine.kv_cache import BatchedCache
from livevlm.engine.session import Event, StreamSession, TokenEvent
from livevlm.model import CACHE_KWARG, LiveModel
from livevlm.stream_format import StreamFormat

R = TypeVar("R")

# The mask builders whose 4D masks the attention takes as they are (SDPA's bool, eager's additive floats);
# livevlm's CPU attention (`livevlm.attention`) registers SDPA's.
MASK_BUILDERS = (sdpa_mask, eager_mask)


@dataclass
class _Part:
    """One session's part of a batched forward."""

    ids: list[int]
    ends: list[int]  # in ids, just after each frame's last token
    inputs: torch.Tensor  # [T, N, D'] the connector's inputs of its frames
    frame_tokens: torch.Tensor  # [T, N, D] raw
    times: list[float]
    decide: bool


class SessionBatch:
    """K streams on one model, their frame forwards batched (see the module docstring). Not thread-safe.

    Args:
        model: a LiveModel in eval mode (any device/dtype).
        fmt: the stream layout of every session.
        rows: K, the most sessions (`add`).
        max_cache_tokens: each session's KV budget, the capacity of its row (allocated at once, zeroed);
            None = the LLM's `max_position_embeddings`.
    Raises:
        ValueError: an LLM with sliding-window layers, or an attention that takes no 4D mask (flash, flex).
    """

    def __init__(self, model: LiveModel, fmt: StreamFormat, rows: int, max_cache_tokens: int | None = None) -> None:
        self.model = model
        self.fmt = fmt
        llm_config = model.llm.config
        attention = getattr(llm_config, "_attn_implementation", None) or "eager"
        self._mask_builder: Callable[..., torch.Tensor] = ALL_MASK_ATTENTION_FUNCTIONS.get(attention)
        if self._mask_builder not in MASK_BUILDERS:
            valid = sorted(name for name, builder in ALL_MASK_ATTENTION_FUNCTIONS.items() if builder in MASK_BUILDERS)
            raise ValueError(f"batched sessions need an attention that takes 4D masks, one of {valid}; this LLM uses "
                             f"{attention!r}")
        self.max_cache_tokens = max_cache_tokens or int(getattr(llm_config, "max_position_embeddings", 4096))
        dtype = next(model.llm.parameters()).dtype
        self.cache = BatchedCache(llm_config, rows, self.max_cache_tokens, model.device, dtype)
        self.sessions: list[StreamSession | None] = [None] * rows  # row k's session; None: a free row

    @property
    def free_rows(self) -> int:
        return self.sessions.count(None)

    def add(self, config: EngineConfig, **kwargs) -> StreamSession:
        """A new session on the first free row (`sessions.index(session)` is its row). `kwargs`:
        `StreamSession`'s (system_prompt, seed, record_fed_ids, compile_backend). Its queries are added to it
        (`add_query`), its frames go through `step_events`; alone it may `flush` (nothing of it is batched).

        Raises:
            ValueError: every row holds a session.
        """
        if not self.free_rows:
            raise ValueError(f"all {len(self.cache.rows)} rows of this batch hold a session")
        row = self.sessions.index(None)
        session = StreamSession(self.model, self.fmt, config, max_cache_tokens=self.max_cache_tokens,
                                cache=self.cache.rows[row], **kwargs)
        self.sessions[row] = session
        return session

    def remove(self, session: StreamSession) -> None:
        """Free the session's row for the next `add`: its cache is emptied (the fill mark back to 0; what the
        buffers held is never seen again, as a row sees only keys below its fill mark). Not during a
        `step_events` that feeds the session frames.

        Raises:
            ValueError: a session that is not in this batch.
        """
        rows = [k for k, held in enumerate(self.sessions) if held is session]
        if not rows:
            raise ValueError("this session is not in the batch (removed already, or added to another)")
        for layer in self.cache.rows[rows[0]].layers:
            layer.reset()
        self.sessions[rows[0]] = None

    def step_events(self, frame_tokens: list[torch.Tensor], times: list[list[float]]) -> Iterator[tuple[int, Event]]:
        """Feed each session its waiting frames, the sessions' frame forwards batched; yield `(k, event)` for
        session k's events as they happen (each session's in its own order, as its `step_events` yields them).

        As `StreamSession.step_events`: the work happens as the iterator is consumed (to the end); the
        arguments are checked here.

        Sessions added or removed while the iterator runs are not part of it (a removed one must not be fed in
        it); the sessions of other rows may meanwhile run alone (`flush_events`) between its events.

        Args:
            frame_tokens: one `[T_k, N, D]` per row, k = the row (T_k may differ, and be 0: no frame for it;
                a free row's must be 0). Fewer entries than rows: the rows after them get none.
            times: one list of T_k stream times per row.
        Raises:
            ValueError: more entries than rows, frames and times of different lengths, frames for a free row,
                or a session's frames that do not match its times or format.
        """
        if len(frame_tokens) != len(times) or len(times) > len(self.sessions):
            raise ValueError(f"step_events takes the frames and times of each row, at most {len(self.sessions)}; "
                             f"got {len(frame_tokens)} and {len(times)}")
        sessions = self.sessions[:len(times)]  # the rows' sessions as they are now
        for k, (session, tokens, when) in enumerate(zip(sessions, frame_tokens, times, strict=True)):
            if session is None and (when or len(tokens)):
                raise ValueError(f"frames given for row {k}, which holds no session")
            if session is not None and (when or len(tokens)):
                session._check_frames(tokens, when)
        return self._step(sessions, frame_tokens, times)

    def step(self, frame_tokens: list[torch.Tensor], times: list[list[float]]) -> list[list[Event]]:
        """`step_events` run to the end: each row's events, without TokenEvents."""
        events: list[list[Event]] = [[] for _ in times]
        for k, event in self.step_events(frame_tokens, times):
            if not isinstance(event, TokenEvent):
                events[k].append(event)
        return events

    def _step(self, sessions: list[StreamSession | None], frame_tokens: list[torch.Tensor], times: list[list[float]]
              ) -> Iterator[tuple[int, Event]]:
        fed = [0] * len(sessions)
        while any(done < len(when) for done, when in zip(fed, times, strict=True)):
            parts: dict[int, _Part] = {}
            for k, session in enumerate(sessions):
                if session is None or fed[k] == len(times[k]):
                    continue
                count, decide = yield from _tagged(k, session._before_frames(len(times[k]) - fed[k]))
                tokens, when = frame_tokens[k][fed[k]:fed[k] + count], times[k][fed[k]:fed[k] + count]
                ids, ends, inputs = session._prepare_frames(tokens)
                parts[k] = _Part(ids, ends, inputs, tokens, when, decide)
            logits = self._forward(parts)
            for k, part in parts.items():
                fed[k] += yield from _tagged(k, sessions[k]._act_on_frames(
                    part.ids, part.ends, logits[k], part.frame_tokens, part.times, part.decide))

    @torch.no_grad()
    def _forward(self, parts: dict[int, _Part]) -> dict[int, torch.Tensor]:
        """One LLM forward of the sessions' parts; → session k's logits `[T_k, V]` at its frame ends."""
        device = self.model.device
        used = max(parts) + 1  # rows [:used] go through (a row without a part is all pads)
        counts = [len(parts[k].ids) if k in parts else 0 for k in range(used)]
        width = max(counts)
        input_ids = torch.full((used, width), self.fmt.eos_id)  # [K', L]; pads: any id but the placeholder
        keep: dict[int, list[int]] = {}  # session → the positions of its frame ends (left-padded)
        for k, part in parts.items():
            input_ids[k, width - counts[k]:] = torch.tensor(part.ids)
            keep[k] = [width - counts[k] + end - 1 for end in part.ends]
        inputs = torch.cat([parts[k].inputs.flatten(0, 1) for k in sorted(parts)])  # [P, D'], row-major
        kept = sorted({position for positions in keep.values() for position in positions})
        position_ids, visible = self.cache.prepare(counts)
        embeds = self.model.embed_inputs(input_ids.to(device), inputs.to(device))  # [K', L, H]
        batch, _, length, kv_length = visible.shape
        mask = self._mask_builder(batch_size=batch, q_length=length, kv_length=kv_length,
                                  mask_function=lambda b, h, q, kv: visible[b, 0, q, kv], allow_is_causal_skip=False,
                                  dtype=embeds.dtype, device=device)  # [K', 1, L, kv_length] as the attention takes it
        out = self.model.llm(inputs_embeds=embeds, attention_mask=mask, position_ids=position_ids, use_cache=True,
                             logits_to_keep=torch.tensor(kept, device=device), **{CACHE_KWARG: self.cache})
        self.cache.advance(counts)
        column = {position: i for i, position in enumerate(kept)}
        return {k: out.logits[k, [column[p] for p in positions]] for k, positions in keep.items()}


def _tagged(index: int, events: Generator[Event, None, R]) -> Generator[tuple[int, Event], None, R]:
    """`yield from events`, each event as `(index, event)`; returns what `events` returns."""
    while True:
        try:
            event = next(events)
        except StopIteration as stop:
            return stop.value
        yield index, event
