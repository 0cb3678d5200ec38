"""Tests of livevlm.video: fps resampling, letterbox, bounded memory, early close, and every error case."""

from __future__ import annotations

import math
import socket
import time
import tracemalloc
import wave
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from livevlm.video import VideoError, VideoInfo, VideoWarning, letterbox, probe, read_frames
from livevlm.world import WorldSpec, render_video

VTEST = Path("/usr/share/doc/opencv-doc/examples/data/vtest.avi")
needs_vtest = pytest.mark.skipif(not VTEST.is_file(),
                                 reason=f"{VTEST} is absent: install it with `apt-get install opencv-doc`")


@pytest.fixture(scope="module")
def videos(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Small synthetic-world videos at 10 fps native: 3 s, 1 minute and 10 minutes (64×64, fast)."""
    folder = tmp_path_factory.mktemp("videos")
    paths = {}
    for name, duration, size in (("3s", 3.0, 128), ("1min", 60.0, 64), ("10min", 600.0, 64)):
        paths[name] = folder / f"{name}.mp4"
        render_video(WorldSpec(seed=7, duration=duration, size=size), paths[name])
    return paths


# ---------------------------------------------------------------------------------------------------
# real video


@needs_vtest
def test_vtest_at_2fps_gives_159_square_frames_with_increasing_times() -> None:
    frames = list(read_frames(str(VTEST), fps=2.0, size=384))
    assert len(frames) == 159  # 79.5 s * 2 fps
    assert [t for t, _ in frames] == [i / 2 for i in range(159)]
    assert all(f.shape == (384, 384, 3) and f.dtype == np.uint8 for _, f in frames)


@needs_vtest
def test_probe_reads_the_container_facts_of_vtest() -> None:
    assert probe(str(VTEST)) == VideoInfo(duration_s=79.5, native_fps=10.0, width=768, height=576)


# ---------------------------------------------------------------------------------------------------
# resampling


@pytest.mark.parametrize(("fps", "count"), [(10.0, 30), (4.0, 12), (3.0, 9), (2.0, 6), (0.5, 2)])
def test_fps_resampling_gives_ceil_duration_times_fps_frames(videos: dict[str, Path], fps: float,
                                                             count: int) -> None:
    times = [t for t, _ in read_frames(str(videos["3s"]), fps=fps, size=64)]
    assert times == [i / fps for i in range(count)]
    assert count == math.ceil(3.0 * fps)


def test_resampled_frame_is_the_native_frame_shown_at_that_time(videos: dict[str, Path]) -> None:
    native = [f for _, f in read_frames(str(videos["3s"]), fps=10.0, size=None)]
    at_4fps = [f for _, f in read_frames(str(videos["3s"]), fps=4.0, size=None)]
    for i, frame in enumerate(at_4fps):
        shown = math.floor(i / 4 * 10)  # the last native frame (10 fps) with pts <= i/4
        np.testing.assert_array_equal(frame, native[shown])


def test_size_none_keeps_the_native_size(videos: dict[str, Path]) -> None:
    _, frame = next(iter(read_frames(str(videos["3s"]), size=None)))
    assert frame.shape == (128, 128, 3)


def test_realtime_paces_frames_to_the_wall_clock(videos: dict[str, Path]) -> None:
    start = time.monotonic()
    for t, _ in read_frames(str(videos["3s"]), fps=4.0, size=32, realtime=True):
        assert time.monotonic() - start >= t  # frame i is never delivered before start + i/fps
        if t >= 1.0:
            break


# ---------------------------------------------------------------------------------------------------
# letterbox


def test_letterbox_pads_a_wide_image_top_and_bottom() -> None:
    out = letterbox(np.full((2, 4, 3), 255, dtype=np.uint8), 4)  # 4 wide, 2 high
    expected = np.zeros((4, 4, 3), dtype=np.uint8)
    expected[1:3] = 255
    np.testing.assert_array_equal(out, expected)


def test_letterbox_pads_a_tall_image_left_and_right() -> None:
    out = letterbox(np.full((4, 2, 3), 255, dtype=np.uint8), 4)
    expected = np.zeros((4, 4, 3), dtype=np.uint8)
    expected[:, 1:3] = 255
    np.testing.assert_array_equal(out, expected)


def test_letterbox_scales_down_keeping_the_aspect_ratio() -> None:
    out = letterbox(np.full((50, 100, 3), 200, dtype=np.uint8), 10)  # -> 10×5 picture, rows 2..6
    assert out.shape == (10, 10, 3)
    assert (out[2:7] == 200).all() and (out[:2] == 0).all() and (out[7:] == 0).all()


def test_letterbox_rejects_a_non_rgb_array() -> None:
    with pytest.raises(ValueError, match=r"\[H, W, 3\] uint8"):
        letterbox(np.zeros((4, 4), dtype=np.uint8), 4)


# ---------------------------------------------------------------------------------------------------
# memory and the decode thread


def _peak_bytes(frames: Iterator[tuple[float, np.ndarray]]) -> tuple[int, int]:
    """Consume `frames` under tracemalloc; return (frames seen, peak traced bytes)."""
    tracemalloc.start()
    try:
        count = sum(1 for _ in frames)
        return count, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_peak_memory_does_not_grow_with_video_length(videos: dict[str, Path]) -> None:
    queue_size, frame_bytes = 8, 384 * 384 * 3
    short, peak_short = _peak_bytes(iter(read_frames(str(videos["1min"]), size=384, queue_size=queue_size)))
    long, peak_long = _peak_bytes(iter(read_frames(str(videos["10min"]), size=384, queue_size=queue_size)))
    assert (short, long) == (120, 1200)
    # Ten times the frames, yet both peaks stay within the queue plus a few frames in flight, whatever
    # the thread scheduling (holding the 10-minute video would take 1200 frames = 530 MB).
    assert peak_short < (queue_size + 4) * frame_bytes
    assert peak_long < (queue_size + 4) * frame_bytes


def test_queue_bounds_the_frames_buffered_ahead_of_a_slow_consumer(videos: dict[str, Path]) -> None:
    source = read_frames(str(videos["1min"]), fps=2.0, size=64, queue_size=4)
    frames = iter(source)
    next(frames)
    time.sleep(0.5)  # the decoder fills the queue and must then wait
    assert source.max_buffered == 4
    assert source.running  # blocked on the full queue, not finished
    source.close()


def test_breaking_out_of_the_loop_stops_the_decode_thread(videos: dict[str, Path]) -> None:
    source = read_frames(str(videos["10min"]), fps=2.0, size=64)
    for i, _ in enumerate(source):
        if i == 2:
            break
    assert not source.running


def test_close_stops_the_decode_thread(videos: dict[str, Path]) -> None:
    source = read_frames(str(videos["10min"]), fps=2.0, size=64)
    frames = iter(source)
    next(frames)
    source.close()
    assert not source.running


# ---------------------------------------------------------------------------------------------------
# errors


def test_missing_path_is_a_video_error_naming_it(tmp_path: Path) -> None:
    missing = tmp_path / "nope.mp4"
    with pytest.raises(VideoError, match=f"{missing} does not exist"):
        read_frames(str(missing))


def test_a_file_that_is_not_a_video_is_a_video_error(tmp_path: Path) -> None:
    text = tmp_path / "notes.mp4"
    text.write_text("these are not frames\n" * 100)
    with pytest.raises(VideoError, match=f"{text} is not a readable video"):
        read_frames(str(text))


def test_a_file_without_a_video_stream_is_a_video_error(tmp_path: Path) -> None:
    audio = tmp_path / "sound.wav"
    with wave.open(str(audio), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(8000)
        w.writeframes(np.zeros(8000, dtype=np.int16).tobytes())
    with pytest.raises(VideoError, match=f"{audio} has no video stream"):
        read_frames(str(audio))


def test_a_camera_that_does_not_exist_is_a_video_error() -> None:
    if Path("/dev/video99").exists():
        pytest.skip("/dev/video99 exists on this machine")
    with pytest.raises(VideoError, match="camera /dev/video99 does not exist"):
        read_frames(99)


def test_a_url_that_does_not_answer_fails_within_the_timeout() -> None:
    with socket.socket() as server:  # accepts connections (backlog) but never answers
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        url = f"http://127.0.0.1:{server.getsockname()[1]}/live.mp4"
        start = time.monotonic()
        with pytest.raises(VideoError, match=f"stream {url} could not be opened") as failure:
            read_frames(url, timeout_s=1.0)
        assert time.monotonic() - start < 5.0
    assert "livevlm stream --open-timeout SEC" in str(failure.value)  # a real flag, not an internal name


def test_a_refused_connection_is_not_called_a_timeout() -> None:
    with socket.socket() as probe_socket:  # a port nobody listens on: the connection is refused at once
        probe_socket.bind(("127.0.0.1", 0))
        port = probe_socket.getsockname()[1]
    with pytest.raises(VideoError) as failure:
        read_frames(f"rtsp://127.0.0.1:{port}/live", timeout_s=2.0)
    message = str(failure.value)
    assert "could not be opened" in message and "did not open within" not in message


def test_a_truncated_file_delivers_the_frames_before_the_cut_then_warns(videos: dict[str, Path],
                                                                          tmp_path: Path) -> None:
    data = videos["1min"].read_bytes()
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.warns(VideoWarning, match=f"video {cut}: stopped at") as record:
        times = [t for t, _ in read_frames(str(cut), fps=2.0, size=32)]
    assert 0 < len(times) < 120
    assert times == [i / 2 for i in range(len(times))]
    stopped_at = float(str(record[0].message).split("stopped at ")[1].split(" s")[0])
    assert times[-1] < stopped_at <= 60.0
