"""Batched sessions (`engine.batch.SessionBatch`) say what each session says stepped alone.

Each session's events are compared with those of the same session run alone with the eager loop: frame
times, queries, response token ids and texts exactly; p_speak within 1e-6, because the batched forward's
matmuls (`[K·L, H]` rows, the attention over a longer, masked key range) may sum in another order than one
session's: here most p_speak are bit-equal and the rest differ by at most ~2e-8 (a few float32 ulps), and the
decisions themselves agree (the thresholds between observed P(sep) values, `mixed_threshold`, leave far more
margin than that).
"""

from dataclasses import dataclass

import pytest
import torch

from livevlm.attention import NAME
from livevlm.config import EngineConfig, FormatConfig
from livevlm.engine import FrameEvent, NoteEvent, QueryEvent, ResponseEvent, SessionBatch, StreamSession
from livevlm.engine.kv_cache import BatchedCache
from livevlm.stream_format import StreamFormat, fork, register_placeholder
from test_engine import N, fmt, frames, mixed_threshold, random_model  # noqa: F401 (fixtures)

QUERY = "What just happened?"


@dataclass
class Stream:
    """One session's config and frames; `query_at`: the step before which it is asked `QUERY`."""

    config: EngineConfig
    tokens: torch.Tensor  # [T, N, D]
    times: list[float]
    query_at: int | None = None
    system_prompt: str | None = None


def run_alone(model, layout, stream: Stream, chunk: int, max_cache_tokens: int | None = None
              ) -> tuple[list, StreamSession]:
    """The stream through its own StreamSession, `chunk` frames a step."""
    session = StreamSession(model, layout, stream.config, system_prompt=stream.system_prompt, record_fed_ids=True,
                            max_cache_tokens=max_cache_tokens)
    events = []
    for start in range(0, len(stream.times), chunk):
        if start == stream.query_at:
            session.add_query(QUERY)
        events += session.step(stream.tokens[start:start + chunk], stream.times[start:start + chunk])
    return events, session


def run_batched(model, layout, streams: list[Stream], chunk: int, max_cache_tokens: int | None = None
                ) -> tuple[list[list], list[StreamSession]]:
    """The streams as sessions of one SessionBatch, `chunk` frames each a step (fewer where a stream ends)."""
    batch = SessionBatch(model, layout, rows=len(streams), max_cache_tokens=max_cache_tokens)
    sessions = [batch.add(s.config, system_prompt=s.system_prompt, record_fed_ids=True) for s in streams]
    events: list[list] = [[] for _ in streams]
    for start in range(0, max(len(s.times) for s in streams), chunk):
        for session, stream in zip(sessions, streams, strict=True):
            if start == stream.query_at:
                session.add_query(QUERY)
        got = batch.step([s.tokens[start:start + chunk] for s in streams],
                         [s.times[start:start + chunk] for s in streams])
        for mine, new in zip(events, got, strict=True):
            mine += new
    return events, sessions


def assert_same_events(got: list, expected: list) -> None:
    """The same events in the same order: equal, but p_speak within 1e-6 (see the module docstring)."""
    assert [type(e) for e in got] == [type(e) for e in expected]
    for a, b in zip(got, expected, strict=True):
        if isinstance(a, FrameEvent):
            assert a.time_s == b.time_s and a.p_speak == pytest.approx(b.p_speak, abs=1e-6, rel=0)
        else:
            assert a == b


def spoken(events: list) -> int:
    return sum(isinstance(e, ResponseEvent) and not e.answer_to_query for e in events)


def three_streams(model, layout, count: int, system_prompt: str | None = None, **config) -> list[Stream]:
    """Three streams of different frames: two with mixed decisions (one asked a question), one at θ 0 (its
    separator wins nearly everywhere: it stays silent), so their caches grow apart."""
    streams = []
    for seed, query_at in ((0, None), (1, 13), (2, None)):
        tokens, times = frames(count, seed=seed)
        threshold = mixed_threshold(model, layout, tokens, times) if seed < 2 else 0.0
        config_k = EngineConfig(threshold=threshold, max_new_tokens=6, **config)
        streams.append(Stream(config_k, tokens, times, query_at, system_prompt))
    return streams


@pytest.mark.parametrize("attention", ["sdpa", "eager", NAME])
def test_batched_sessions_give_each_session_its_events_alone(fmt, random_model, attention):  # noqa: F811
    """Three sessions one frame a step, 30 steps: every step is one 3-row forward, and each session's
    decisions, responses and answer are those of the session alone, fed the same ids. With transformers'
    attention functions (SDPA takes the mask as bools, eager as additive floats) and livevlm's."""
    random_model.llm.set_attn_implementation(attention)
    streams = three_streams(random_model, fmt, 30)
    rows = []  # the batch size of every LLM forward
    random_model.llm.register_forward_pre_hook(
        lambda module, args, kwargs: rows.append(kwargs["inputs_embeds"].shape[0]), with_kwargs=True)
    batched, sessions = run_batched(random_model, fmt, streams, chunk=1)
    assert rows.count(3) == 30
    for stream, events, session in zip(streams, batched, sessions, strict=True):
        expected, alone = run_alone(random_model, fmt, stream, chunk=1)
        assert_same_events(events, expected)
        assert session.fed_ids == alone.fed_ids and session.cache_length == alone.cache_length
    assert spoken(batched[0]) >= 3 and spoken(batched[1]) >= 3 and spoken(batched[2]) == 0
    assert any(isinstance(e, QueryEvent) for e in batched[1])
    assert len({session.cache_length for session in sessions}) == 3


def test_batched_multi_frame_steps_give_each_session_its_events_alone(fmt, random_model):  # noqa: F811
    """Five frames a step, up to four a forward: a frame that speaks in the middle crops its row's later
    frames, which go into the next round while the other rows move on (rows of unequal frame counts)."""
    streams = three_streams(random_model, fmt, 30, max_frames_per_forward=4)
    batched, _ = run_batched(random_model, fmt, streams, chunk=5)
    for stream, events in zip(streams, batched, strict=True):
        assert_same_events(events, run_alone(random_model, fmt, stream, chunk=5)[0])
    assert spoken(batched[0]) + spoken(batched[1]) >= 6


def test_rows_of_different_lengths_see_none_of_their_pads(fmt, random_model):  # noqa: F811
    """One session's first forward carries a long system prompt (~450 pending ids) next to a short one's
    (~20: its row is mostly pads), and a stream that starts late leaves its row all pads for four steps:
    no row's keys or queries reach another's, so each session's decisions are those it makes alone."""
    tokens, times = frames(12, seed=5)
    long_prompt = " ".join(["A multimodal AI assistant is helping users with some activities."] * 12)
    streams = [Stream(EngineConfig(threshold=0.0), tokens, times, system_prompt=long_prompt),
               Stream(EngineConfig(threshold=0.0), tokens, times, system_prompt="Watch."),
               Stream(EngineConfig(threshold=0.0), frames(12, seed=6)[0][4:], times[4:], system_prompt="Watch.")]
    batch = SessionBatch(random_model, fmt, rows=3)
    sessions = [batch.add(s.config, system_prompt=s.system_prompt) for s in streams]
    assert len(sessions[0]._pending) > 10 * len(sessions[1]._pending)
    got: list[list] = [[], [], []]
    for i in range(12):
        index = [i, i, i - 4]  # the third stream's first frame comes at step 4: until then it gets none
        step = batch.step([s.tokens[j:j + 1] if j >= 0 else s.tokens[:0] for s, j in zip(streams, index, strict=True)],
                          [s.times[j:j + 1] if j >= 0 else [] for s, j in zip(streams, index, strict=True)])
        for mine, new in zip(got, step, strict=True):
            mine += new
    for stream, events in zip(streams, got, strict=True):
        assert_same_events(events, run_alone(random_model, fmt, stream, chunk=1)[0])
    assert sessions[0].cache_length - sessions[1].cache_length > 400


def test_rebuilds_on_a_row_keep_each_session_its_events_alone(fmt, random_model):  # noqa: F811
    """A 100-token budget: the sessions' bounded-memory rebuilds clear and refill their rows alone, between
    batched forwards, and the later forwards write after the refilled prefix."""
    streams = three_streams(random_model, fmt, 40, system_prompt="Watch.", max_frames_per_forward=4)
    batched, sessions = run_batched(random_model, fmt, streams, chunk=3, max_cache_tokens=100)
    assert all(session.windowed for session in sessions)
    for stream, events in zip(streams, batched, strict=True):
        assert_same_events(events, run_alone(random_model, fmt, stream, chunk=3, max_cache_tokens=100)[0])


def test_notes_on_a_row_keep_each_session_its_events_alone(tiny_tokenizer, random_model):  # noqa: F811
    """A format with notes (the default model's): each choice (note or respond, then answer or watch on), the
    assistant header a note forgets and the answer header a watch forgets happen on the session's own row, and
    up to four frames a forward: the events and fed ids of each session alone."""
    register_placeholder(tiny_tokenizer)
    notes = StreamFormat(tiny_tokenizer, FormatConfig(note_role="Note"), tokens_per_frame=N)
    answer, reopen = notes.answer_after_note_ids(), notes.reopen_ids()
    with torch.no_grad():  # this random model notes at every speaking frame; -0.05: it answers after some notes
        random_model.llm.lm_head.bias[answer[fork(answer, reopen)]] = -0.05
    streams = three_streams(random_model, notes, 30, max_frames_per_forward=4)
    batched, sessions = run_batched(random_model, notes, streams, chunk=5)
    for stream, events, session in zip(streams, batched, sessions, strict=True):
        expected, alone = run_alone(random_model, notes, stream, chunk=5)
        assert_same_events(events, expected)
        assert session.fed_ids == alone.fed_ids and session.cache_length == alone.cache_length
    noted = [e for events in batched for e in events if isinstance(e, NoteEvent)]
    assert {e.answered for e in noted} == {True, False}  # both choices after a note were taken


def test_static_decode_on_a_row_gives_the_eager_events(fmt, random_model):  # noqa: F811
    """A session of the batch that decodes its responses through the static step writes into its row of
    the shared buffers at a position tensor: the same responses as the eager loop alone."""
    streams = three_streams(random_model, fmt, 20)
    streams[0].config = EngineConfig(threshold=streams[0].config.threshold, max_new_tokens=6, decode="static")
    batched, _ = run_batched(random_model, fmt, streams, chunk=1)
    eager = Stream(EngineConfig(threshold=streams[0].config.threshold, max_new_tokens=6), *frames(20, seed=0))
    assert spoken(batched[0]) >= 2
    assert_same_events(batched[0], run_alone(random_model, fmt, eager, chunk=1)[0])


def test_a_row_never_regrows_out_of_the_shared_buffers(random_model):  # noqa: F811
    """A row's layers are views of the shared buffers: what a session writes alone lands in its row, and a
    session asking for more than the row holds is refused instead of silently moving to new buffers that
    the batched forward would not see."""
    cache = BatchedCache(random_model.llm.config, rows=2, max_tokens=8)
    layer = cache.rows[1].layers[0]
    keys = torch.randn(1, cache.key_buffers[0].shape[1], 3, cache.key_buffers[0].shape[-1])
    layer.update(keys, -keys)
    assert torch.equal(cache.key_buffers[0][1, :, :3], keys[0]) and not cache.key_buffers[0][0].any()
    with pytest.raises(RuntimeError, match="holds 8 tokens, 9 were asked for"):
        layer.update(torch.cat([keys, keys], dim=2), torch.cat([keys, keys], dim=2))


def test_a_batch_holds_as_many_sessions_as_rows(fmt, random_model):  # noqa: F811
    batch = SessionBatch(random_model, fmt, rows=1)
    batch.add(EngineConfig())
    with pytest.raises(ValueError, match="all 1 rows of this batch hold a session"):
        batch.add(EngineConfig())


def test_a_removed_sessions_row_serves_the_next_session_as_a_fresh_one(fmt, random_model):  # noqa: F811
    """A server's sessions come and go: the row of a removed session (its cache holding 15 frames and a
    response) is taken by the next `add`, and that session says what it says alone; the session on the
    other row, batched with both in turn, goes on as if alone."""
    first, second, third = three_streams(random_model, fmt, 30)
    second.query_at = 15  # on a step boundary (5 frames a step)
    batch = SessionBatch(random_model, fmt, rows=2)
    old, other = batch.add(first.config), batch.add(third.config)
    got_old, got_other = batch.step([first.tokens[:15], third.tokens[:15]], [first.times[:15], third.times[:15]])
    assert spoken(got_old) >= 1
    batch.remove(old)
    assert batch.sessions == [None, other] and batch.free_rows == 1
    new = batch.add(second.config)
    assert batch.sessions == [new, other] and new.cache_length == 0
    got_new = []
    for start in range(0, 30, 5):  # the new stream 5 frames a step, the other 3 (none once it has ended)
        if start == second.query_at:
            new.add_query(QUERY)
        later = slice(15 + start * 3 // 5, min(30, 15 + start * 3 // 5 + 3))
        got = batch.step([second.tokens[start:start + 5], third.tokens[later]],
                         [second.times[start:start + 5], third.times[later]])
        got_new += got[0]
        got_other += got[1]
    assert_same_events(got_new, run_alone(random_model, fmt, second, chunk=5)[0])
    alone = StreamSession(random_model, fmt, third.config)
    expected_other = alone.step(third.tokens[:15], third.times[:15])
    for start in range(15, 30, 3):
        expected_other += alone.step(third.tokens[start:start + 3], third.times[start:start + 3])
    assert_same_events(got_other, expected_other)
    assert spoken(got_new) >= 1 and any(isinstance(e, QueryEvent) for e in got_new)


def test_removing_a_session_that_is_not_in_the_batch_is_refused(fmt, random_model):  # noqa: F811
    batch = SessionBatch(random_model, fmt, rows=1)
    session = batch.add(EngineConfig())
    batch.remove(session)
    with pytest.raises(ValueError, match="not in the batch"):
        batch.remove(session)
    with pytest.raises(ValueError, match="frames given for row 0, which holds no session"):
        batch.step_events([torch.zeros(1, fmt.tokens_per_frame, 8)], [[0.0]])
