"""The async pipeline on a synthetic-world video, a tiny random DINOv2 and a tiny random LLM."""

import threading
import time

import numpy as np
import pytest
import torch
from transformers import Dinov2Config, Dinov2Model

from conftest import bias_separator
from livevlm.config import EngineConfig, FormatConfig
from livevlm.engine import FrameEvent, QueryEvent, ResponseEvent, StreamPipeline, StreamSession, TokenEvent
from livevlm.model import LiveModel
from livevlm.stream_format import StreamFormat, register_placeholder
from livevlm.video import read_frames
from livevlm.vision import build_frame_encoder
from livevlm.world import WorldSpec, render_video

FPS = 2.0
SIZE = 28


@pytest.fixture(scope="module")
def video(tmp_path_factory):
    path = tmp_path_factory.mktemp("world") / "world.mp4"
    render_video(WorldSpec(seed=1, duration=8.0, size=64, video_fps=10), path)
    return path


@pytest.fixture(scope="module")
def encoder():
    torch.manual_seed(0)
    config = Dinov2Config(hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16,
                          image_size=SIZE, patch_size=14)
    return build_frame_encoder(Dinov2Model(config).eval(), image_size=SIZE, pooled_token=True, grid=1)


@pytest.fixture
def fmt(tiny_tokenizer):
    register_placeholder(tiny_tokenizer)
    return StreamFormat(tiny_tokenizer, FormatConfig(), tokens_per_frame=2)


@pytest.fixture
def model(fmt, tiny_llm):
    """Random weights, with the separator as the argmax at frames (P(sep) still varies frame to frame)."""
    torch.manual_seed(1)
    return bias_separator(LiveModel(tiny_llm, 8, fmt.placeholder_id).eval(), fmt.separator_id, 3.0)


def source(video):
    return read_frames(video, fps=FPS, size=SIZE)


def reference_events(model, fmt, config, encoder, video, queries):
    """The plain sequential loop: every frame encoded, then stepped alone; queries before later frames.
    Every event, response tokens included, as the pipeline yields them. video: a file, or decoded frames."""
    decoded = video if isinstance(video, list) else list(source(video))
    tokens = encoder.encode(np.stack([frame for _, frame in decoded]))
    session = StreamSession(model, fmt, config)
    pending = sorted(queries)
    events = []
    for i, (time_s, _) in enumerate(decoded):
        while pending and pending[0][0] < time_s - 1e-6:
            when, text = pending.pop(0)
            session.add_query(text, time_s=when)
        events += session.step_events(tokens[i:i + 1], [time_s])
    for when, text in pending:
        session.add_query(text, time_s=when)
    return events + list(session.flush_events())


def mixed_config(model, fmt, encoder, video, **options) -> EngineConfig:
    silent = reference_events(model, fmt, EngineConfig(threshold=0.0), encoder, video, [])
    p_sep = sorted(1.0 - e.p_speak for e in silent if isinstance(e, FrameEvent))
    k = len(p_sep) // 4
    return EngineConfig(threshold=(p_sep[k - 1] + p_sep[k]) / 2, max_new_tokens=5, **options)


def assert_same_events(got, expected):
    assert [(type(e), e.time_s) for e in got] == [(type(e), e.time_s) for e in expected]
    assert [e for e in got if not isinstance(e, FrameEvent)] == [e for e in expected if not isinstance(e, FrameEvent)]
    got_p = [e.p_speak for e in got if isinstance(e, FrameEvent)]
    expected_p = [e.p_speak for e in expected if isinstance(e, FrameEvent)]
    assert got_p == pytest.approx(expected_p, abs=1e-4)


def assert_stopped(pipeline):
    assert all(not thread.is_alive() for thread in pipeline.threads)


def test_fast_pipeline_gives_the_events_of_the_sequential_loop(model, fmt, encoder, video):
    config = mixed_config(model, fmt, encoder, video, max_frames_per_forward=4)
    queries = [(0.0, "Narrate."), (2.2, "What just happened?"), (60.0, "Anything else?")]
    expected = reference_events(model, fmt, config, encoder, video, queries)
    pipeline = StreamPipeline(StreamSession(model, fmt, config), encoder, source(video), queries=queries, max_batch=3)
    got = list(pipeline.events())
    assert_same_events(got, expected)
    spoken = sum(isinstance(e, ResponseEvent) and not e.answer_to_query for e in got)
    assert 2 <= spoken <= 14  # mixed decisions
    assert (pipeline.summary.frames, pipeline.summary.responses) == (16, spoken + 3)  # 3 answers, one at the end
    assert_stopped(pipeline)


def test_realtime_pipeline_paces_frames_and_catches_up_without_dropping(model, fmt, encoder, video):
    """A stall (here: the first encode takes 2 s) makes frames wait; they are then forwarded together."""
    import time

    calls = []

    def slow_first_encode(frames):
        calls.append(len(frames))
        if len(calls) == 1:
            time.sleep(2.0)
        return encoder.encode(frames)

    config = EngineConfig(threshold=0.0, max_frames_per_forward=8)
    frames = list(source(video))[:6]  # 0 .. 2.5 s
    pipeline = StreamPipeline(StreamSession(model, fmt, config), slow_first_encode, frames, realtime=True)
    summary = pipeline.run()
    assert summary.frames == 6 and sum(calls) == 6
    assert summary.elapsed_s >= 2.5 - 0.05  # paced: the last frame is released at 2.5 s
    assert summary.max_frames_per_step > 1 and summary.max_lag_s >= 1.5  # frame 0 waited for the encoder
    assert_stopped(pipeline)


def test_the_pipeline_gives_each_batch_the_frame_before_it(fmt, tiny_llm, video):
    """A `change_hues` encoder compares each frame with the one before: the pipeline, encoding 2 frames at a
    time, must pass each batch the last frame of the batch before to give the sequential loop's events."""
    torch.manual_seed(0)
    config = Dinov2Config(hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16,
                          image_size=SIZE, patch_size=14)
    encoder = build_frame_encoder(Dinov2Model(config).eval(), image_size=SIZE, pooled_token=True, grid=1,
                                  hue_bins=3, change_hues=True)
    torch.manual_seed(1)
    model = bias_separator(LiveModel(tiny_llm, 8 + 3 + 3, fmt.placeholder_id).eval(), fmt.separator_id, 3.0)
    engine = mixed_config(model, fmt, encoder, video)
    expected = reference_events(model, fmt, engine, encoder, video, [(0.0, "Narrate.")])
    pipeline = StreamPipeline(StreamSession(model, fmt, engine), encoder, source(video), queries=[(0.0, "Narrate.")],
                              max_batch=2)
    assert_same_events(list(pipeline.events()), expected)


def test_ask_from_another_thread_is_answered(model, fmt, encoder, video):
    config = EngineConfig(threshold=0.0, max_new_tokens=3)
    pipeline = StreamPipeline(StreamSession(model, fmt, config), encoder, source(video))
    asked = []

    def on_event(event):
        if isinstance(event, FrameEvent) and event.time_s == 1.0:
            asker = threading.Thread(target=pipeline.ask, args=("What is on the left?",))
            asker.start()
            asker.join()
            asked.append(event.time_s)

    events = []
    pipeline.on_event = lambda event: (events.append(event), on_event(event))
    pipeline.run()
    queries = [e for e in events if isinstance(e, QueryEvent)]
    assert asked == [1.0] and [q.text for q in queries] == ["What is on the left?"]
    answer = next(e for e in events[events.index(queries[0]) + 1:] if not isinstance(e, TokenEvent))
    assert isinstance(answer, ResponseEvent) and answer.answer_to_query
    assert sum(isinstance(e, FrameEvent) for e in events) == 16  # nothing lost around the query


def test_long_responses_do_not_stall_encoding(model, fmt, encoder, video):
    encoded = []

    def encode(frames):
        encoded.append(len(frames))
        return encoder.encode(frames)

    config = EngineConfig(threshold=1.0, max_new_tokens=30, max_frames_per_forward=1)  # every frame speaks
    pipeline = StreamPipeline(StreamSession(model, fmt, config), encode, source(video), max_batch=1)
    at_first_response = []
    for event in pipeline.events():
        if isinstance(event, ResponseEvent) and not at_first_response:
            at_first_response.append(sum(encoded))
    assert at_first_response[0] > 1  # the encoder ran ahead while the LLM generated
    assert sum(encoded) == 16


def test_a_video_that_ends_mid_response_finishes_the_response_and_stops(model, fmt, encoder, video):
    # every frame speaks, so the last frame's response is still being generated when the source ends
    config = EngineConfig(threshold=1.0, max_new_tokens=6, max_frames_per_forward=1)
    pipeline = StreamPipeline(StreamSession(model, fmt, config), encoder, source(video))
    events = list(pipeline.events())
    last_frame = max(e.time_s for e in events if isinstance(e, FrameEvent))
    final = [e for e in events if isinstance(e, ResponseEvent) and e.time_s == last_frame]
    assert len(final) == 1 and final[0].reason in ("eos", "max_tokens") and events[-1] is final[0]
    assert pipeline.summary.frames == 16 and pipeline.summary.responses == 16
    assert_stopped(pipeline)


def noise_frames(count: int) -> list[tuple[float, np.ndarray]]:
    """Frames that differ from each other (a synthetic-world video repeats frames): `(time_s, frame)`."""
    rng = np.random.default_rng(0)
    return [(i / FPS, rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)) for i in range(count)]


class SlowEncoderThread:
    """The fixture's encoder, slow on the pipeline's encoder thread (so the LLM stage catches up and encodes frames
    itself); records who encoded which frames (by index in `decoded`) and the frame each call was given as the one
    before (`calls`), and when each call ran (`spans`: (start, end), the slow part included)."""

    def __init__(self, encoder, decoded, seconds_per_frame=0.05):
        self.encoder, self.decoded, self.calls, self.spans = encoder, decoded, [], []
        self.seconds_per_frame = seconds_per_frame

    def index(self, frame):
        return next(i for i, (_, known) in enumerate(self.decoded) if np.array_equal(known, frame))

    def encode(self, frames, previous=None):
        thread, began = threading.current_thread().name, time.perf_counter()
        if thread == "livevlm-encoder":
            time.sleep(self.seconds_per_frame * len(frames))
        self.calls.append((thread, self.index(frames[0]), len(frames),
                           None if previous is None else self.index(previous)))
        tokens = self.encoder.encode(frames, previous=previous)
        self.spans.append((began, time.perf_counter()))
        return tokens


def test_the_llm_stage_encodes_frames_queued_behind_a_slow_encoder_and_steps_them_in_order(model, fmt, encoder,
                                                                                             video):
    frames = noise_frames(24)
    config = mixed_config(model, fmt, encoder, frames, max_frames_per_forward=4)
    expected = reference_events(model, fmt, config, encoder, frames, [(0.0, "Narrate.")])
    slow = SlowEncoderThread(encoder, frames)
    pipeline = StreamPipeline(StreamSession(model, fmt, config), slow, frames, queries=[(0.0, "Narrate.")],
                              max_batch=4, llm_encodes=2)
    assert_same_events(list(pipeline.events()), expected)
    assert "MainThread" in {thread for thread, *_ in slow.calls}  # the caller's thread encoded some runs
    runs = sorted((first, count, previous) for _, first, count, previous in slow.calls)
    assert [first for first, _, _ in runs] == [0] + list(np.cumsum([count for _, count, _ in runs])[:-1])
    assert sum(count for _, count, _ in runs) == 24  # every frame encoded once, in contiguous runs
    assert [previous for first, _, previous in runs] == [None if first == 0 else first - 1 for first, _, _ in runs]


def test_llm_encodes_0_leaves_every_frame_to_the_encoder_thread(model, fmt, encoder):
    frames = noise_frames(12)
    slow = SlowEncoderThread(encoder, frames)
    pipeline = StreamPipeline(StreamSession(model, fmt, EngineConfig(threshold=0.0)), slow, frames,
                              max_batch=4, llm_encodes=0)
    pipeline.run()
    assert {thread for thread, *_ in slow.calls} == {"livevlm-encoder"}


class RecordingSession(StreamSession):
    """Records each LLM forward as (start, end, torch's intra-op threads of the LLM stage); each forward takes
    `delay_s` more, and `hold` runs before the first one."""

    def __init__(self, *args, delay_s=0.0, hold=lambda: None, **kwargs):
        super().__init__(*args, **kwargs)
        self.delay_s, self.hold, self.forwards = delay_s, hold, []

    def _forward(self, ids, inputs, keep):
        if not self.forwards:
            self.hold()
        began, threads = time.perf_counter(), torch.get_num_threads()
        time.sleep(self.delay_s)
        logits = super()._forward(ids, inputs, keep)
        self.forwards.append((began, time.perf_counter(), threads))
        return logits

    def threads(self):
        return [threads for _, _, threads in self.forwards]


def test_the_llm_stage_takes_the_idle_threads_once_the_encoder_is_done(model, fmt, encoder):
    frames = noise_frames(6)
    pipeline = None

    def wait_for_the_encoder_thread():
        pipeline.threads[1].join(timeout=10)  # every frame encoded and queued

    session = RecordingSession(model, fmt, EngineConfig(threshold=0.0, max_frames_per_forward=1),
                               hold=wait_for_the_encoder_thread)
    pipeline = StreamPipeline(session, encoder, frames, max_batch=1, llm_encodes=0, num_threads=1, idle_threads=2)
    before = torch.get_num_threads()
    pipeline.run()
    assert session.threads()[1:] == [2] * 5  # θ = 0: silent, one forward per frame
    assert torch.get_num_threads() == before


def test_the_llm_stage_keeps_its_own_threads_while_the_encoder_works(model, fmt, encoder):
    frames = noise_frames(6)
    slow = SlowEncoderThread(encoder, frames, seconds_per_frame=0.2)
    session = RecordingSession(model, fmt, EngineConfig(threshold=0.0, max_frames_per_forward=1))
    pipeline = StreamPipeline(session, slow, frames, max_batch=1, llm_encodes=0, num_threads=1, idle_threads=2)
    pipeline.run()
    assert len(session.threads()) == 6
    assert session.threads()[:-1] == [1] * 5  # the last step may come after the encoder has finished


def test_the_encoder_thread_never_encodes_while_the_llm_stage_runs_on_its_cores(model, fmt, encoder):
    """A fast encoder and a one-run queue: the encoder is ahead at most steps and frees a slot at every one.
    Whether the LLM stage lends before the last frame is encoded depends on thread scheduling, so the stream
    runs until it did (at most 5 times); no run may encode during a forward on lent cores."""
    lent_early = 0
    for _ in range(5):
        frames = noise_frames(16)
        timed = SlowEncoderThread(encoder, frames, seconds_per_frame=0.0)
        session = RecordingSession(model, fmt, EngineConfig(threshold=0.0, max_frames_per_forward=1), delay_s=0.03)
        pipeline = StreamPipeline(session, timed, frames, max_batch=1, queue_size=1, llm_encodes=0,
                                  num_threads=1, idle_threads=2)
        pipeline.run()
        lent = [(start, end) for start, end, threads in session.forwards if threads == 2]
        assert not [(forward, call) for forward in lent for call in timed.spans
                    if forward[0] < call[1] and call[0] < forward[1]]
        last_encode = max(end for _, end in timed.spans)
        lent_early = sum(start < last_encode for start, _ in lent)
        if lent_early:
            break
    assert lent_early  # lent while the encoder still had frames to encode


class EncoderFailure(RuntimeError):
    pass


@pytest.mark.parametrize("error", [EncoderFailure("bad frame"), KeyboardInterrupt()])
def test_an_error_in_the_encoder_stops_every_stage_and_is_reraised(model, fmt, encoder, video, error):
    calls = []

    def encode(frames):
        calls.append(1)
        if len(calls) == 3:
            raise error
        return encoder.encode(frames)

    frames = source(video)
    pipeline = StreamPipeline(StreamSession(model, fmt, EngineConfig(threshold=0.0)), encode, frames, max_batch=1)
    with pytest.raises(type(error)):
        pipeline.run()
    assert_stopped(pipeline)
    assert not frames.running  # the decode thread of the video source stopped too


def test_ctrl_c_in_the_consumer_stops_every_stage(model, fmt, encoder, video):
    def on_event(event):
        if isinstance(event, FrameEvent) and event.time_s >= 1.0:
            raise KeyboardInterrupt

    frames = source(video)
    pipeline = StreamPipeline(StreamSession(model, fmt, EngineConfig(threshold=0.0)), encoder, frames,
                              on_event=on_event, max_batch=1, queue_size=2)
    with pytest.raises(KeyboardInterrupt):
        pipeline.run()
    assert_stopped(pipeline)
    assert not frames.running
