"""Frame sources: read a video file, camera or URL incrementally with PyAV, resampled to a target fps.

`read_frames(source, fps=2.0, size=384)` yields `(time_s, frame)` pairs: frame i is the picture shown at
time i/fps (the last decoded frame whose timestamp is <= i/fps), letterboxed to `size`×`size` RGB uint8.
Decoding runs on a background thread that feeds a bounded queue, so decoding overlaps the consumer and
at most `queue_size` resampled frames are ever buffered: the whole video is never held in memory.
A corrupt or truncated file delivers the frames decoded up to the damage, then warns and ends cleanly.
"""

from __future__ import annotations

import logging
import math
import queue
import re
import threading
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any, Literal

import av
import numpy as np
from PIL import Image

logger = logging.getLogger(__name__)

URL_SCHEMES = ("rtsp", "rtsps", "rtmp", "rtmps", "http", "https", "udp", "tcp", "srt")
_CAMERA_RE = re.compile(r"^/dev/video\d+$")


class VideoError(ValueError):
    """A video source cannot be opened or read; the message names the source and the remedy."""


class VideoWarning(UserWarning):
    """A video ended early (truncated or corrupt); the frames before the damage were delivered."""


@dataclass(frozen=True)
class VideoInfo:
    """What is knowable about a source before decoding it; None where the container does not say."""

    duration_s: float | None
    native_fps: float | None
    width: int
    height: int


# ---------------------------------------------------------------------------------------------------
# letterbox

Resample = Literal["bilinear", "bicubic"]
_RESAMPLE = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC}


def letterbox(frame: np.ndarray, size: int, resample: Resample = "bilinear") -> np.ndarray:
    """Resize `frame` to fit a `size`×`size` square, keeping its aspect ratio, padded with black.

    Args:
        frame: [H, W, 3] uint8 RGB.
        size: side of the output square (pixels).
        resample: PIL's filter for the resize: "bilinear" (livevlm's default towers) or "bicubic" (SigLIP, as
            the official VideoLLM-online preprocessing and SigLIP's own image processor resize).
    Returns:
        [size, size, 3] uint8; the resized picture is centred (extra padding row/column goes to the
        bottom/right). Deterministic: PIL resampling, skipped when the size already fits.
    Raises:
        ValueError: if `frame` is not [H, W, 3] uint8 or `size` is not positive.
    """
    if frame.ndim != 3 or frame.shape[2] != 3 or frame.dtype != np.uint8:
        raise ValueError(f"letterbox expects an [H, W, 3] uint8 frame, got shape {frame.shape} {frame.dtype}")
    if size <= 0:
        raise ValueError(f"letterbox size must be positive, got {size}")
    height, width = frame.shape[:2]
    scale = min(size / width, size / height)
    new_w, new_h = max(1, round(width * scale)), max(1, round(height * scale))
    if (new_w, new_h) != (width, height):
        frame = np.asarray(Image.fromarray(frame).resize((new_w, new_h), _RESAMPLE[resample]))
    out = np.zeros((size, size, 3), dtype=np.uint8)
    top, left = (size - new_h) // 2, (size - new_w) // 2
    out[top : top + new_h, left : left + new_w] = frame
    return out


# ---------------------------------------------------------------------------------------------------
# opening sources


def _is_url(source: str) -> bool:
    scheme = source.split("://", 1)[0].lower() if "://" in source else ""
    return scheme in URL_SCHEMES


def _is_camera(source: str | int) -> bool:
    """An int, a digit string (as typed on a command line) or /dev/videoN."""
    return isinstance(source, int) or str(source).isdigit() or bool(_CAMERA_RE.match(str(source)))


def _open_container(source: str | int, timeout_s: float) -> tuple[Any, str]:
    """Open `source` with PyAV; return (container, display name). Raises VideoError with a remedy."""
    if _is_camera(source):
        return _open_camera(source, timeout_s)
    source = str(source)
    if _is_url(source):
        return _open_url(source, timeout_s), source
    path = Path(source)
    if not path.exists():
        raise VideoError(f"video file {path} does not exist; check the path "
                         "(or pass a camera index or a URL)")
    if not path.is_file():
        raise VideoError(f"video source {path} is not a file; pass a video file, a camera or a URL")
    try:
        return av.open(str(path)), str(path)
    except av.error.FFmpegError as exc:
        raise VideoError(f"{path} is not a readable video ({exc.strerror}); pass a video file "
                         "(mp4, avi, mkv, webm...) or re-encode it, e.g. `ffmpeg -i IN -c:v libx264 OUT.mp4`"
                         ) from None


def _open_camera(source: str | int, timeout_s: float) -> tuple[Any, str]:
    device = f"/dev/video{source}" if isinstance(source, int) or str(source).isdigit() else str(source)
    if not Path(device).exists():
        raise VideoError(_missing_camera(device))
    try:
        return av.open(device, format="v4l2", timeout=timeout_s), device
    except (av.error.FFmpegError, OSError) as exc:
        raise VideoError(f"camera {device} cannot be opened ({exc}); check that no other program uses it "
                         "and that you may read it (group `video`)") from None


def _open_url(url: str, timeout_s: float) -> Any:
    # PyAV's `timeout` bounds open and each read; the protocol options bound socket I/O (microseconds),
    # so a silent server fails within `timeout_s` whatever the protocol.
    micros = str(int(timeout_s * 1_000_000))
    options = {"rw_timeout": micros, "timeout": micros}
    try:
        return av.open(url, timeout=timeout_s, options=options)
    except (av.error.FFmpegError, OSError) as exc:
        raise VideoError(f"stream {url} could not be opened ({exc}); check the URL and that the server is running "
                         f"and reachable; a slow server may need longer than {timeout_s:g} s "
                         "(`livevlm stream --open-timeout SEC`, `timeout_s` in Python)") from None


def _video_stream(container: Any, name: str) -> Any:
    if not container.streams.video:
        kinds = [s.type for s in container.streams] or "no streams"
        container.close()
        raise VideoError(f"{name} has no video stream (it holds {kinds}); pass a file with a video track")
    stream = container.streams.video[0]
    stream.thread_type = "AUTO"  # frame + slice threading: decoding is the producer's bottleneck
    return stream


def _stream_duration(container: Any, stream: Any) -> Fraction | None:
    if stream.duration is not None and stream.time_base is not None:
        return stream.duration * stream.time_base
    if container.duration is not None:
        return Fraction(container.duration, av.time_base)
    return None


def check_source(source: str | int) -> str | int:
    """Check a source before anything slow happens (a model load): a file must exist and hold a video
    stream, a camera device must exist, a URL must name a known scheme. Nothing is decoded and no network
    connection is made. Returns the source as `read_frames` takes it (a digit string becomes an int).

    Raises:
        VideoError: what is wrong, and what to do.
    """
    if _is_camera(source):
        device = f"/dev/video{source}" if isinstance(source, int) or str(source).isdigit() else str(source)
        if not Path(device).exists():
            raise VideoError(_missing_camera(device))
        return int(source) if str(source).isdigit() else source
    text = str(source)
    if _is_url(text):
        return text
    if "://" in text:
        raise VideoError(f"{text}: unknown URL scheme {text.split('://', 1)[0]!r}; livevlm reads "
                         f"{', '.join(sorted(URL_SCHEMES))}")
    container, name = _open_container(text, timeout_s=10.0)
    try:
        _video_stream(container, name)
    finally:
        container.close()
    return text


def _missing_camera(device: str) -> str:
    return (f"camera {device} does not exist; list the cameras with `ls /dev/video*` (inside a container, the "
            "camera must be passed through to it, e.g. `docker run --device=/dev/video0 …`)")


def probe(source: str | int, timeout_s: float = 10.0) -> VideoInfo:
    """Read what the container says about `source` without decoding it.

    Returns:
        VideoInfo with duration_s / native_fps None for live sources or containers that do not say.
    Raises:
        VideoError: for the same bad sources as `read_frames`.
    """
    container, name = _open_container(source, timeout_s)
    try:
        stream = _video_stream(container, name)
        duration = _stream_duration(container, stream)
        rate = stream.average_rate or stream.guessed_rate
        return VideoInfo(duration_s=float(duration) if duration is not None else None,
                         native_fps=float(rate) if rate else None,
                         width=stream.codec_context.width, height=stream.codec_context.height)
    finally:
        container.close()


# ---------------------------------------------------------------------------------------------------
# the frame source


_END = object()  # sentinel the decode thread puts after the last frame


class FrameSource:
    """An open video source whose iteration yields `(time_s, frame)` at `fps` (see module docstring).

    Opening happens in the constructor, so a bad source raises `VideoError` at once. Iterate once;
    leaving the loop early (break, exception) or calling `close()` stops the decode thread.
    Use as a context manager to close deterministically.

    Args:
        source: a file path, a camera (int index or "/dev/videoN"), or a URL (rtsp/rtmp/http/https/udp/tcp).
        fps: target rate; frame i has time_s = i/fps relative to the first decoded frame. A finite video
            of duration D (first frame to end of last frame) gives ceil(D*fps) frames.
        size: letterbox side in pixels, or None to keep the native size.
        resample: the letterbox's resize filter ("bilinear" or "bicubic"; `letterbox`).
        queue_size: the most resampled frames buffered between decoder and consumer.
        timeout_s: open/read timeout for cameras and URLs.
        realtime: pace delivery to wall-clock (frame i not before start + i/fps), for files played "live".
        overflow: when the queue is full, "block" the decoder (files: lose nothing) or "drop_oldest"
            (live sources: stay current). Default: block for files, drop_oldest for cameras and URLs.
    """

    def __init__(self, source: str | int, fps: float = 2.0, size: int | None = 384, *, queue_size: int = 16,
                 timeout_s: float = 10.0, realtime: bool = False,
                 overflow: Literal["block", "drop_oldest"] | None = None, resample: Resample = "bilinear") -> None:
        if fps <= 0:
            raise ValueError(f"fps must be positive, got {fps}")
        if size is not None and size <= 0:
            raise ValueError(f"size must be positive or None, got {size}")
        if queue_size <= 0:
            raise ValueError(f"queue_size must be positive, got {queue_size}")
        live = _is_camera(source) or _is_url(str(source))
        if resample not in _RESAMPLE:
            raise ValueError(f"resample must be one of {sorted(_RESAMPLE)}, got {resample!r}")
        self.fps, self.size, self.realtime, self.resample = fps, size, realtime, resample
        self.overflow = overflow or ("drop_oldest" if live else "block")
        self._container, self.name = _open_container(source, timeout_s)
        self._stream = _video_stream(self._container, self.name)
        self.info = VideoInfo(
            duration_s=None if live else _float_or_none(_stream_duration(self._container, self._stream)),
            native_fps=_float_or_none(self._stream.average_rate or self._stream.guessed_rate),
            width=self._stream.codec_context.width, height=self._stream.codec_context.height)
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=queue_size)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._decode_loop, name=f"decode:{self.name}", daemon=True)
        self._started = False
        self._damage: str | None = None  # why decoding stopped early, set by the decode thread
        self.max_buffered = 0  # the most frames the queue ever held (bounded by queue_size)

    # -- consumer side --------------------------------------------------------------------------------

    def __iter__(self) -> Iterator[tuple[float, np.ndarray]]:
        if self._started:
            raise RuntimeError(f"FrameSource({self.name}) can be iterated only once; open it again")
        self._started = True
        self._thread.start()
        start = time.monotonic()
        try:
            while True:
                item = self._queue.get()
                if item is _END:
                    return
                if isinstance(item, BaseException):
                    raise item
                if isinstance(item, _Damage):
                    warnings.warn(item.message, VideoWarning, stacklevel=2)
                    continue
                time_s, frame = item
                if self.realtime:
                    delay = start + time_s - time.monotonic()
                    if delay > 0:
                        time.sleep(delay)
                yield time_s, frame
        finally:
            self.close()

    @property
    def running(self) -> bool:
        """True while the decode thread is alive."""
        return self._thread.is_alive()

    def close(self) -> None:
        """Stop the decode thread and release the source. Safe to call more than once."""
        self._stop.set()
        if self._started:
            self._drain()
            self._thread.join(timeout=5.0)
            if self._thread.is_alive():
                logger.warning("decode thread for %s did not stop within 5 s", self.name)
        else:
            self._container.close()

    def __enter__(self) -> FrameSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _drain(self) -> None:
        while True:
            try:
                self._queue.get_nowait()
            except queue.Empty:
                return

    # -- producer side (decode thread) ----------------------------------------------------------------

    def _decode_loop(self) -> None:
        try:
            self._resample()
            self._put(_END, force=True)
        except BaseException as exc:  # noqa: BLE001  (handed to the consumer, who re-raises it)
            self._put(exc, force=True)
        finally:
            self._container.close()

    def _resample(self) -> None:
        """Decode every frame; emit the last frame with pts <= i/fps for each target time i/fps."""
        step = Fraction(self.fps).limit_denominator(1_000_000)
        origin: Fraction | None = None
        shown: Any = None  # the decoded frame on screen now
        index = 0  # next target frame
        end = Fraction(0)
        for frame, frame_time, frame_dur in self._decoded():
            if origin is None:
                origin = frame_time
            rel = frame_time - origin
            while shown is not None and index / step < rel:  # targets before this frame show `shown`
                if not self._emit(index, step, shown):
                    return
                index += 1
            shown = frame
            end = rel + frame_dur
        while shown is not None and index / step < end:
            if not self._emit(index, step, shown):
                return
            index += 1
        self._check_complete(float(end))

    def _decoded(self) -> Iterator[tuple[Any, Fraction, Fraction]]:
        """Yield (frame, time, duration) in presentation order. A decode error mid-stream ends the
        iteration and is recorded in `self._damage` (the frames before it were already yielded)."""
        stream = self._stream
        rate = stream.average_rate or stream.guessed_rate or 25
        default_dur = 1 / Fraction(rate)
        count = 0
        try:
            for frame in self._container.decode(stream):
                if self._stop.is_set():
                    return
                time_base = frame.time_base or stream.time_base
                if frame.pts is not None and time_base is not None:
                    frame_time = Fraction(frame.pts * time_base)
                else:  # raw streams without timestamps: trust the nominal rate
                    frame_time = count * default_dur
                ticks = getattr(frame, "duration", None)  # Frame.duration: PyAV >= 13
                dur = ticks * time_base if ticks and time_base is not None else default_dur
                count += 1
                yield frame, frame_time, Fraction(dur)
        except av.error.FFmpegError as exc:
            self._damage = f"decoding failed after {count} frames ({exc.strerror})"

    def _emit(self, index: int, step: Fraction, frame: Any) -> bool:
        image = frame.to_ndarray(format="rgb24")
        if self.size is not None:
            image = letterbox(image, self.size, self.resample)
        return self._put((float(index / step), image))

    def _put(self, item: Any, force: bool = False) -> bool:
        """Queue `item`, honouring the overflow policy; False once the consumer has closed."""
        while not self._stop.is_set():
            try:
                if self.overflow == "drop_oldest" and not force and self._queue.full():
                    self._queue.get_nowait()
                self._queue.put(item, timeout=0.1)
                self.max_buffered = max(self.max_buffered, self._queue.qsize())
                return True
            except (queue.Full, queue.Empty):
                continue
        return False

    def _check_complete(self, end_s: float) -> None:
        """Queue a warning when decoding failed or stopped well short of the declared duration."""
        expected = self.info.duration_s
        slack = 2.0 / (self.info.native_fps or 25.0) + 0.5
        if self._damage is None and expected is not None and end_s < expected - slack:
            self._damage = f"decoding ended early (declared duration {expected:.2f} s)"
        if self._damage is not None:
            self._put(_Damage(f"video {self.name}: stopped at {end_s:.2f} s: {self._damage}; the frames "
                              "before were delivered. The file is truncated or corrupt: re-encode or "
                              "re-download it"), force=True)


@dataclass(frozen=True)
class _Damage:
    """Queued by the decode thread so that the warning is raised on the consumer's thread, in order."""

    message: str


def _float_or_none(value: Any) -> float | None:
    return float(value) if value else None


def read_frames(source: str | int, fps: float = 2.0, size: int | None = 384, *, queue_size: int = 16,
                timeout_s: float = 10.0, realtime: bool = False,
                overflow: Literal["block", "drop_oldest"] | None = None,
                resample: Resample = "bilinear") -> FrameSource:
    """Open `source` and return an iterable of `(time_s, frame [size, size, 3] uint8)` at `fps`.

    See `FrameSource` for the arguments. Raises `VideoError` at once (not on first iteration) for a
    missing path, a file that is not a video, a container without a video stream, a camera that does not
    exist, or a URL that does not answer within `timeout_s`.
    """
    return FrameSource(source, fps, size, queue_size=queue_size, timeout_s=timeout_s, realtime=realtime,
                       overflow=overflow, resample=resample)


def expected_frame_count(duration_s: float, fps: float) -> int:
    """Frames `read_frames` yields for a video of `duration_s` at `fps`: ceil(duration·fps)."""
    exact = Fraction(duration_s).limit_denominator(1_000_000) * Fraction(fps).limit_denominator(1_000_000)
    return math.ceil(exact)
