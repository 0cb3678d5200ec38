"""Timed text segments (dense captions, recipe steps) → one narration stream per video.

Input, any of:
- the generic list, as a JSON list or JSONL: `{"video": "v_abc.mp4", "start": 1.5, "end": 4.0,
  "text": "A man opens the door.", "duration": 60.0}` (`duration` optional, per record);
- ActivityNet Captions: `{"v_abc": {"duration": 60.0, "timestamps": [[1.5, 4.0], ...], "sentences":
  ["A man opens the door.", ...]}}`;
- YouCook2: `{"database": {"abc": {"duration": 60.0, "subset": "training", "annotations":
  [{"segment": [1.5, 4.0], "sentence": "cut the onion"}]}}}`.

Per video: a narration instruction at the first frame (answered by an acknowledgement, or by the first
segment when it is due there); each segment's text at the first frame at or after its start (or its end,
with `--segment-time end`: the moment the segment has fully been seen); same-frame texts merged. The
clip is [0, duration] when a duration is known, else [0, the latest segment end].
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from livevlm.data.converters.common import (
    NUMBER,
    AnnotationError,
    ConvertOptions,
    StreamBuilder,
    VideoPaths,
    read_json_or_jsonl,
    require,
    sentence,
)
from livevlm.data.schema import Dialogue

NARRATION_PROMPTS = ("Please narrate the video in real time.", "Describe what happens as it happens.",
                     "Tell me what is going on in the video, as it goes.", "Narrate the video for me.")
NARRATION_ACKS = ("Sure, I will describe what happens.", "OK, I will narrate the video as it plays.")


@dataclass
class _Video:
    name: str
    duration: float | None = None
    segments: list[tuple[float, float, str]] = field(default_factory=list)


def _add(videos: dict[str, _Video], name: str, start: Any, end: Any, text: Any, where: str,
         duration: Any = None) -> None:
    for key, value in (("start", start), ("end", end)):
        if not isinstance(value, NUMBER) or isinstance(value, bool):
            raise AnnotationError(f"{where}: {key}: expected a number of seconds, got {value!r}")
    if end < start:
        raise AnnotationError(f"{where}: end: {end} is before start ({start})")
    if not isinstance(text, str) or not text.strip():
        raise AnnotationError(f"{where}: text: expected a non-empty string, got {text!r}")
    video = videos.setdefault(name, _Video(name))
    if duration is not None:
        video.duration = float(duration)
    video.segments.append((float(start), float(end), sentence(text)))


def _generic(records: list[tuple[str, Any]], videos: dict[str, _Video]) -> None:
    for where, record in records:
        name = require(record, "video", where, str, "each record needs video, start, end, text")
        for key in ("start", "end", "text"):
            require(record, key, where, object, "each record needs video, start, end, text")
        _add(videos, name, record["start"], record["end"], record["text"], where, record.get("duration"))


def _activitynet(data: dict[str, Any], source: Path, videos: dict[str, _Video]) -> None:
    for name, record in data.items():
        where = f"{source}: {name}"
        stamps = require(record, "timestamps", where, list)
        texts = require(record, "sentences", where, list)
        if len(stamps) != len(texts):
            raise AnnotationError(f"{where}: {len(stamps)} timestamps but {len(texts)} sentences")
        for i, (stamp, text) in enumerate(zip(stamps, texts, strict=True)):
            if not isinstance(stamp, list) or len(stamp) != 2:
                raise AnnotationError(f"{where}: timestamps[{i}]: expected [start, end], got {stamp!r}")
            _add(videos, name, stamp[0], stamp[1], text, f"{where}: timestamps[{i}]", record.get("duration"))


def _youcook2(database: dict[str, Any], source: Path, videos: dict[str, _Video]) -> None:
    for name, record in database.items():
        where = f"{source}: database.{name}"
        for i, item in enumerate(require(record, "annotations", where, list)):
            here = f"{where}.annotations[{i}]"
            segment = require(item, "segment", here, list)
            if len(segment) != 2:
                raise AnnotationError(f"{here}: segment: expected [start, end], got {segment!r}")
            _add(videos, name, segment[0], segment[1], require(item, "sentence", here, str), here,
                 record.get("duration"))


def parse_segments(path: str | Path) -> list[_Video]:
    """The videos of a segments file (any format of the module docstring), segments in time order."""
    source = Path(path)
    data, is_jsonl = read_json_or_jsonl(source)
    videos: dict[str, _Video] = {}
    if is_jsonl:
        _generic([(f"{source} line {n}", obj) for n, obj in data], videos)
    elif isinstance(data, list):
        _generic([(f"{source}: [{i}]", obj) for i, obj in enumerate(data)], videos)
    elif isinstance(data, dict) and isinstance(data.get("database"), dict):
        _youcook2(data["database"], source, videos)
    elif isinstance(data, dict):
        _activitynet(data, source, videos)
    else:
        raise AnnotationError(f"{source}: expected a list of {{video, start, end, text}} records (JSON or "
                              "JSONL), ActivityNet Captions or YouCook2 annotations")
    for video in videos.values():
        video.segments.sort(key=lambda s: s[0])
    return list(videos.values())


def segment_stream(video: _Video, args: ConvertOptions, video_ref: str) -> Dialogue:
    """The narration dialogue of one video's segments."""
    rng = random.Random(f"{args.seed}:segments:{video.name}")
    end_s = video.duration if video.duration else max(s[1] for s in video.segments)
    builder = StreamBuilder(args.fps, start_s=0.0, end_s=end_s)
    builder.ask(0.0, rng.choice(NARRATION_PROMPTS), rng.choice(NARRATION_ACKS), absorb=True)
    for start, end, text in video.segments:
        builder.say(start if args.segment_time == "start" else end, text)
    return Dialogue(id=video.name, video=video_ref, fps=args.fps, turns=builder.turns(),
                    duration_s=video.duration, start_s=0.0, end_s=end_s, task="narration",
                    meta={"source": "segments"})


def convert_segments(args: ConvertOptions) -> list[Dialogue]:
    """A segments file (`args.input`) → one narration dialogue per video."""
    paths = VideoPaths.from_args(args)
    dialogues = []
    for video in parse_segments(args.input):
        ref = paths.ref(video.name)
        if paths.exists(ref, f"video {video.name}"):
            dialogues.append(segment_stream(video, args, ref))
    return dialogues
