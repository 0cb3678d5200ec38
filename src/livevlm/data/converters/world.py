"""Synthetic-world annotations → narration, reminder and question dialogues with exact answers.

Input: the world generator's `annotations.jsonl`, one video per line: `{"video": "videos/000.mp4",
"duration_s": 30.0, "fps": 2, "events": [{"time_s": 3.5, "text": "A small red circle appears on the
left.", "kind": "appear", "object": {"id": 0, "shape": "circle", "color": "red", "size": "small"}, ...}],
"steps": [...]}`. Event kinds: appear, move (`direction`), stop, color (`new_color`), size (`new_size`),
collide (`other`: the object hit; both stop), leave; `object` is the object as it was before the event.
Unknown kinds and extra fields are ignored; the video path is rewritten relative to the output folder.

Per video (all clips are the whole video; every answer is computed from the events up to its time):
- `{stem}-narration`: a narration prompt at the first frame, answered by an acknowledgement (or by the
  first events when they are due there); every event said at the first frame at or after it, same-frame
  events merged with " ".
- `{stem}-reminder-{j}`: "Tell me when the blue square leaves." asked at a random frame up to a minute
  before a future event of that object and kind (the object unambiguous then, and that event the first of its kind for
  it since), acknowledged at once, answered with the event's sentence at its frame.
- `{stem}-questions`: questions at distinct random frames, answered at once: past ("What just
  happened?", "What appeared last?"), present ("How many objects are there?", "What colour is the
  circle?", "How big is the red circle?") and ongoing ("What is the red circle doing?" → "It is moving
  to the right." while it moves).

`--from world-scene` makes single-frame clips instead, for an alignment stage before the streams (LLaVA's
stage 1 in miniature): `{stem}-scene-{k}` asks "What is on the screen?" at one random frame and answers with
every object's size, colour and shape in reading order, top third first, then left to right ("A small red
circle and a large blue square."), the order the frame itself shows. Narration names a
new object's colour and shape once per appearance, far too rarely to learn to read them from the frame
tokens; `--scene-frames` per video supply those readings cheaply (a frame and a sentence each).

`--from world-reminders` makes the reminders alone, as short clips: `{stem}-reminder-clip-{j}` starts
`REMINDER_CLIP_LEAD_S` before the request and ends `REMINDER_CLIP_TAIL_S` after the frame that answers it
(silent frames: a reminder answered is done), so a reminder costs its own seconds of frames, not the whole
video's; `--reminders` per video (each about a different event). The streams hold two reminders a video, too
few to learn waiting through other events for the one asked about. `--reminder-distractors` asks each, where
the video allows it, before another object's event of the same kind, which the reminder must stay silent
through. `--reminder-pairs` follows each clip with its unanswered twin `{stem}-reminder-clip-{j}-unanswered`:
the same frames and moment, the request about another object that the clip never answers, so that only the
request tells answering from staying silent. `--reminder-notes` has the model note every event after the
request (a "note" turn with the event's sentences, for a format with `format.note_role`) and answer after the
note of the event asked about: the choice to answer is then made right after the event's words, where the
model can compare them with the request, rather than at the frame (docs/experiments.md, "A verdict after the
event's words"). `--event-notes` (any `--from world…`) has the model note every event, from a clip's first
frame, whatever it was asked: narration says each event after its note (as a reminder answers after the note of
its event), a question about the past ("What just happened?") is answered from the notes rather than from
frames seconds back, and with no request the model notes and watches on; it implies `--reminder-notes`.

`--from world-narration` makes narration alone, as short clips: `{stem}-narration-clip-{j}`, `--narration-clips`
per video, each under its own narration prompt (the prompts taken in turn, so each is asked as often), the
first at the video's first frame and the others `REMINDER_CLIP_LEAD_S` into the clip at a frame with an event in
the `NARRATION_CLIP_S` from it; the events the request's frame shows first answer the request (as in the
streams), every later one is said at its frame, never noted. Beside the reminder clips of a notes stage
(which note every event after their request) they teach that a narration request, even one worded like a
reminder ("Tell me what happens as soon as it happens."), is answered by saying each event
(docs/experiments.md, "Narration kept").

`--from world-questions` makes the questions alone: `{stem}-questions-{j}`, `--question-dialogues` per video of
`--questions` questions each, every dialogue at its own random frames. A question dialogue costs the whole
video's frames whatever its count, so many questions in a dialogue are cheap supervision: the streams hold four a
video, and the default model answered its own training videos' questions no better than unseen ones' (twelve
a dialogue, as a stage of their own, raised them by 1–3 points: docs/experiments.md).

`--from world-changes` makes two-frame clips, the same idea for events: `{stem}-change-{k}` shows the frame
before an event and the frame that narrates it, asks "What just changed?" at the second and answers with
the event's sentences ("The red circle starts moving to the left."). An event on an object already in the
scene is narrated once, and its subject is the hard part (which of the objects moved); these clips teach the
subject from the change between two frames.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from livevlm.data.converters.common import (
    NUMBER,
    AnnotationError,
    ConvertOptions,
    StreamBuilder,
    VideoPaths,
    ceil_frame,
    count_frames,
    read_jsonl,
    rebase,
    require,
    sentence,
)
from livevlm.data.schema import FRAME_EPS, Dialogue

NARRATION_PROMPTS = ("Please narrate the video in real time.", "Tell me what happens as soon as it happens.",
                     "Describe every change you see in the scene.", "Narrate the scene for me.")
NARRATION_ACKS = ("Sure, I will narrate what happens.", "OK, I will describe each change as it happens.")
REMINDER_ACKS = ("Sure, I will tell you when it happens.", "OK, I will let you know.")
REMINDERS = {"appear": "Tell me when {a_name} appears.", "move": "Tell me when the {name} starts moving.",
             "stop": "Tell me when the {name} stops.", "color": "Tell me when the {name} changes colour.",
             "size": "Tell me when the {name} changes size.",
             "collide": "Tell me when the {name} bumps into something.", "leave": "Tell me when the {name} leaves."}
_KIND_ALIASES = {"colour": "color", "change color": "color", "change colour": "color", "recolor": "color",
                 "change size": "size", "grow": "size", "shrink": "size", "collision": "collide",
                 "exit": "leave", "vanish": "leave", "disappear": "leave", "start moving": "move"}
MOVE_PHRASES = {"left": "to the left", "right": "to the right", "up": "up", "down": "down"}
_DIRECTION_VECTORS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}  # image axes: y grows down
SCENE_QUESTION = "What is on the screen?"
CHANGE_QUESTION = "What just changed?"
REMINDER_WINDOW_S = 60.0  # a reminder is asked at most this long before its event (bounds the search, too)
REMINDER_CLIP_LEAD_S = 2.0  # world-reminders: frames before the request (the streams ask it mid-video)
REMINDER_CLIP_TAIL_S = 2.0  # and after the answer, silent: a reminder answered is done (no narration after it)
NARRATION_CLIP_S = 8.0  # world-narration: seconds of a clip after its request (a reminder clip's length, ~10 s)
_NUMBERS = ("no", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")


@dataclass
class Event:
    """One world event, normalised: kind in REMINDERS' keys (or as given), the object before it."""

    time_s: float
    text: str
    kind: str
    obj: dict[str, Any]
    raw: dict[str, Any]

    @property
    def oid(self) -> Any:
        return self.obj.get("id")

    @property
    def name(self) -> str:
        """The object's name as a request says it ("red circle"), as it is before the event."""
        return f"{self.obj.get('color')} {self.obj.get('shape')}"

    def involves(self, oid: Any) -> bool:
        other = self.raw.get("other")
        return self.oid == oid or (isinstance(other, dict) and other.get("id") == oid)


@dataclass
class ObjState:
    shape: str
    color: str
    size: str
    direction: str | None = None  # None while still; "" when moving in an unknown direction

    @property
    def name(self) -> str:
        return f"{self.color} {self.shape}"


def _kind(raw: Any) -> str:
    kind = str(raw or "").lower().replace("_", " ").replace("-", " ").strip()
    return _KIND_ALIASES.get(kind, kind)


def parse_events(items: list[Any], where: str) -> list[Event]:
    """Events of one annotation line, checked for time_s and text, in time order."""
    events = []
    for i, item in enumerate(items):
        here = f"{where}: events[{i}]"
        time_s = float(require(item, "time_s", here, NUMBER))
        text = require(item, "text", here, str).strip()
        obj = item.get("object") if isinstance(item.get("object"), dict) else {}
        events.append(Event(time_s, text, _kind(item.get("kind")), obj, item))
    return sorted(events, key=lambda e: e.time_s)


def state_at(events: list[Event], time_s: float) -> dict[Any, ObjState]:
    """The objects on screen after every event at or before `time_s`, by object id."""
    objects: dict[Any, ObjState] = {}
    for event in events:
        if event.time_s > time_s + FRAME_EPS:
            break
        _apply(objects, event)
    return objects


def _apply(objects: dict[Any, ObjState], event: Event) -> None:
    obj, kind, raw = event.obj, event.kind, event.raw
    if kind == "appear":
        objects[event.oid] = ObjState(str(obj.get("shape", "object")), str(obj.get("color", "")),
                                      str(obj.get("size", "")))
        return
    state = objects.get(event.oid)
    if state is None:
        return
    if kind == "move":
        state.direction = str(raw.get("direction") or "")
    elif kind == "stop":
        state.direction = None
    elif kind == "color" and raw.get("new_color"):
        state.color = str(raw["new_color"])
    elif kind == "size" and raw.get("new_size"):
        state.size = str(raw["new_size"])
    elif kind == "collide":
        state.direction = None
        other = raw.get("other")
        if isinstance(other, dict) and other.get("id") in objects:
            objects[other.get("id")].direction = None
    elif kind == "leave":
        del objects[event.oid]


# ---------------------------------------------------------------------------------------------------
# the three dialogue kinds


@dataclass
class WorldVideo:
    stem: str
    video: str
    duration_s: float
    events: list[Event]
    note_every_event: bool = False  # `--event-notes`: every clip notes each of its events

    def dialogue(self, suffix: str, builder: StreamBuilder, task: str,
                 key_frames_s: list[float] | None = None) -> Dialogue:
        """The builder's turns as a clip of this video, spanning the builder's clip (the whole video unless
        the builder ends sooner); with `note_every_event`, a note at every frame with events."""
        if self.note_every_event:
            builder.note_every_event([(e.time_s, e.text) for e in self.events])
        end_s = self.duration_s if builder.end_s is None else builder.end_s
        return Dialogue(id=f"{self.stem}-{suffix}", video=self.video, fps=builder.fps, turns=builder.turns(),
                        duration_s=self.duration_s, start_s=builder.start_s, end_s=end_s, task=task,
                        meta={"source": "world"}, key_frames_s=key_frames_s or None)


def narration(video: WorldVideo, fps: float, rng: random.Random) -> Dialogue:
    """Every event narrated at the first frame at or after it."""
    builder = StreamBuilder(fps, 0.0, video.duration_s)
    builder.ask(0.0, rng.choice(NARRATION_PROMPTS), rng.choice(NARRATION_ACKS), absorb=True)
    for event in video.events:
        builder.say(event.time_s, event.text)
    return video.dialogue("narration", builder, "narration")


def narration_clips(video: WorldVideo, fps: float, count: int, rng: random.Random) -> list[Dialogue]:
    """Up to `count` narration clips, each asked with the next narration prompt (in a shuffled order): the first
    at the video's first frame (where a user starting a stream asks, and the streams do), the others at random
    frames, each with an event in the `NARRATION_CLIP_S` from its request. A clip runs from
    `REMINDER_CLIP_LEAD_S` before the request to `NARRATION_CLIP_S` after it; the events its request's frame
    shows first answer the request (as in the streams: "A large red circle appears on the left."), the later
    ones are said at their frames up to the clip's last frame. Those frames are the clip's key frames."""
    n_frames = count_frames(0.0, video.duration_s, fps)
    span = round(NARRATION_CLIP_S * fps)
    event_frames = sorted({ceil_frame(e.time_s, fps) for e in video.events if e.time_s <= video.duration_s})
    asks = [k for k in range(n_frames) if any(k <= f <= min(k + span, n_frames - 1) for f in event_frames)]
    chosen = [0] if 0 in asks and count > 0 else []
    chosen += rng.sample([k for k in asks if k not in chosen], min(count - len(chosen), len(asks) - len(chosen)))
    prompts = list(NARRATION_PROMPTS)
    rng.shuffle(prompts)
    dialogues: list[Dialogue] = []
    for j, ask in enumerate(chosen):
        first_shown = max(0, ask - round(REMINDER_CLIP_LEAD_S * fps))
        last_shown = min(n_frames - 1, ask + span)
        builder = StreamBuilder(fps, first_shown / fps, (last_shown + 1) / fps)
        builder.ask(ask / fps, prompts[j % len(prompts)], rng.choice(NARRATION_ACKS), absorb=True)
        for event in video.events:  # first shown at the request's frame or later, up to the clip's last frame
            if ask <= ceil_frame(event.time_s, fps) <= last_shown:
                builder.say(event.time_s, event.text)
        key_frames_s = event_frames_s(video.events, ask, last_shown, fps)
        dialogues.append(video.dialogue(f"narration-clip-{j}", builder, "narration", key_frames_s))
    return dialogues


def _reminder_ok(events: list[Event], target: Event, ask_s: float) -> bool:
    """Whether "tell me when <target>" asked at `ask_s` is unambiguous and answered first by `target`."""
    if target.time_s <= ask_s + FRAME_EPS:
        return False
    objects = state_at(events, ask_s)
    name = target.name
    between = [e for e in events if ask_s + FRAME_EPS < e.time_s and e is not target and e.time_s <= target.time_s]
    if target.kind == "appear":
        return (all(o.name != name for o in objects.values())
                and not any(e.kind == "appear" and e.name == name for e in between))
    state = objects.get(target.oid)
    if state is None or state.name != name or sum(o.name == name for o in objects.values()) != 1:
        return False
    if (target.kind == "stop" and state.direction is None) or (target.kind == "move" and state.direction is not None):
        return False  # "tell me when it stops" about a still object (or "starts moving" about a moving one)
    blocked = {target.kind, "color"}  # an earlier event of the kind would answer; a new colour renames it
    return not any(e.involves(target.oid) and e.kind in blocked for e in between)


def _distracted(events: list[Event], target: Event, ask_s: float, fps: float) -> bool:
    """Whether another object does the asked-about kind of thing after `ask_s` and at an earlier frame than
    `target`: an event the reminder must stay silent through."""
    frame = ceil_frame(target.time_s, fps)
    return any(e.kind == target.kind and e.oid != target.oid and ask_s + FRAME_EPS < e.time_s
               and ceil_frame(e.time_s, fps) < frame for e in events)


def _unanswered_request(events: list[Event], target: Event, ask_s: float, last_s: float,
                        rng: random.Random) -> str | None:
    """A request of `target`'s kind about something else, that nothing from `ask_s` to `last_s` answers.

    The twin of a reminder clip asks it at the same moment over the same frames, so the two clips differ in
    the request alone: the target's event must be answered in one and stayed silent through in the other.
    Only requests a user could make then: an object on screen with a name of its own (still, for "starts
    moving"; moving, for "stops"), or for "appears" a thing the video shows at another time. None when the
    scene offers none.
    """
    objects = state_at(events, ask_s)
    window = [e for e in events if ask_s + FRAME_EPS < e.time_s <= last_s + FRAME_EPS]
    template = REMINDERS[target.kind]
    if target.kind == "appear":
        excluded = {o.name for o in objects.values()} | {e.name for e in window if e.kind == "appear"}
        names = sorted({e.name for e in events if e.kind == "appear" and e.obj.get("color")
                        and e.obj.get("shape")} - excluded)
        return template.format(a_name=with_article(rng.choice(names))) if names else None
    names_on_screen = [o.name for o in objects.values()]
    options = [state.name for oid, state in objects.items()
               if oid != target.oid and names_on_screen.count(state.name) == 1
               and not (target.kind == "move" and state.direction is not None)
               and not (target.kind == "stop" and state.direction is None)
               and not any(e.involves(oid) and e.kind in (target.kind, "color") for e in window)]
    return template.format(name=rng.choice(options)) if options else None


def event_frames_s(events: list[Event], after_frame: int, last_frame: int, fps: float) -> list[float]:
    """The times of the frames that narrate an event, after frame `after_frame` up to `last_frame` (video frame
    indices): a reminder's key frames (`key_frames_s`), where something happens and the model must choose
    between answering (the event asked about) and waiting (any other)."""
    frames = {ceil_frame(e.time_s, fps) for e in events}
    return [f / fps for f in sorted(frames) if after_frame < f <= last_frame]


def reminders(video: WorldVideo, fps: float, count: int, rng: random.Random,
              clip: tuple[float, float] | None = None, distractors: bool = False,
              pairs: bool = False, notes: bool = False) -> list[Dialogue]:
    """Up to `count` reminder dialogues, each about a different future event: over the whole video, or with
    `clip` = (lead_s, tail_s) a clip from lead_s before the request to tail_s after the frame that answers it
    (on the frame grid, within the video). With `distractors`, a request is asked before another object's
    event of the same kind wherever one allows it (`_distracted`): the hard case, answering too early. With
    `pairs` (clips only), each clip is followed by its unanswered twin `…-unanswered` where the scene allows
    one (`_unanswered_request`): the same frames, another object asked about, silent to the end. Every
    reminder marks the frames of the events after its request as key frames (`event_frames_s`). With `notes`,
    the model notes each of those events (`_note_events`) up to the one it answers, a twin all of them."""
    candidates = [e for e in video.events if e.kind in REMINDERS and e.obj.get("color") and e.obj.get("shape")
                  and ceil_frame(e.time_s, fps) >= 1 and e.time_s <= video.duration_s]
    rng.shuffle(candidates)
    n_frames = count_frames(0.0, video.duration_s, fps)
    dialogues: list[Dialogue] = []
    answered = 0  # reminders made so far (their twins not counted)
    for target in candidates:
        if answered == count:
            break
        last = min(ceil_frame(target.time_s, fps), n_frames - 1)
        first = max(0, last - round(REMINDER_WINDOW_S * fps))
        asks = [k for k in range(first, last) if _reminder_ok(video.events, target, k / fps)]
        if not asks:
            continue
        if distractors:
            asks = [k for k in asks if _distracted(video.events, target, k / fps, fps)] or asks
        ask = rng.choice(asks)
        name = target.name
        if clip is None:
            builder, suffix = StreamBuilder(fps, 0.0, video.duration_s), "reminder"
        else:
            first_shown, last_shown = max(0, ask - round(clip[0] * fps)), min(n_frames - 1, last + round(clip[1] * fps))
            builder, suffix = StreamBuilder(fps, first_shown / fps, (last_shown + 1) / fps), "reminder-clip"
        builder.ask(ask / fps, REMINDERS[target.kind].format(name=name, a_name=with_article(name)),
                    rng.choice(REMINDER_ACKS))
        builder.say(target.time_s, target.text)
        shown_to = n_frames - 1 if clip is None else last_shown
        key_frames_s = event_frames_s(video.events, ask, shown_to, fps)
        if notes:
            _note_events(builder, video.events, [s for s in key_frames_s if s <= last / fps + FRAME_EPS], fps)
        dialogues.append(video.dialogue(f"{suffix}-{answered}", builder, "reminder", key_frames_s))
        if pairs and clip is not None:
            request = _unanswered_request(video.events, target, ask / fps, last_shown / fps, rng)
            if request is not None:
                twin = StreamBuilder(fps, first_shown / fps, (last_shown + 1) / fps)
                twin.ask(ask / fps, request, rng.choice(REMINDER_ACKS))
                if notes:
                    _note_events(twin, video.events, key_frames_s, fps)
                dialogues.append(video.dialogue(f"{suffix}-{answered}-unanswered", twin, "reminder",
                                                list(key_frames_s)))
        answered += 1
    return dialogues


def _note_events(builder: StreamBuilder, events: list[Event], frames_s: list[float], fps: float) -> None:
    """A note at each of these frames (video times): the sentences of the events it narrates."""
    for time_s in frames_s:
        said = [e.text for e in events if abs(ceil_frame(e.time_s, fps) / fps - time_s) < FRAME_EPS]
        builder.note(time_s, " ".join(said))


def with_article(name: str) -> str:
    """"orange star" → "an orange star", "red circle" → "a red circle"."""
    return f"{'an' if name[:1].lower() in 'aeiou' else 'a'} {name}"


def _count(n: int) -> str:
    word = _NUMBERS[n] if n < len(_NUMBERS) else str(n)
    return "There is one object." if n == 1 else f"There are {word} objects."


def centres_at(events: list[Event], time_s: float) -> dict[Any, tuple[float, float]]:
    """Where each object on screen is at `time_s` ([x, y], fractions of the frame side), from the events'
    "center" (where the object is at its event) and "moving" (whether it moves after it): a still object stays
    at its last event's centre; a moving one is between its last and next events' centres, linearly (the world
    moves an object at one speed in one direction between events); with no next event it goes on at the
    video's speed (measured on its other movements) in its direction, and an object hit by another stops
    there. Objects whose events give no centre are left out."""
    tracks: dict[Any, list[Event]] = {}
    stops: dict[Any, list[float]] = {}  # collisions stop the object hit, whose own events do not say so
    for event in events:
        if isinstance(event.raw.get("center"), list):
            tracks.setdefault(event.oid, []).append(event)
        other = event.raw.get("other")
        if event.kind == "collide" and isinstance(other, dict):
            stops.setdefault(other.get("id"), []).append(event.time_s)
    speeds = []  # frame sides per second, from every movement that ends in a later event
    for track in tracks.values():
        for before, after in zip(track, track[1:], strict=False):
            if before.raw.get("moving") and after.time_s > before.time_s:
                (x0, y0), (x1, y1) = before.raw["center"], after.raw["center"]
                speeds.append(math.hypot(x1 - x0, y1 - y0) / (after.time_s - before.time_s))
    speed = sorted(speeds)[len(speeds) // 2] if speeds else 0.0
    centres = {}
    for oid in state_at(events, time_s):
        track = tracks.get(oid, [])
        past = [e for e in track if e.time_s <= time_s + FRAME_EPS]
        if not past:
            continue
        last, later = past[-1], track[len(past):]
        x, y = last.raw["center"]
        if last.raw.get("moving"):
            hit = [t for t in stops.get(oid, []) if last.time_s < t <= time_s + FRAME_EPS]
            until = min([time_s, *hit])
            if later and later[0].time_s > last.time_s and not hit:
                share = (until - last.time_s) / (later[0].time_s - last.time_s)
                x, y = x + share * (later[0].raw["center"][0] - x), y + share * (later[0].raw["center"][1] - y)
            elif last.raw.get("direction") in _DIRECTION_VECTORS:
                dx, dy = _DIRECTION_VECTORS[last.raw["direction"]]
                x, y = x + dx * speed * (until - last.time_s), y + dy * speed * (until - last.time_s)
        centres[oid] = (float(x), float(y))
    return centres


def reading_order(centres: dict[Any, tuple[float, float]]) -> list[Any]:
    """Object ids as a reader meets them: by third of the frame from the top (the 3x3 grid's rows), then
    from left to right."""
    return sorted(centres, key=lambda oid: (min(2, max(0, int(centres[oid][1] * 3))), centres[oid][0]))


def describe_scene(objects: dict[Any, ObjState], order: list[Any] | None = None,
                   centres: dict[Any, tuple[float, float]] | None = None) -> str:
    """The objects on screen: "A small red circle and a large blue square.". In `order` (object ids, e.g.
    `reading_order`, which one frame shows) where it names every object; otherwise in order of appearance.
    With `centres` (object id → [x, y], fractions of the frame), each object with a centre is placed in the
    world's words: "A small red circle on the left and a large blue square at the top right."."""
    if order is not None and len(order) == len(objects) and set(order) == set(objects):
        objects = {oid: objects[oid] for oid in order}
    names = [with_article(" ".join(part for part in (o.size, o.color, o.shape) if part)) for o in objects.values()]
    if centres is not None:
        from livevlm.world import position_phrase, position_word  # the world's own place words (it imports av)

        names = [f"{name} {position_phrase(position_word(*centres[oid]))}" if oid in centres else name
                 for oid, name in zip(objects, names, strict=True)]
    if not names:
        return "Nothing, the screen is empty."
    listed = names[0] if len(names) == 1 else f"{', '.join(names[:-1])} and {names[-1]}"
    return sentence(listed) + "."


def scene_frames(video: WorldVideo, fps: float, count: int, rng: random.Random, places: bool = False
                 ) -> list[Dialogue]:
    """`count` single-frame clips at distinct random frames, each "What is on the screen?" answered from
    the objects after every event at or before that frame's time; with `places`, each object's place too."""
    n_frames = count_frames(0.0, video.duration_s, fps)
    clips = []
    for k, frame in enumerate(sorted(rng.sample(range(n_frames), min(count, n_frames)))):
        time_s = frame / fps
        builder = StreamBuilder(fps, time_s, time_s + 1 / fps)
        centres = centres_at(video.events, time_s)
        answer = describe_scene(state_at(video.events, time_s), reading_order(centres), centres if places else None)
        builder.ask(time_s, SCENE_QUESTION, answer)
        clips.append(video.dialogue(f"scene-{k}", builder, "scene"))
    return clips


def change_frames(video: WorldVideo, fps: float) -> list[Dialogue]:
    """One two-frame clip per turn of the video's narration (but at the first frame, which has no frame
    before): the frame before and the turn's frame, "What just changed?" asked at the second and answered with
    the turn's sentences: what narration says there, and where."""
    narrated = narration(video, fps, random.Random(0))  # its prompt and acknowledgement are not used
    frames = [(narrated.frame_index(turn.time_s), turn.text) for turn in narrated.turns if turn.role == "assistant"]
    clips = []
    for k, (frame, text) in enumerate((frame, text) for frame, text in frames if frame >= 1):
        builder = StreamBuilder(fps, (frame - 1) / fps, (frame + 1) / fps)
        builder.ask(frame / fps, CHANGE_QUESTION, text)
        clips.append(video.dialogue(f"change-{k}", builder, "change"))
    return clips


def question_options(events: list[Event], time_s: float) -> dict[str, list[tuple[str, str]]]:
    """Every (question, answer) computable from the events up to `time_s`, by tense: past, present, ongoing."""
    seen = [e for e in events if e.time_s <= time_s + FRAME_EPS]
    objects = state_at(events, time_s)
    latest = [e.text for e in seen if e.time_s == seen[-1].time_s]
    appeared = [e for e in seen if e.kind == "appear"]
    options: dict[str, list[tuple[str, str]]] = {
        "past": [("What just happened?", " ".join(latest) if latest else "Nothing has happened yet."),
                 ("What appeared last?", sentence(with_article(f"{appeared[-1].obj.get('color')} "
                                                               f"{appeared[-1].obj.get('shape')}")) + "."
                  if appeared else "Nothing has appeared yet.")],
        "present": [("How many objects are there?", _count(len(objects)))],
        "ongoing": []}
    for state in objects.values():
        if sum(o.shape == state.shape for o in objects.values()) == 1 and state.color:
            options["present"].append((f"What colour is the {state.shape}?", f"It is {state.color}."))
        if sum(o.name == state.name for o in objects.values()) != 1:
            continue
        if state.size:
            options["present"].append((f"How big is the {state.name}?", f"It is {state.size}."))
        phrase = MOVE_PHRASES.get(state.direction or "", state.direction or "")
        doing = ("It is standing still." if state.direction is None
                 else f"It is moving {phrase}." if phrase else "It is moving.")
        options["ongoing"].append((f"What is the {state.name} doing?", doing))
    return options


QUESTION_TENSES = ("past", "present", "ongoing")


def question_tenses(spec: str) -> tuple[str, ...]:
    """`--question-tenses` ("past,present") → the tenses, checked against QUESTION_TENSES."""
    tenses = tuple(t.strip() for t in spec.split(",") if t.strip())
    unknown = [t for t in tenses if t not in QUESTION_TENSES]
    if unknown or not tenses:
        raise AnnotationError(f"--question-tenses {spec!r}: give one or more of {', '.join(QUESTION_TENSES)}, "
                              "comma-separated")
    return tenses


def questions(video: WorldVideo, fps: float, count: int, rng: random.Random, suffix: str = "questions",
              tenses: tuple[str, ...] = QUESTION_TENSES) -> Dialogue | None:
    """One dialogue `{stem}-{suffix}` of `count` questions at distinct random frames (a random tense of
    `tenses`, then a random question of it; a frame with no question of those tenses is passed over), or None
    when count is 0 or no frame has one."""
    n_frames = count_frames(0.0, video.duration_s, fps)
    if count <= 0 or n_frames == 0:
        return None
    builder = StreamBuilder(fps, 0.0, video.duration_s)
    asked = 0
    for frame in sorted(rng.sample(range(n_frames), min(count, n_frames))):
        options = question_options(video.events, frame / fps)
        open_tenses = [t for t, items in options.items() if items and t in tenses]
        if not open_tenses:
            continue
        question, answer = rng.choice(options[rng.choice(open_tenses)])
        builder.ask(frame / fps, question, answer)
        asked += 1
    return video.dialogue(suffix, builder, "questions") if asked else None


# ---------------------------------------------------------------------------------------------------


def parse_world(args: ConvertOptions) -> list[WorldVideo]:
    """The videos of an annotations.jsonl, video paths rebased onto the output folder."""
    source = Path(args.input)
    paths = VideoPaths.from_args(args, check_with_root=False)
    videos, stems = [], set()
    for number, record in read_jsonl(source):
        where = f"{source} line {number}"
        hint = "each line needs video, duration_s, events"
        video = rebase(require(record, "video", where, str, hint), source.parent, paths.out_dir)
        duration = float(require(record, "duration_s", where, NUMBER, hint))
        events = parse_events(require(record, "events", where, list, hint), where)
        if not paths.exists(video, f"line {number}"):
            continue
        stem = Path(video).stem if Path(video).stem not in stems else f"{Path(video).stem}-{number}"
        stems.add(stem)
        videos.append(WorldVideo(stem, video, duration, events, note_every_event=args.event_notes))
    return videos


def convert_world(args: ConvertOptions) -> list[Dialogue]:
    """annotations.jsonl (`args.input`) → narration, reminder and question dialogues per video."""
    tenses = question_tenses(args.question_tenses)
    dialogues: list[Dialogue] = []
    for video in parse_world(args):
        rng = random.Random(f"{args.seed}:world:{video.stem}")
        dialogues.append(narration(video, args.fps, rng))
        dialogues.extend(reminders(video, args.fps, args.reminders, rng,
                                   notes=args.reminder_notes or args.event_notes))
        asked = questions(video, args.fps, args.questions, rng, tenses=tenses)
        if asked is not None:
            dialogues.append(asked)
    return dialogues


def convert_world_reminders(args: ConvertOptions) -> list[Dialogue]:
    """annotations.jsonl (`args.input`) → up to `args.reminders` short reminder clips per video."""
    dialogues: list[Dialogue] = []
    for video in parse_world(args):
        rng = random.Random(f"{args.seed}:world-reminders:{video.stem}")
        dialogues.extend(reminders(video, args.fps, args.reminders, rng,
                                   clip=(REMINDER_CLIP_LEAD_S, REMINDER_CLIP_TAIL_S),
                                   distractors=args.reminder_distractors, pairs=args.reminder_pairs,
                                   notes=args.reminder_notes or args.event_notes))
    return dialogues


def convert_world_narration(args: ConvertOptions) -> list[Dialogue]:
    """annotations.jsonl (`args.input`) → up to `args.narration_clips` short narration clips per video."""
    if args.narration_clips <= 0:
        raise AnnotationError(f"--narration-clips {args.narration_clips}: world-narration needs at least one "
                              "clip per video")
    dialogues: list[Dialogue] = []
    for video in parse_world(args):
        rng = random.Random(f"{args.seed}:world-narration:{video.stem}")
        dialogues.extend(narration_clips(video, args.fps, args.narration_clips, rng))
    return dialogues


def convert_world_questions(args: ConvertOptions) -> list[Dialogue]:
    """annotations.jsonl (`args.input`) → `args.question_dialogues` question dialogues per video, each of
    `args.questions` questions at its own random frames."""
    if args.questions <= 0 or args.question_dialogues <= 0:
        raise AnnotationError(f"--questions {args.questions} --question-dialogues {args.question_dialogues}: "
                              "world-questions needs at least one of each")
    tenses = question_tenses(args.question_tenses)
    dialogues: list[Dialogue] = []
    for video in parse_world(args):
        for j in range(args.question_dialogues):
            rng = random.Random(f"{args.seed}:world-questions:{video.stem}:{j}")
            asked = questions(video, args.fps, args.questions, rng, suffix=f"questions-{j}", tenses=tenses)
            if asked is not None:
                dialogues.append(asked)
    return dialogues


def convert_world_changes(args: ConvertOptions) -> list[Dialogue]:
    """annotations.jsonl (`args.input`) → a two-frame "What just changed?" clip per narrated frame per video."""
    return [clip for video in parse_world(args) for clip in change_frames(video, args.fps)]


def convert_world_scene(args: ConvertOptions) -> list[Dialogue]:
    """annotations.jsonl (`args.input`) → `args.scene_frames` single-frame scene clips per video."""
    if args.scene_frames <= 0:
        raise AnnotationError(f"--scene-frames {args.scene_frames}: world-scene needs at least one frame per video")
    dialogues: list[Dialogue] = []
    for video in parse_world(args):
        rng = random.Random(f"{args.seed}:world-scene:{video.stem}")
        dialogues.extend(scene_frames(video, args.fps, args.scene_frames, rng, places=args.scene_places))
    return dialogues
