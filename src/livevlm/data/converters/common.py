"""What every converter shares: its arguments, annotation readers with line-numbered errors, video paths,
and `StreamBuilder`, which places timed events and queries on the fps grid by the schema's rules."""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from livevlm.data.schema import FRAME_EPS, Turn
from livevlm.stream_format import count_frames, frame_index

log = logging.getLogger(__name__)


class AnnotationError(ValueError):
    """An annotation file cannot be converted; the message names the file, the record and the remedy."""


@dataclass
class ConvertOptions:
    """What a conversion reads, writes and makes: the converters' typed config. The `livevlm data convert`
    command builds its options from these fields (their "help" metadata is their documentation)."""

    input: str = field(metadata={"help": "annotation file to convert (its format depends on --from)"})
    output: str = field(metadata={"help": "dialogue JSONL to write (paths in it are relative to its folder)"})
    # The command line spells it `--from KIND`: "aliases" is for the CLI builder (`from` is a keyword).
    kind: str = field(default="", metadata={"help": "source format: world, world-scene, world-changes, world-"
                                                    "reminders, world-narration, world-questions, "
                                                    "ego4d-narration, coin, segments",
                                            "aliases": ["--from"]})
    fps: float = field(default=2.0, metadata={"help": "frame rate of the streams; assistant turns are put "
                                                     "on this grid"})
    seed: int = field(default=0, metadata={"help": "seed of the random choices (prompts, query times)"})
    video_root: str = field(default="", metadata={
        "help": "folder holding the videos (ego4d-narration: {uid}.mp4, coin: {youtube_id}.mp4, segments: "
                "the video field); default: next to OUTPUT. Giving it also checks that the videos exist"})
    video_ext: str = field(default=".mp4", metadata={"help": "extension added to video names that have none"})
    check_videos: bool = field(default=False, metadata={"help": "fail when an annotation names a video "
                                                                "that does not exist"})
    skip_missing: bool = field(default=False, metadata={"help": "leave out (with a warning) records whose "
                                                                "video is missing instead of failing"})
    reminders: int = field(default=2, metadata={"help": "world, world-reminders: reminder dialogues (clips) per "
                                                        "video"})
    reminder_distractors: bool = field(default=False, metadata={
        "help": "world-reminders: ask each reminder before another object's event of the same kind where "
                "one allows it (the model must not answer that one)"})
    reminder_pairs: bool = field(default=False, metadata={
        "help": "world-reminders: follow each clip with its unanswered twin (the same frames and moment, the "
                "request about another object, silent to the end) where the scene allows one"})
    reminder_notes: bool = field(default=False, metadata={
        "help": "world, world-reminders: the model notes each event after a reminder's request (\"note\" turns, "
                "for a format with format.note_role) and answers after the note of the event asked about"})
    event_notes: bool = field(default=False, metadata={
        "help": "world, world-*: the model notes every event (\"note\" turns, for a format with "
                "format.note_role), from the clip's first frame, then says it where narration is asked for; "
                "questions about the past are answered from the notes; implies --reminder-notes"})
    narration_clips: int = field(default=4, metadata={"help": "world-narration: narration clips per video, "
                                                              "the narration prompts taken in turn"})
    questions: int = field(default=4, metadata={"help": "world: questions per video (one dialogue); "
                                                        "world-questions: questions per dialogue"})
    question_dialogues: int = field(default=1, metadata={"help": "world-questions: question dialogues per "
                                                                 "video, each at its own random frames"})
    question_tenses: str = field(default="past,present,ongoing", metadata={
        "help": "world, world-questions: the tenses a question is drawn from, comma-separated: past (\"What "
                "just happened?\", \"What appeared last?\"), present (how many, what colour, how big), "
                "ongoing (what an object is doing)"})
    scene_frames: int = field(default=20, metadata={"help": "world-scene: single-frame \"What is on the "
                                                            "screen?\" clips per video"})
    scene_places: bool = field(default=False, metadata={
        "help": "world-scene: say where each object is, in the world's place words (\"a small red circle on "
                "the left\"): the ninth of the frame holding its centre, which narration names at every "
                "appearance, stop and departure"})
    min_words: int = field(default=2, metadata={"help": "ego4d-narration: drop narrations shorter than this "
                                                        "after cleaning"})
    subset: str = field(default="", metadata={"help": "coin: only videos whose subset contains this "
                                                      "(training, testing)"})
    benchmarks: str = field(default="", metadata={"help": "coin: also write the offline benchmark samples "
                                                          "(step, next, task, procedure, procedure+) here"})
    segment_time: Literal["start", "end"] = field(default="start", metadata={
        "help": "segments: say each segment's text when it starts or when it ends"})


# ---------------------------------------------------------------------------------------------------
# reading annotation files


def _nonempty_text(path: Path) -> str:
    if not path.is_file():
        raise FileNotFoundError(f"annotation file {path} does not exist")
    text = path.read_text(encoding="utf-8")
    if not text.strip():
        raise AnnotationError(f"{path} is empty: there is nothing to convert; check that the download or "
                              "the generator finished")
    return text


def read_json(path: str | Path) -> Any:
    """Parse a whole-file JSON annotation.

    Raises:
        FileNotFoundError / AnnotationError: missing, empty or malformed file (with line and column).
    """
    path = Path(path)
    try:
        return json.loads(_nonempty_text(path))
    except json.JSONDecodeError as exc:
        raise AnnotationError(f"{path} line {exc.lineno}: not valid JSON (column {exc.colno}: {exc.msg}); "
                              "the file may be truncated: download or generate it again") from None


def read_jsonl(path: str | Path) -> list[tuple[int, Any]]:
    """Parse a JSONL annotation: (line number, object) for every non-blank line.

    Raises:
        FileNotFoundError / AnnotationError: missing or empty file, or a malformed line (file + line).
    """
    path = Path(path)
    records = []
    for number, line in enumerate(_nonempty_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            records.append((number, json.loads(line)))
        except json.JSONDecodeError as exc:
            raise AnnotationError(f"{path} line {number}: not valid JSON (column {exc.colno}: {exc.msg}); "
                                  "each line must be one complete JSON object") from None
    return records


def read_json_or_jsonl(path: str | Path) -> tuple[Any, bool]:
    """A whole-file JSON value, or else the objects of a JSONL file.

    Returns:
        (value, is_jsonl): for JSONL, value is the list of (line number, object).
    """
    path = Path(path)
    text = _nonempty_text(path)
    try:
        return json.loads(text), False
    except json.JSONDecodeError:
        if len([line for line in text.splitlines() if line.strip()]) <= 1:
            return read_json(path), False  # one line that is broken: report it as JSON
        return read_jsonl(path), True


NUMBER = (int, float)


def require(obj: Any, key: str, where: str, kinds: type | tuple[type, ...], hint: str = "") -> Any:
    """`obj[key]` checked for presence and type (NUMBER: a finite int/float, not a bool).

    Raises:
        AnnotationError: naming `where`, `key` and what is wrong (plus `hint`, the remedy).
    """
    if not isinstance(obj, dict):
        raise AnnotationError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    if key not in obj:
        raise AnnotationError(f"{where}: {key}: missing{'; ' + hint if hint else ''}")
    value = obj[key]
    if kinds is NUMBER:
        ok = isinstance(value, NUMBER) and not isinstance(value, bool) and math.isfinite(value)
        expected = "a finite number"
    else:
        ok = isinstance(value, kinds)
        names = [k.__name__ for k in (kinds if isinstance(kinds, tuple) else (kinds,))]
        expected = " or ".join({"str": "a string", "list": "a list", "dict": "an object"}.get(n, n) for n in names)
    if not ok:
        raise AnnotationError(f"{where}: {key}: expected {expected}, got {value!r}")
    return value


# ---------------------------------------------------------------------------------------------------
# video paths


def rebase(path: str, from_dir: Path, to_dir: Path) -> str:
    """`path` (relative to `from_dir`, or absolute) rewritten relative to `to_dir`; absolute stays absolute."""
    if os.path.isabs(path):
        return Path(path).as_posix()
    return Path(os.path.relpath(from_dir / path, to_dir)).as_posix()


@dataclass
class VideoPaths:
    """Turns a source's video name into the dialogue's `video` field and checks that the file exists.

    Names without a suffix get `ext`. With a `root`, the video is `root/name`: an absolute root stays
    absolute, a relative one is taken from the current directory and rewritten relative to the output
    file's folder. Without a root, the video is expected next to the output file.
    """

    out_dir: Path
    source: Path
    root: str = ""
    ext: str = ".mp4"
    check: bool = False
    skip_missing: bool = False

    @classmethod
    def from_args(cls, args: ConvertOptions, check_with_root: bool = True) -> VideoPaths:
        check = args.check_videos or (check_with_root and bool(args.video_root))
        return cls(Path(args.output).parent, Path(args.input), args.video_root, args.video_ext, check,
                   args.skip_missing)

    def ref(self, name: str) -> str:
        """The `video` field for a source video name."""
        if not Path(name).suffix and self.ext:
            name = name + self.ext
        if not self.root:
            return Path(name).as_posix()
        if os.path.isabs(self.root):
            return (Path(self.root) / name).as_posix()
        return rebase(name, Path(self.root), self.out_dir)

    def exists(self, ref: str, record: str) -> bool:
        """False (after a warning) when the video is missing and skip_missing is set.

        Raises:
            AnnotationError: the video is missing (when checking), naming the file, record and remedy.
        """
        if not self.check:
            return True
        path = Path(os.path.normpath(self.out_dir / ref))
        if path.is_file():
            return True
        message = (f"{self.source}: {record}: video {path} does not exist; download it, point --video-root at "
                   "the folder that holds the videos, or pass --skip-missing to leave such records out")
        if self.skip_missing:
            log.warning("skipped: %s", message)
            return False
        raise AnnotationError(message)


# ---------------------------------------------------------------------------------------------------
# grid placement


def ceil_frame(time_s: float, fps: float, start_s: float = 0.0) -> int:
    """Index of the first frame at or after `time_s` (frame i is at start_s + i / fps): the number of frames
    before it, `count_frames(start_s, time_s, fps)`."""
    return count_frames(start_s, time_s, fps)


@dataclass
class _Query:
    seq: int
    question: str
    reply: str
    absorb: bool


@dataclass
class StreamBuilder:
    """Collects events (said by the assistant) and user queries, then lays them out as schema turns.

    Events are said at the first frame at or after them; an event after the clip end, or before the frame
    period preceding its start, is dropped; one between the last frame and the end is said at the last
    frame. Queries are asked after the frame at
    or before them and answered at once. On one frame: the model's notes (merged with " "), then the events
    (merged with " "), then each query and its reply. A query with `absorb=True` takes the events of its frame
    as its reply (e.g. the first narration answers the narration instruction), `reply` being the fallback.
    """

    fps: float
    start_s: float = 0.0
    end_s: float | None = None
    _events: dict[int, list[str]] = field(default_factory=dict)
    _queries: dict[int, list[_Query]] = field(default_factory=dict)
    _notes: dict[int, list[str]] = field(default_factory=dict)
    _seq: int = 0

    @property
    def num_frames(self) -> int | None:
        return None if self.end_s is None else count_frames(self.start_s, self.end_s, self.fps)

    def frame_time(self, index: int) -> float:
        return self.start_s + index / self.fps

    def say(self, time_s: float, text: str) -> int | None:
        """Add an assistant event; returns its frame, or None when it falls outside the clip."""
        return self._place(self._events, time_s, text)

    def note(self, time_s: float, text: str) -> int | None:
        """Add the model's note to itself about an event (a "note" turn, placed as `say` places events); returns
        its frame, or None when it falls outside the clip."""
        return self._place(self._notes, time_s, text)

    def note_every_event(self, events: list[tuple[float, str]]) -> None:
        """Note every event (time_s, sentence) of the clip on a frame that notes none yet: the model keeps a
        note of each event whatever it is asked, and what follows the note (saying it, answering a reminder,
        or watching on) is the requests' to decide; a later question about the past ("What just happened?")
        is answered from the notes. A frame's events are noted together, in order."""
        unnoted: dict[int, list[str]] = {}
        for time_s, text in events:
            frame = self._frame_of(time_s)
            if frame is not None and frame not in self._notes:
                unnoted.setdefault(frame, []).append(text.strip())
        self._notes.update(unnoted)

    def _frame_of(self, time_s: float) -> int | None:
        """The frame an event at `time_s` is said on (the first at or after it), or None outside the clip."""
        before_first = (time_s - self.start_s) * self.fps <= -1 + FRAME_EPS  # would be said before frame 0
        if before_first or (self.end_s is not None and time_s > self.end_s + FRAME_EPS):
            return None
        frame = ceil_frame(time_s, self.fps, self.start_s)
        if self.num_frames is not None:
            frame = min(frame, self.num_frames - 1)
        return frame

    def _place(self, said: dict[int, list[str]], time_s: float, text: str) -> int | None:
        frame = self._frame_of(time_s)
        if frame is not None:
            said.setdefault(frame, []).append(text.strip())
        return frame

    def ask(self, time_s: float, question: str, reply: str, absorb: bool = False) -> int:
        """Add a user query answered at once; returns its frame."""
        frame = frame_index(time_s, self.fps, self.start_s)  # the frame the turn follows
        if self.num_frames is not None:
            frame = min(frame, self.num_frames - 1)
        self._seq += 1
        self._queries.setdefault(frame, []).append(_Query(self._seq, question.strip(), reply.strip(), absorb))
        return frame

    def turns(self) -> list[Turn]:
        """The turns in time order, all on the fps grid, obeying the schema's answer rules."""
        turns: list[Turn] = []
        for frame in sorted(set(self._events) | set(self._queries) | set(self._notes)):
            time_s = self.frame_time(frame)
            if frame in self._notes:
                turns.append(Turn("note", time_s, " ".join(self._notes[frame])))
            events = list(self._events.get(frame, []))
            queries = self._queries.get(frame, [])
            if queries and queries[0].absorb and events:
                queries = [_Query(queries[0].seq, queries[0].question, " ".join(events), True), *queries[1:]]
                events = []
            if events:
                turns.append(Turn("assistant", time_s, " ".join(events)))
            for query in queries:
                turns.append(Turn("user", time_s, query.question))
                turns.append(Turn("assistant", time_s, query.reply))
        return turns


def sentence(text: str) -> str:
    """`text` stripped, its first letter upper-cased (the rest kept: acronyms survive)."""
    text = " ".join(text.split())
    return text[:1].upper() + text[1:]
