"""The shipped default model through the engine, over a whole held-out synthetic-world video."""

import pytest
import torch

from livevlm.checkpoint import load_checkpoint
from livevlm.config import EngineConfig
from livevlm.default_model import default_model_path
from livevlm.engine import FrameEvent, ResponseEvent, StreamSession
from livevlm.stream_format import StreamFormat
from livevlm.video import read_frames
from livevlm.vision import model_frame_encoder
from livevlm.world import WorldSpec, render_video


@pytest.fixture(scope="module")
def default_stream(tmp_path_factory):
    loaded = load_checkpoint(default_model_path())
    mc = loaded.model_config
    fmt = StreamFormat(loaded.tokenizer, loaded.format_config, mc.tokens_per_frame)
    encoder = model_frame_encoder(mc, backend="torch")
    video = tmp_path_factory.mktemp("default") / "heldout.mp4"
    render_video(WorldSpec(seed=1, index=3, duration=30.0), video)  # seed 1: never seen in training
    frames = [frame for _, frame in read_frames(video, fps=2.0, size=encoder.image_size)]
    tokens = encoder.encode(frames)  # [60, 10, 399]
    return loaded.model, fmt, tokens, [i / 2 for i in range(len(frames))], frames


def run(model, fmt, tokens, times, frames_per_forward):
    session = StreamSession(model, fmt, EngineConfig(max_frames_per_forward=frames_per_forward),
                            record_fed_ids=True)
    session.add_query("Please narrate the video in real time.", 0.0)
    events = session.step(tokens, times)
    return events, session


def test_multi_frame_forwards_say_the_same_as_the_per_frame_loop(default_stream):
    model, fmt, tokens, times, _ = default_stream
    torch.set_num_threads(2)
    single, single_session = run(model, fmt, tokens, times, 1)
    multi, multi_session = run(model, fmt, tokens, times, 8)
    said = [[(e.time_s, e.text) for e in events if isinstance(e, ResponseEvent)] for events in (single, multi)]
    assert len(said[0]) >= 2  # the answer to the query and at least one narration
    assert said[1] == said[0]
    p_single = [e.p_speak for e in single if isinstance(e, FrameEvent)]
    p_multi = [e.p_speak for e in multi if isinstance(e, FrameEvent)]
    assert len(p_single) == len(p_multi) == 60
    assert max(abs(a - b) for a, b in zip(p_single, p_multi, strict=True)) < 1e-4
    assert multi_session.fed_ids == single_session.fed_ids


def test_the_onnx_runtime_encoder_says_the_same_as_pytorch(default_stream):
    """`livevlm stream` encodes the default model's frames with ONNX Runtime; the PyTorch tower is the reference."""
    model, fmt, tokens, times, frames = default_stream
    onnx_encoder = model_frame_encoder(load_checkpoint(default_model_path()).model_config, backend="onnx")
    onnx_tokens = onnx_encoder.encode(frames)
    assert (onnx_tokens - tokens).abs().max() < 1e-3
    reference, _ = run(model, fmt, tokens, times, 8)
    onnx, _ = run(model, fmt, onnx_tokens, times, 8)
    said = [[(e.time_s, e.text) for e in events if isinstance(e, ResponseEvent)] for events in (reference, onnx)]
    assert len(said[0]) >= 2 and said[1] == said[0]
    p_reference = [e.p_speak for e in reference if isinstance(e, FrameEvent)]
    p_onnx = [e.p_speak for e in onnx if isinstance(e, FrameEvent)]
    assert max(abs(a - b) for a, b in zip(p_reference, p_onnx, strict=True)) < 1e-4
