"""The streaming-dialogue schema: one JSONL record per conversation, its validator, reader and writer.

Record (one JSON object per line; paths are relative to the JSONL file's folder, absolute ones allowed):

    {"id": "000-narration", "video": "videos/000.mp4", "fps": 2.0, "duration_s": 30.0,
     "start_s": 0.0, "end_s": 30.0,             # optional clip of the video; default the whole video
     "features": "features/000.safetensors",    # optional feature-cache file, instead of / besides video
     "task": "narration",                        # optional free-form tag
     "meta": {...},                              # optional free-form object (source ids, ...)
     "key_frames_s": [3.5, 9.0],                 # optional: frames whose speak/silent target is a hard case
     "turns": [{"role": "system", "time_s": 0.0, "text": "..."},   # optional; else the format's default
               {"role": "user", "time_s": 0.0, "text": "Please narrate the video in real time."},
               {"role": "assistant", "time_s": 3.5, "text": "A red circle appears on the left."}]}

Time semantics. The stream is the video clip [start_s, end_s) sampled at `fps`: frame i is at time
`start_s + i / fps`, and there are `ceil((end_s - start_s) * fps)` frames (`end_s` defaults to
`duration_s`). A turn at time t is placed after frame `k = floor((t - start_s) * fps + 1e-6)` (frames
0..k have been seen) and before frame k + 1; the epsilon makes times written on the grid map to their
own frame despite float rounding. So a turn at `start_s` comes after the first frame: the model always
sees one frame before anything is said.

Rules the validator enforces (each violation names the file, line, field and the fix):
- roles are system / user / assistant / note; a system turn may only be the first turn; texts are non-empty;
- times are non-decreasing and inside [start_s, end_s], on an existing frame (k < number of frames);
- a user turn is immediately followed by an assistant turn on the same frame: the model answers a
  query at once (an acknowledgement or the answer); further assistant turns come later;
- two assistant turns may not fall on the same frame without a user turn between them (there is
  only one "speak" decision per frame; converters merge such texts with " ").
- a note (the model's note to itself, never shown to the user; trained with `format.note_role`) is the first
  turn on its frame, at most one a frame; an assistant turn on the same frame may follow it (the model
  answers after noting what it saw), or nothing (it goes on watching).
- `key_frames_s` (optional) are times inside the clip, on an existing frame, each frame at most once: the
  frames whose speak-or-stay-silent target counts `train.key_frame_weight` times in the loss (e.g. a
  reminder's events, where one is answered and the others must be waited through).
Converters put assistant turns on the fps grid: an event at time e is said at the first frame at or
after e.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from livevlm.files import atomic_path
from livevlm.stream_format import FRAME_EPS, count_frames, frame_index

ROLES = ("system", "user", "assistant", "note")
_RECORD_KEYS = ("id", "video", "features", "fps", "duration_s", "start_s", "end_s", "task", "meta", "key_frames_s",
                "turns")
_TURN_KEYS = ("role", "time_s", "text")


class DialogueError(ValueError):
    """A dialogue record breaks the schema; the message names the file, line, field and the fix."""


@dataclass
class Turn:
    """One utterance: `role` in ROLES, said at `time_s` seconds of the video (see module docstring)."""

    role: str
    time_s: float
    text: str

    def to_json(self) -> dict[str, Any]:
        return {"role": self.role, "time_s": self.time_s, "text": self.text}


@dataclass
class Dialogue:
    """One streaming conversation over a video (or a feature-cache file) clip.

    `video` / `features` are paths relative to the JSONL file's folder (at least one is set).
    `end_s` defaults to `duration_s`; when both are missing the stream ends with the last turn's frame.
    """

    id: str
    video: str | None
    fps: float
    turns: list[Turn]
    duration_s: float | None = None
    start_s: float = 0.0
    end_s: float | None = None
    features: str | None = None
    task: str | None = None
    meta: dict[str, Any] | None = field(default=None)
    key_frames_s: list[float] | None = None  # frames whose decision is a hard case (module docstring)

    # ---- time <-> frame -----------------------------------------------------------------------------
    @property
    def stop_s(self) -> float | None:
        """End of the clip: `end_s`, else `duration_s`, else None (unknown)."""
        return self.end_s if self.end_s is not None else self.duration_s

    def frame_index(self, time_s: float) -> int:
        """The frame after which a turn at `time_s` is placed (`stream_format.frame_index`)."""
        return frame_index(time_s, self.fps, self.start_s)

    def frame_time(self, index: int) -> float:
        """Time of frame `index`: start_s + index / fps."""
        return self.start_s + index / self.fps

    def num_frames(self) -> int:
        """Frames in the stream: ceil((end - start_s) * fps), or last turn's frame + 1 if end is unknown."""
        stop = self.stop_s
        if stop is None:
            return self.frame_index(self.turns[-1].time_s) + 1 if self.turns else 0
        return count_frames(self.start_s, stop, self.fps)

    # ---- paths ------------------------------------------------------------------------------------------
    def video_path(self, root: str | Path) -> Path | None:
        """The video file, resolved against `root` (the JSONL file's folder)."""
        return None if self.video is None else Path(root) / self.video

    def features_path(self, root: str | Path) -> Path | None:
        """The feature-cache file, resolved against `root` (the JSONL file's folder)."""
        return None if self.features is None else Path(root) / self.features

    # ---- JSON -------------------------------------------------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        """The JSON object of this record (optional fields left out when unset)."""
        obj: dict[str, Any] = {"id": self.id}
        for key in ("video", "features"):
            if getattr(self, key) is not None:
                obj[key] = getattr(self, key)
        obj["fps"] = self.fps
        if self.duration_s is not None:
            obj["duration_s"] = self.duration_s
        obj["start_s"] = self.start_s
        for key in ("end_s", "task", "meta", "key_frames_s"):
            if getattr(self, key) is not None:
                obj[key] = getattr(self, key)
        obj["turns"] = [t.to_json() for t in self.turns]
        return obj

    @classmethod
    def from_json(cls, obj: Any, where: str = "dialogue") -> Dialogue:
        """Parse and validate one record.

        Args:
            obj: the decoded JSON value of one line.
            where: prefix of error messages, e.g. "dialogue.jsonl line 7".
        Raises:
            DialogueError: naming `where`, the field and what is wrong.
        """
        if not isinstance(obj, dict):
            raise DialogueError(f"{where}: expected a JSON object (one dialogue per line), got "
                                f"{type(obj).__name__}")
        unknown = sorted(set(obj) - set(_RECORD_KEYS))
        if unknown:
            raise DialogueError(f"{where}: {unknown[0]}: unknown field; valid fields: {list(_RECORD_KEYS)}")
        for key in ("id", "fps", "turns"):
            if key not in obj:
                raise DialogueError(f"{where}: {key}: missing (required fields: id, fps, turns, and "
                                    "video or features)")
        dialogue = cls(
            id=_string(obj, "id", where),
            video=_optional_string(obj, "video", where),
            fps=_number(obj, "fps", where),
            turns=_turns(obj["turns"], where),
            duration_s=_optional_number(obj, "duration_s", where),
            start_s=_optional_number(obj, "start_s", where) or 0.0,
            end_s=_optional_number(obj, "end_s", where),
            features=_optional_string(obj, "features", where),
            task=_optional_string(obj, "task", where),
            meta=_optional_meta(obj, where),
            key_frames_s=_optional_times(obj, "key_frames_s", where),
        )
        dialogue.validate(where)
        return dialogue

    def validate(self, where: str | None = None) -> None:
        """Check the schema rules of the module docstring.

        Raises:
            DialogueError: the first broken rule, prefixed with `where` (default: the dialogue id).
        """
        where = where or f"dialogue {self.id!r}"
        _check_header(self, where)
        _check_turns(self, where)
        _check_key_frames(self, where)

    def key_frames(self) -> list[int]:
        """The frame index of every key frame (`key_frames_s`), in the given order."""
        return [self.frame_index(t) for t in self.key_frames_s or []]


# ---------------------------------------------------------------------------------------------------
# field parsing


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _string(obj: dict[str, Any], key: str, where: str) -> str:
    value = obj[key]
    if not isinstance(value, str) or not value.strip():
        raise DialogueError(f"{where}: {key}: expected a non-empty string, got {value!r}")
    return value


def _optional_string(obj: dict[str, Any], key: str, where: str) -> str | None:
    return None if obj.get(key) is None else _string(obj, key, where)


def _number(obj: dict[str, Any], key: str, where: str) -> float:
    value = obj[key]
    if not _is_number(value) or not math.isfinite(value):
        raise DialogueError(f"{where}: {key}: expected a finite number, got {value!r}")
    return float(value)


def _optional_number(obj: dict[str, Any], key: str, where: str) -> float | None:
    return None if obj.get(key) is None else _number(obj, key, where)


def _optional_meta(obj: dict[str, Any], where: str) -> dict[str, Any] | None:
    meta = obj.get("meta")
    if meta is not None and not isinstance(meta, dict):
        raise DialogueError(f"{where}: meta: expected a JSON object, got {meta!r}")
    return meta


def _optional_times(obj: dict[str, Any], key: str, where: str) -> list[float] | None:
    value = obj.get(key)
    if value is None:
        return None
    if not isinstance(value, list) or not all(_is_number(t) and math.isfinite(t) for t in value):
        raise DialogueError(f"{where}: {key}: expected a list of times in seconds, got {value!r}")
    return [float(t) for t in value]


def _turns(value: Any, where: str) -> list[Turn]:
    if not isinstance(value, list) or not value:
        raise DialogueError(f"{where}: turns: expected a non-empty list of "
                            f'{{"role", "time_s", "text"}} objects, got {value!r}')
    turns = []
    for i, item in enumerate(value):
        name = f"turns[{i}]"
        if not isinstance(item, dict):
            raise DialogueError(f"{where}: {name}: expected an object with role, time_s, text; got {item!r}")
        unknown = sorted(set(item) - set(_TURN_KEYS))
        if unknown:
            raise DialogueError(f"{where}: {name}.{unknown[0]}: unknown field; a turn has {list(_TURN_KEYS)}")
        for key in _TURN_KEYS:
            if key not in item:
                raise DialogueError(f"{where}: {name}.{key}: missing")
        role, time_s, text = item["role"], item["time_s"], item["text"]
        if not _is_number(time_s) or not math.isfinite(time_s):
            raise DialogueError(f"{where}: {name}.time_s: expected a finite number of seconds, got {time_s!r}")
        if not isinstance(role, str) or not isinstance(text, str):
            bad = "role" if not isinstance(role, str) else "text"
            raise DialogueError(f"{where}: {name}.{bad}: expected a string, got {item[bad]!r}")
        turns.append(Turn(role=role, time_s=float(time_s), text=text))
    return turns


# ---------------------------------------------------------------------------------------------------
# rules


def _check_header(d: Dialogue, where: str) -> None:
    if not isinstance(d.id, str) or not d.id.strip():
        raise DialogueError(f"{where}: id: expected a non-empty string, got {d.id!r}")
    if d.video is None and d.features is None:
        raise DialogueError(f"{where}: video: missing; a dialogue needs a video or a features file")
    if not d.fps > 0:
        raise DialogueError(f"{where}: fps: must be positive, got {d.fps}")
    if d.duration_s is not None and not d.duration_s > 0:
        raise DialogueError(f"{where}: duration_s: must be positive, got {d.duration_s}")
    if d.start_s < 0:
        raise DialogueError(f"{where}: start_s: must be >= 0, got {d.start_s}")
    if d.end_s is not None and not d.end_s > d.start_s:
        raise DialogueError(f"{where}: end_s: {d.end_s} must be after start_s ({d.start_s})")
    if d.end_s is not None and d.duration_s is not None and d.end_s > d.duration_s + FRAME_EPS:
        raise DialogueError(f"{where}: end_s: {d.end_s} is after the end of the video "
                            f"(duration_s {d.duration_s})")
    if d.duration_s is not None and d.start_s >= d.duration_s:
        raise DialogueError(f"{where}: start_s: {d.start_s} is not before the end of the video "
                            f"(duration_s {d.duration_s})")
    if not d.turns:
        raise DialogueError(f"{where}: turns: empty; a dialogue needs at least one turn")


def _check_turns(d: Dialogue, where: str) -> None:
    stop, n_frames = d.stop_s, d.num_frames()
    for i, turn in enumerate(d.turns):
        name = f"turns[{i}]"
        _check_turn_fields(turn, i, name, where)
        if turn.time_s < d.start_s - FRAME_EPS:
            raise DialogueError(f"{where}: {name}.time_s: {turn.time_s} is before start_s ({d.start_s})")
        if stop is not None and turn.time_s > stop + FRAME_EPS:
            raise DialogueError(f"{where}: {name}.time_s: {turn.time_s} is after the end of the clip ({stop})")
        if stop is not None and d.frame_index(turn.time_s) >= n_frames:
            last = d.frame_time(n_frames - 1)
            raise DialogueError(f"{where}: {name}.time_s: {turn.time_s} falls after frame "
                                f"{d.frame_index(turn.time_s)}, but the clip has {n_frames} frames (the last "
                                f"at {last:g} s); move the turn to {last:g} s or earlier")
        if i > 0 and turn.time_s < d.turns[i - 1].time_s:
            raise DialogueError(f"{where}: {name}.time_s: {turn.time_s} is before the previous turn "
                                f"({d.turns[i - 1].time_s}); turns must be in time order")
    _check_answer_rules(d, where)


def _check_key_frames(d: Dialogue, where: str) -> None:
    stop, n_frames = d.stop_s, d.num_frames()
    seen: dict[int, float] = {}
    for i, time_s in enumerate(d.key_frames_s or []):
        name = f"key_frames_s[{i}]"
        if time_s < d.start_s - FRAME_EPS or (stop is not None and time_s > stop + FRAME_EPS):
            raise DialogueError(f"{where}: {name}: {time_s} is outside the clip [{d.start_s}, {stop})")
        frame = d.frame_index(time_s)
        if frame >= n_frames:
            raise DialogueError(f"{where}: {name}: {time_s} falls after frame {frame}, but the clip has "
                                f"{n_frames} frames; give a time on one of them")
        if frame in seen:
            raise DialogueError(f"{where}: {name}: {time_s} falls on frame {frame} like {seen[frame]}; "
                                "give each key frame once")
        seen[frame] = time_s


def _check_turn_fields(turn: Turn, i: int, name: str, where: str) -> None:
    if turn.role not in ROLES:
        raise DialogueError(f"{where}: {name}.role: {turn.role!r} is not one of {list(ROLES)}")
    if turn.role == "system" and i > 0:
        raise DialogueError(f"{where}: {name}.role: a system turn may only be the first turn")
    if not turn.text.strip():
        raise DialogueError(f"{where}: {name}.text: empty; every turn needs some text")


def _check_answer_rules(d: Dialogue, where: str) -> None:
    """Users are answered on their own frame; one assistant turn per frame between user turns."""
    turns = d.turns
    last_assistant: int | None = None  # index of the last assistant turn since the last user turn
    for i, turn in enumerate(turns):
        if turn.role == "user":
            nxt = turns[i + 1] if i + 1 < len(turns) else None
            if nxt is None or nxt.role != "assistant" or d.frame_index(nxt.time_s) != d.frame_index(turn.time_s):
                got = "nothing" if nxt is None else f"{nxt.role} at {nxt.time_s} s"
                raise DialogueError(f"{where}: turns[{i + 1}]: a user turn (turns[{i}] at {turn.time_s} s) "
                                    f"must be followed at once by an assistant turn at the same time; got "
                                    f"{got}; add an acknowledgement or the answer")
            last_assistant = None
        elif turn.role == "note":
            before = turns[i - 1] if i > 0 and turns[i - 1].role != "system" else None
            if before is not None and d.frame_index(before.time_s) == d.frame_index(turn.time_s):
                raise DialogueError(f"{where}: turns[{i}].time_s: a note must be the first turn on its frame "
                                    f"(frame {d.frame_index(turn.time_s)}), after turns[{i - 1}] ({before.role}) "
                                    "there; move the note to a frame of its own or before that turn")
        elif turn.role == "assistant":
            prev = last_assistant
            if prev is not None and d.frame_index(turns[prev].time_s) == d.frame_index(turn.time_s):
                raise DialogueError(f"{where}: turns[{i}].time_s: {turn.time_s} falls on frame "
                                    f"{d.frame_index(turn.time_s)} like turns[{prev}] (an assistant turn) "
                                    "with no user turn between; merge their texts into one turn")
            last_assistant = i


# ---------------------------------------------------------------------------------------------------
# files


def _where(path: Path, line: int) -> str:
    return f"{path} line {line}"


def _parse_lines(path: str | Path) -> Iterator[tuple[int, Dialogue | DialogueError]]:
    """Yield (line number, Dialogue or the error of that line) for every non-blank line of `path`.

    Raises:
        FileNotFoundError: `path` does not exist.
        DialogueError: the file holds no dialogue at all.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"dialogue file {path} does not exist; make one with `livevlm data convert`")
    seen: dict[str, int] = {}
    count = 0
    with path.open(encoding="utf-8") as f:
        for number, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            count += 1
            yield number, _parse_line(raw, path, number, seen)
    if count == 0:
        raise DialogueError(f"{path} is empty: no dialogues in it (one JSON object per line expected); "
                            "make one with `livevlm data convert`")


def _parse_line(raw: str, path: Path, number: int, seen: dict[str, int]) -> Dialogue | DialogueError:
    where = _where(path, number)
    try:
        obj = json.loads(raw.rstrip("\r\n"))
    except json.JSONDecodeError as exc:
        return DialogueError(f"{where}: not valid JSON (column {exc.colno}: {exc.msg}); each line must "
                             "be one complete JSON object")
    try:
        dialogue = Dialogue.from_json(obj, where)
    except DialogueError as exc:
        return exc
    if dialogue.id in seen:
        return DialogueError(f"{where}: id: {dialogue.id!r} is already used on line {seen[dialogue.id]}; "
                             "ids must be unique")
    seen[dialogue.id] = number
    return dialogue


def iter_dialogues(path: str | Path) -> Iterator[Dialogue]:
    """Stream the dialogues of a JSONL file, one line at a time.

    Raises:
        FileNotFoundError: the file does not exist.
        DialogueError: at the first malformed line (file, line number, field, problem) or an empty file.
    """
    for _, item in _parse_lines(path):
        if isinstance(item, DialogueError):
            raise item
        yield item


def read_dialogues(path: str | Path) -> list[Dialogue]:
    """All dialogues of a JSONL file (see `iter_dialogues` for the errors)."""
    return list(iter_dialogues(path))


def write_jsonl(path: str | Path, records: Iterable[dict[str, Any]]) -> int:
    """Write JSON objects one per line, atomically: a temp file in the same folder, then a rename.

    A crash mid-way leaves the previous file (if any) untouched and no half-written one.
    Returns:
        the number of records written.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    count = 0
    with atomic_path(path) as tmp, open(tmp, "x", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
            count += 1
    return count


def write_dialogues(path: str | Path, dialogues: Iterable[Dialogue]) -> int:
    """Validate and write dialogues to a JSONL file atomically (see `write_jsonl`).

    Raises:
        DialogueError: a dialogue breaks the schema (nothing is written then).
    Returns:
        the number of dialogues written.
    """
    def records() -> Iterator[dict[str, Any]]:
        seen: set[str] = set()
        for d in dialogues:
            d.validate()
            if d.id in seen:
                raise DialogueError(f"dialogue {d.id!r}: id: used twice; ids must be unique")
            seen.add(d.id)
            yield d.to_json()

    return write_jsonl(path, records())


# ---------------------------------------------------------------------------------------------------
# checking a whole file (`livevlm data validate`)


def check_file(path: str | Path, check_videos: bool = False, max_errors: int = 10) -> tuple[int, int, list[str]]:
    """Validate a dialogue file, collecting errors instead of stopping at the first.

    Returns:
        (number of valid dialogues, their number of turns, up to `max_errors` error messages).
    Raises:
        FileNotFoundError / DialogueError: missing or empty file.
    """
    root = Path(path).parent
    n_dialogues = n_turns = 0
    errors: list[str] = []
    for number, item in _parse_lines(path):
        if isinstance(item, DialogueError):
            errors.append(str(item))
        else:
            video = item.video_path(root)
            if check_videos and video is not None and not video.is_file():
                errors.append(f"{_where(Path(path), number)}: video: {item.video} does not exist (looked for "
                              f"{video}); paths are relative to the JSONL file's folder")
                continue
            n_dialogues += 1
            n_turns += len(item.turns)
        if len(errors) >= max_errors:
            break
    return n_dialogues, n_turns, errors
