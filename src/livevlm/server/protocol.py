"""The `/v1/stream` protocol: the limits, the client's messages parsed and checked, the server's messages built.

No web framework here: `app.py` moves bytes, this module says what they mean. Every refusal is a
`ProtocolError` whose message names the rule or limit broken (`ServerLimits` field names, so that a user
can find the option that raises it). The protocol itself is documented in docs/server.md.
"""

from __future__ import annotations

import io
import json
import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from livevlm.config import ConfigError

IMAGE_FORMATS = ("JPEG", "PNG")
CLIENT_TYPES = ("start", "frame", "query", "end")


@dataclass(frozen=True)
class ServerLimits:
    """What one server accepts; `livevlm serve` has an option for each. Sent to clients in `ready.limits`.

    max_sessions: sessions at once; one more gets an `error` and close code 1013.
    idle_timeout_s: a session that sends nothing for this long, with no work waiting, is closed.
    max_message_bytes: the largest message (an encoded image); larger ones close the connection (1009).
    max_text_bytes: the largest text (JSON) message.
    max_image_pixels: width × height of an image, read from its header before it is decoded.
    max_fps: frames per second of wall time a session may send (bursts of one second's worth pass).
    max_query_chars: the longest query or system prompt.
    max_new_tokens: the most tokens a response may have (`start.max_new_tokens` up to it; default 64).
    queue_frames: frames a session may have waiting for the model; past it the oldest waiting is dropped.
    queue_queries: queries a session may have waiting for an answer; past it a query is refused.
    """

    max_sessions: int = 4
    idle_timeout_s: float = 120.0
    max_message_bytes: int = 8 * 1024 * 1024
    max_text_bytes: int = 64 * 1024
    max_image_pixels: int = 4096 * 4096
    max_fps: float = 60.0
    max_query_chars: int = 2000
    max_new_tokens: int = 256
    queue_frames: int = 16
    queue_queries: int = 4

    def __post_init__(self) -> None:
        for name, value in asdict(self).items():
            if not (isinstance(value, int | float) and math.isfinite(value) and value > 0):
                raise ConfigError(f"server limit {name}={value!r} must be a positive number")
        if self.max_text_bytes > self.max_message_bytes:
            raise ConfigError(f"server limit max_text_bytes={self.max_text_bytes} is above "
                              f"max_message_bytes={self.max_message_bytes}")

    def public(self) -> dict[str, Any]:
        """The limits a client needs to behave (all of them: none is a secret)."""
        return asdict(self)


class ProtocolError(ValueError):
    """A client message that is refused; the message (sent back as an `error`) names the rule or limit, and
    `index` the frame refused when it is about one."""

    def __init__(self, message: str, index: int | None = None) -> None:
        super().__init__(message)
        self.index = index


# ---------------------------------------------------------------------------------------------------
# client → server


@dataclass(frozen=True)
class Start:
    fps: float | None = None
    query: str | None = None
    threshold: float | None = None
    system: str | None = None
    max_new_tokens: int | None = None


@dataclass(frozen=True)
class FrameTime:
    """The stream time of the next binary message (frame)."""

    time_s: float


@dataclass(frozen=True)
class Query:
    text: str
    time_s: float | None = None  # None: the time of the last frame the model has seen


@dataclass(frozen=True)
class End:
    pass


ClientMessage = Start | FrameTime | Query | End
_FIELDS = {"start": {"fps", "query", "threshold", "system", "max_new_tokens"}, "frame": {"time_s"},
           "query": {"text", "time_s"}, "end": set()}


def parse_text(raw: str, limits: ServerLimits) -> ClientMessage:
    """One text message → a client message.

    Raises:
        ProtocolError: not JSON, not an object, an unknown type or field, a value of the wrong type or
            out of range, a text above `max_text_bytes` / `max_query_chars`.
    """
    size = len(raw.encode("utf-8", errors="surrogatepass"))
    if size > limits.max_text_bytes:
        raise ProtocolError(f"text message of {size} bytes is above the limit max_text_bytes={limits.max_text_bytes}")
    try:
        obj = json.loads(raw)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError is a ValueError; deep nesting recurses
        raise ProtocolError(f"a text message must be a JSON object ({type(exc).__name__}: {str(exc)[:80]})") from None
    if not isinstance(obj, dict) or not isinstance(obj.get("type"), str):
        raise ProtocolError('a text message must be a JSON object with a "type" '
                            f"(one of {', '.join(CLIENT_TYPES)})")
    kind = obj["type"]
    if kind not in _FIELDS:
        raise ProtocolError(f"unknown message type {kind[:40]!r}; the client sends {', '.join(CLIENT_TYPES)}")
    unknown = sorted(set(obj) - _FIELDS[kind] - {"type"})
    if unknown:
        raise ProtocolError(f"unknown field(s) {', '.join(repr(k[:40]) for k in unknown[:5])} in a {kind!r} "
                            f"message; it takes {', '.join(sorted(_FIELDS[kind])) or 'no field'}")
    if kind == "start":
        query = _text(obj, "query", limits)
        return Start(fps=_number(obj, "fps", 0.0, limits.max_fps, "max_fps", low_open=True),
                     query=query if query and query.strip() else None,  # an empty first query: none
                     threshold=_number(obj, "threshold", 0.0, 1.0), system=_text(obj, "system", limits),
                     max_new_tokens=_integer(obj, "max_new_tokens", 1, limits.max_new_tokens, "max_new_tokens"))
    if kind == "frame":
        time_s = _number(obj, "time_s", 0.0, math.inf)
        if time_s is None:
            raise ProtocolError('a "frame" message needs "time_s" (the stream time of the next binary frame)')
        return FrameTime(time_s)
    if kind == "query":
        text = _text(obj, "text", limits)
        if text is None or not text.strip():
            raise ProtocolError('a "query" message needs a non-empty "text"')
        return Query(text, _number(obj, "time_s", 0.0, math.inf))
    return End()


def _number(obj: dict, name: str, low: float, high: float, limit: str | None = None,
            low_open: bool = False) -> float | None:
    value = obj.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ProtocolError(f'"{name}" must be a finite number, got {str(value)[:40]!r}')
    if value < low or (low_open and value == low) or value > high:
        bound = f"the limit {limit}={high:g}" if limit else f"{high:g}"
        raise ProtocolError(f'"{name}" {value:g} is out of range: it must be {">" if low_open else "≥"} {low:g} '
                            f"and ≤ {bound}")
    return float(value)


def _integer(obj: dict, name: str, low: int, high: int, limit: str) -> int | None:
    value = obj.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ProtocolError(f'"{name}" must be an integer from {low} to the limit {limit}={high}, '
                            f"got {str(value)[:40]!r}")
    return value


def _text(obj: dict, name: str, limits: ServerLimits) -> str | None:
    value = obj.get(name)
    if value is None:
        return None
    if not isinstance(value, str):
        raise ProtocolError(f'"{name}" must be a string, got {type(value).__name__}')
    if len(value) > limits.max_query_chars:
        raise ProtocolError(f'"{name}" has {len(value)} characters, above the limit '
                            f"max_query_chars={limits.max_query_chars}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate ("\\ud800" in the JSON): no tokenizer or reply can carry it
        raise ProtocolError(f'"{name}" is not valid Unicode (an unpaired surrogate)') from None
    return value


def decode_image(data: bytes, limits: ServerLimits, size: int, resample: str = "bilinear") -> np.ndarray:
    """An encoded frame (JPEG or PNG) → `[size, size, 3]` uint8 RGB, letterboxed as `video.read_frames` does
    (`resample`: the model's filter, `FrameEncoder.resample`).

    The pixel count is read from the header and checked before anything is decoded (Pillow's `open` is
    lazy); only the JPEG and PNG parsers are ever tried.

    Raises:
        ProtocolError: too many bytes or pixels, not a JPEG/PNG, a damaged image.
    """
    from PIL import Image, UnidentifiedImageError

    from livevlm.video import letterbox

    if len(data) > limits.max_message_bytes:
        raise ProtocolError(f"frame of {len(data)} bytes is above the limit max_message_bytes="
                            f"{limits.max_message_bytes}")
    try:
        image = Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)
    except UnidentifiedImageError:
        raise ProtocolError(f"a binary message must be a JPEG or PNG image ({len(data)} bytes that are "
                            "neither)") from None
    except Image.DecompressionBombError as exc:  # Pillow's own (higher) ceiling, hit before ours
        raise ProtocolError(f"image above the limit max_image_pixels={limits.max_image_pixels} ({exc})") from None
    except (OSError, ValueError, SyntaxError) as exc:  # a header Pillow cannot parse
        raise ProtocolError(f"damaged image header ({str(exc)[:80]})") from None
    with image:
        width, height = image.size
        if width * height > limits.max_image_pixels:
            raise ProtocolError(f"image of {width}×{height} = {width * height} pixels is above the limit "
                                f"max_image_pixels={limits.max_image_pixels}")
        if image.format == "JPEG":
            image.draft("RGB", (size, size))  # decode at a reduced DCT scale when the picture is much larger
        try:
            pixels = np.asarray(image.convert("RGB"))
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
            raise ProtocolError(f"damaged {image.format} image ({str(exc)[:80]})") from None
    return letterbox(pixels, size, resample)


# ---------------------------------------------------------------------------------------------------
# server → client: every message the server sends, in one place


def ready(session: str, fps: float, threshold: float, image_size: int, resample: str, device: str,
          limits: ServerLimits) -> dict[str, Any]:
    """The session is open: frames are at `fps` (unless timed), `image_size` is the side they are letterboxed
    to with the `resample` filter (send them so, letterboxed, to keep messages small and the pixels those of
    a local run), `device` where the model runs ("cpu float32")."""
    return {"type": "ready", "session": session, "fps": fps, "threshold": threshold, "image_size": image_size,
            "resample": resample, "device": device, "limits": limits.public()}


def frame(index: int, time_s: float, p_speak: float) -> dict[str, Any]:
    return {"type": "frame", "index": index, "time_s": time_s, "p_speak": p_speak}


def delta(text: str) -> dict[str, Any]:
    return {"type": "delta", "text": text}


def response(time_s: float, text: str, latency_s: float, answer_to_query: bool, reason: str) -> dict[str, Any]:
    return {"type": "response", "time_s": time_s, "text": text, "latency_s": latency_s,
            "answer_to_query": answer_to_query, "reason": reason}


def query(time_s: float, text: str) -> dict[str, Any]:
    return {"type": "query", "time_s": time_s, "text": text}


def note(time_s: float, text: str, answered: bool, latency_s: float) -> dict[str, Any]:
    """The model's note to itself (a model with `format.note_role`): never said, so no deltas come before it;
    `answered` is its choice after the note (a response follows when true)."""
    return {"type": "note", "time_s": time_s, "text": text, "answered": answered, "latency_s": latency_s}


def dropped(count: int, index: int) -> dict[str, Any]:
    """`count` frames dropped now (the oldest waiting; `index` is the newest of them)."""
    return {"type": "dropped", "count": count, "index": index}


def error(message: str, index: int | None = None) -> dict[str, Any]:
    """A refusal; `index` names the frame refused when it is about one (so a client can stop waiting for it)."""
    return {"type": "error", "message": message} if index is None else \
        {"type": "error", "message": message, "index": index}


def summary(frames: int, fps: float, max_lag_s: float, threshold: float, device: str, responses: int,
            dropped_frames: int, elapsed_s: float) -> dict[str, Any]:
    """The fields of `livevlm stream --jsonl`'s summary, plus responses, dropped frames and elapsed time."""
    return {"type": "summary", "frames": frames, "fps": round(fps, 2), "max_lag_s": round(max_lag_s, 3),
            "threshold": threshold, "device": device, "responses": responses, "dropped": dropped_frames,
            "elapsed_s": round(elapsed_s, 3)}
