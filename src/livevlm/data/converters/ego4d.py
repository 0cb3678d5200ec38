"""Ego4D narrations → narration streams, as VideoLLM-online builds them (DESIGN.md §1).

Reads either Ego4D narration file:
- `all_narrations_redacted.json` (v2): `{"videos": {uid: {"narrations": [{"time": 12.3, "text": "#C C
  picks a cup", "_annotation_uid": "..."}, ...], "summaries": [...]}}}` — one stream per annotation uid;
- `narration.json`: `{uid: {"narration_pass_1": {"narrations": [{"timestamp_sec": 12.3,
  "timestamp_frame": 369, "narration_text": "#C C picks a cup", "annotation_uid": "..."}],
  "summaries": [...]}, "narration_pass_2": {...}}}` — one stream per pass.

Per stream: texts cleaned (`#C`, `#O`, `#unsure` tags removed, trailing ".," stripped, one final ".",
first word capitalised), narrations under `min_words` words dropped, sorted by time; the clip starts at
the first narration's frame (times ceiled to the fps grid), where the narration instruction is asked and
answered by the first narration; each later narration is said at the first frame at or after it;
identical consecutive texts are skipped; two narrations on one frame are merged with " " (the public
code keeps only the later one); the clip ends with the last narration's frame. The video is
`{uid}{ext}` under `--video-root`.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from livevlm.data.converters.common import (
    NUMBER,
    AnnotationError,
    ConvertOptions,
    StreamBuilder,
    VideoPaths,
    ceil_frame,
    read_json,
    require,
)
from livevlm.data.schema import Dialogue

# The instruction of the public VideoLLM-online narration stream (it keeps Ego4D's "C" tag).
NARRATION_INSTRUCTION = ("Please concisely narrate the video in real time. Use the tag 'C' to denote the camera "
                         "wearer, and other letter tags, such as 'X', to denote other individuals in the scene.")
_TAGS = re.compile(r"[#@](?:unsure|c|o)\b|#", re.IGNORECASE)


def clean_narration(text: str) -> str:
    """"#C C picks a cup ." → "C picks a cup."; "" when nothing but tags is left."""
    words = _TAGS.sub(" ", text).strip(".,\n ").split()
    if not words:
        return ""
    words[0] = words[0][:1].upper() + words[0][1:]
    return " ".join(words) + "."


def _narrations(items: Any, where: str) -> list[tuple[float, str, str]]:
    """(time, raw text, annotation uid) of a narrations list, in either file's field names."""
    if not isinstance(items, list):
        raise AnnotationError(f"{where}: narrations: expected a list, got {type(items).__name__}")
    out = []
    for i, item in enumerate(items):
        here = f"{where}: narrations[{i}]"
        time_key = "timestamp_sec" if isinstance(item, dict) and "timestamp_sec" in item else "time"
        text_key = "narration_text" if isinstance(item, dict) and "narration_text" in item else "text"
        time_s = require(item, time_key, here, NUMBER, "expected timestamp_sec (or time) in seconds")
        text = require(item, text_key, here, str, "expected narration_text (or text)")
        out.append((float(time_s), text, str(item.get("_annotation_uid") or item.get("annotation_uid") or "")))
    return out


def narration_groups(uid: str, record: Any, source: Path) -> dict[str, list[tuple[float, str]]]:
    """The narration streams of one video: {group name: [(time, raw text)]} (per annotation pass)."""
    where = f"{source}: video {uid}"
    if not isinstance(record, dict):
        raise AnnotationError(f"{where}: expected an object, got {type(record).__name__}")
    groups: dict[str, list[tuple[float, str]]] = {}
    if "narrations" in record:  # all_narrations_redacted.json
        for time_s, text, annotation in _narrations(record["narrations"], where):
            groups.setdefault(annotation or "narrations", []).append((time_s, text))
    for key in sorted(k for k in record if k.startswith("narration_pass")):  # narration.json
        narrations = require(record[key], "narrations", f"{where}: {key}", list)
        groups[key] = [(t, text) for t, text, _ in _narrations(narrations, f"{where}: {key}")]
    return groups


def narration_stream(uid: str, group: str, items: list[tuple[float, str]], args: ConvertOptions,
                     video: str) -> Dialogue | None:
    """One narration-stream dialogue, or None when no narration survives cleaning."""
    cleaned = [(max(0.0, t), clean_narration(text)) for t, text in items]
    cleaned = sorted(((t, text) for t, text in cleaned if len(text.split()) >= args.min_words),
                     key=lambda x: x[0])
    if not cleaned:
        return None
    start_s = ceil_frame(cleaned[0][0], args.fps) / args.fps
    builder = StreamBuilder(args.fps, start_s=start_s)
    builder.ask(start_s, NARRATION_INSTRUCTION, cleaned[0][1], absorb=True)
    last_text, last_frame = None, 0
    for time_s, text in cleaned:
        if text == last_text:
            continue
        last_frame = builder.say(time_s, text) or 0
        last_text = text
    return Dialogue(id=f"{uid}-{group}", video=video, fps=args.fps, turns=builder.turns(), start_s=start_s,
                    end_s=builder.frame_time(last_frame + 1), task="narration",
                    meta={"source": "ego4d-narration", "video_uid": uid, "group": group})


def convert_ego4d_narration(args: ConvertOptions) -> list[Dialogue]:
    """Ego4D narration JSON (`args.input`) → narration-stream dialogues (see the module docstring)."""
    source = Path(args.input)
    data = read_json(source)
    videos = data.get("videos", data) if isinstance(data, dict) else None
    if not isinstance(videos, dict):
        raise AnnotationError(f"{source}: expected Ego4D narrations: an object {{\"videos\": {{uid: ...}}}} "
                              "(all_narrations_redacted.json) or {uid: {\"narration_pass_1\": ...}}")
    paths = VideoPaths.from_args(args)
    dialogues = []
    for uid, record in videos.items():
        groups = narration_groups(uid, record, source)
        if not groups:
            continue
        video = paths.ref(uid)
        if not paths.exists(video, f"video {uid}"):
            continue
        for group, items in groups.items():
            dialogue = narration_stream(uid, group, items, args, video)
            if dialogue is not None:
                dialogues.append(dialogue)
    return dialogues
