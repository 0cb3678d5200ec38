"""The synthetic video world: procedural scenes rendered to H.264 MP4 with an exact event timeline.

Coloured shapes appear, start moving, stop, change colour, grow or shrink, bump into each other and
leave. A simulation on the native frame grid (`video_fps`) decides what happens; every change is
recorded as an event at the time of the first frame that shows it, with a structured description and an
English sentence ("A small red circle appears on the left."). Frames are drawn and streamed to the
encoder one at a time, so any duration (seconds for tests, an hour for benchmarks) runs in constant
memory. Everything is deterministic from the seed: the annotations are byte-identical, and so are the
videos for a given PyAV/x264 build.

Events are made to be learnable from frames sampled at 2 fps by a frozen image encoder: objects are big
and saturated, each object (colour + shape) is unique on screen so sentences are unambiguous, scheduled
events are at least `min_gap` seconds apart, and no object changes twice within `min_gap` seconds.

An event: {"time_s", "frame" (native index), "kind" (one of EVENT_KINDS), "text", "object" {"id", "shape",
"color", "size"} (as it was referred to: before a colour or size change), "position" ("top left", "centre",
…), "center" [x, y] (fractions of the frame side), "moving" (after the event), and per kind: "direction"
(move; leave by exit), "new_color" (color), "new_size" + "change" grow|shrink (size), "other" (collide:
the object hit; both stop), "how" exit|vanish (leave)}. Steps: {"start_s", "end_s", "text"} for each
object's presence (appear → leave or end) and each movement (move → stop, collide, leave or end).
An event in the last half second of a video may fall after its last 2 fps frame.
"""

from __future__ import annotations

import json
import logging
import math
import multiprocessing
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import av
import numpy as np
from PIL import Image, ImageDraw

from livevlm.files import atomic_path, write_text_atomically

logger = logging.getLogger(__name__)

SHAPES = ("circle", "square", "triangle", "star")
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (225, 35, 35),
    "green": (40, 195, 60),
    "blue": (40, 90, 235),
    "yellow": (240, 220, 30),
    "purple": (155, 55, 210),
    "orange": (250, 135, 20),
}
SIZES = {"small": 0.16, "large": 0.28}  # side of the bounding square, as a fraction of the frame's short side
DIRECTIONS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
EVENT_KINDS = ("appear", "move", "stop", "color", "size", "collide", "leave")
BACKGROUND = 60  # grey level: dark enough that every colour stands out, light enough to see yellow vs white
SAMPLE_FPS = 2  # the dialogue sampling rate written to the annotations ("fps")


# ---------------------------------------------------------------------------------------------------
# the spec of one video


@dataclass(frozen=True)
class WorldSpec:
    """Everything that determines one synthetic video. Same spec → same events (and the same video).

    Attributes:
        seed, index: the random stream is seeded with (seed, index), so video i of a set is independent
            of how many videos the set has.
        duration: seconds; rounded to the native frame grid.
        size: side of the square frame in pixels (even, for yuv420p).
        video_fps: native frame rate of the rendered video; event times lie on its grid.
        density: scheduled events per minute (appear/move/stop/colour/size/vanish), at most one per
            `min_gap`; collisions, exits and planned stops come on top, from the motion.
        max_objects: the most objects on screen at once.
        speed: moving speed in frame widths per second.
        min_gap: seconds between scheduled events, and between two changes of the same object.
        noise: std of per-pixel camera noise in grey levels (0 = clean).
        flicker: relative brightness jitter per frame (0 = none; 0.1 = ±10 %).
        texture: draw a low-contrast textured background (a distractor) instead of a flat one.
    """

    seed: int = 0
    index: int = 0
    duration: float = 30.0
    size: int = 256
    video_fps: int = 10
    density: float = 12.0
    max_objects: int = 4
    speed: float = 0.15
    min_gap: float = 1.0
    noise: float = 0.0
    flicker: float = 0.0
    texture: bool = False

    def __post_init__(self) -> None:
        checks = {
            "duration": self.duration * self.video_fps >= 1,
            "size": self.size >= 64 and self.size % 2 == 0,
            "video_fps": self.video_fps >= SAMPLE_FPS,
            "density": self.density >= 0,
            "max_objects": 1 <= self.max_objects <= len(SHAPES) * len(COLORS),
            "speed": self.speed > 0,
            "min_gap": self.min_gap >= 0,
            "noise": self.noise >= 0,
            "flicker": 0 <= self.flicker < 1,
        }
        remedy = {
            "duration": "at least one native frame", "size": "an even number >= 64",
            "video_fps": f"an integer >= {SAMPLE_FPS}", "density": ">= 0 events per minute",
            "max_objects": f"1..{len(SHAPES) * len(COLORS)}", "speed": "> 0 frame widths per second",
            "min_gap": ">= 0 seconds", "noise": ">= 0 grey levels", "flicker": "in [0, 1)",
        }
        for name, ok in checks.items():
            if not ok:
                raise ValueError(f"world: {name}={getattr(self, name)!r} is invalid; use {remedy[name]}")

    @property
    def frames(self) -> int:
        return max(1, round(self.duration * self.video_fps))


# ---------------------------------------------------------------------------------------------------
# words


def position_word(x: float, y: float) -> str:
    """Name the ninth of the frame holding normalised point (x, y): "top left", "left", "centre", …"""
    horizontal = "left" if x < 1 / 3 else "right" if x > 2 / 3 else "centre"
    vertical = "top" if y < 1 / 3 else "bottom" if y > 2 / 3 else "middle"
    if vertical == "middle":
        return horizontal
    return vertical if horizontal == "centre" else f"{vertical} {horizontal}"


def position_phrase(word: str) -> str:
    """"left" → "on the left", "centre" → "in the centre", "top right" → "at the top right"."""
    if word == "centre":
        return "in the centre"
    if word in ("left", "right"):
        return f"on the {word}"
    return f"at the {word}"


_MOVE_PHRASE = {"left": "to the left", "right": "to the right", "up": "up", "down": "down"}
_EXIT_PHRASE = {"left": "on the left", "right": "on the right", "up": "at the top", "down": "at the bottom"}


# ---------------------------------------------------------------------------------------------------
# simulation


@dataclass
class _Obj:
    id: int
    shape: str
    color: str
    size: str
    x: float  # centre, pixels
    y: float
    direction: str | None = None  # None while still
    last_change: int = 0  # frame of the object's last event
    stop_at: int | None = None  # frame of a planned stop while moving

    def side(self, frame_side: int) -> float:
        return SIZES[self.size] * frame_side

    def box(self, frame_side: int, x: float | None = None, y: float | None = None) -> tuple[float, ...]:
        half = self.side(frame_side) / 2
        cx, cy = self.x if x is None else x, self.y if y is None else y
        return cx - half, cy - half, cx + half, cy + half

    def name(self) -> str:
        return f"{self.color} {self.shape}"

    def describe(self) -> dict[str, Any]:
        return {"id": self.id, "shape": self.shape, "color": self.color, "size": self.size}


def _overlap(a: tuple[float, ...], b: tuple[float, ...], margin: float = 0.0) -> bool:
    return a[0] < b[2] + margin and b[0] < a[2] + margin and a[1] < b[3] + margin and b[1] < a[3] + margin


class _World:
    """The simulation: `step(k)` advances to native frame k and returns the events first visible at k."""

    def __init__(self, spec: WorldSpec) -> None:
        self.spec = spec
        self.rng = np.random.default_rng([spec.seed, spec.index, 0])
        self.objects: list[_Obj] = []
        self.next_id = 0
        self.last_event = -10**9
        self.side = spec.size
        self.step_px = spec.speed * spec.size / spec.video_fps  # pixels per frame
        self.gap = round(spec.min_gap * spec.video_fps)  # frames
        self.events: list[dict[str, Any]] = []
        self.steps: list[dict[str, Any]] = []
        self._open_presence: dict[int, tuple[int, str]] = {}
        self._open_move: dict[int, tuple[int, str]] = {}

    # -- per frame --------------------------------------------------------------------------------------

    def step(self, k: int) -> list[dict[str, Any]]:
        events: list[dict[str, Any]] = []
        if k == 0:
            for _ in range(1 + int(self.rng.integers(0, 2))):
                events += self._appear(k)
        else:
            events += self._planned_stops(k)
            if self._may_schedule(k):
                events += self._scheduled(k)
        self._move_all()
        events += self._exits(k) + self._collisions(k)
        if events:
            self.last_event = k  # the next scheduled event comes at least min_gap after any event
        for event in events:
            self._track_steps(event)
        self.events += events
        return events

    def _may_schedule(self, k: int) -> bool:
        if k - self.last_event < self.gap or k > self.spec.frames - self.gap:
            return False
        # Waiting min_gap then a geometric wait of mean (interval - min_gap) gives `density` per minute.
        wait = 60 / self.spec.density - self.spec.min_gap if self.spec.density > 0 else math.inf
        return bool(self.rng.random() < 1 / max(wait * self.spec.video_fps, 1))

    def _scheduled(self, k: int) -> list[dict[str, Any]]:
        # A moving object half out of view is on its way out: it changes no more.
        free = [o for o in self.objects if k - o.last_change >= self.gap
                and (o.direction is None or self._inside(o)) and not self._threatened(o)]
        still = [o for o in free if o.direction is None]
        moving = [o for o in free if o.direction is not None]
        n = len(self.objects)
        options = {
            "appear": (3.0 if n < 2 else 1.5) if n < self.spec.max_objects else 0.0,
            "move": 2.5 if still else 0.0,
            "stop": 1.5 if moving else 0.0,
            "color": 1.0 if free else 0.0,
            "size": 1.0 if free else 0.0,
            "vanish": (0.7 if n > 1 else 0.2) if free else 0.0,
        }
        kinds = [kind for kind, w in options.items() if w > 0]
        if not kinds:
            return []
        weights = np.array([options[kind] for kind in kinds])
        kind = kinds[int(self.rng.choice(len(kinds), p=weights / weights.sum()))]
        handlers = {"appear": lambda: self._appear(k), "move": lambda: self._start_move(k, still),
                    "stop": lambda: self._stop(k, moving), "color": lambda: self._recolor(k, free),
                    "size": lambda: self._resize(k, free), "vanish": lambda: self._vanish(k, free)}
        return handlers[kind]()

    def _planned_stops(self, k: int) -> list[dict[str, Any]]:
        # An object partly out of the frame keeps going (it will exit) rather than stop half visible.
        due = [o for o in self.objects if o.direction is not None and o.stop_at == k and self._inside(o)]
        for obj in [o for o in due if k - o.last_change < self.gap]:  # changed recently: stop a bit later
            obj.stop_at = obj.last_change + self.gap
        return [event for obj in due if obj.stop_at == k for event in self._stop(k, [obj])]

    def _pick(self, objs: list[_Obj]) -> _Obj:
        return objs[int(self.rng.integers(0, len(objs)))]

    # -- scheduled changes -------------------------------------------------------------------------------

    def _appear(self, k: int) -> list[dict[str, Any]]:
        used = {(o.color, o.shape) for o in self.objects}
        identities = [(c, s) for c in COLORS for s in SHAPES if (c, s) not in used]
        color, shape = identities[int(self.rng.integers(0, len(identities)))]
        size = "small" if self.rng.random() < 0.5 else "large"
        half = SIZES[size] * self.side / 2
        lo, hi = half + 0.03 * self.side, self.side - half - 0.03 * self.side
        for _ in range(30):
            x, y = (float(v) for v in self.rng.uniform(lo, hi, size=2))
            obj = _Obj(self.next_id, shape, color, size, x, y, last_change=k)
            margin = 0.06 * self.side  # more than a frame's motion: the spot was empty the frame before too
            if not any(_overlap(obj.box(self.side), o.box(self.side), margin) for o in self.objects):
                break
        else:
            return []
        self.next_id += 1
        self.objects.append(obj)
        word = self._where(obj)
        text = f"A {size} {color} {shape} appears {position_phrase(word)}."
        return [self._event(k, "appear", obj, text)]

    def _start_move(self, k: int, still: list[_Obj]) -> list[dict[str, Any]]:
        obj = self._pick(still)
        clear = [d for d in DIRECTIONS if self._path_clear(obj, d)]
        if not clear:
            return []
        towards = [d for d in clear if self._heads_for_other(obj, d)]
        pool = towards if towards and self.rng.random() < 0.5 else clear
        direction = pool[int(self.rng.integers(0, len(pool)))]
        obj.direction, obj.last_change = direction, k
        if self.rng.random() < 0.6:  # most moves end in a stop; the others run into something or out
            obj.stop_at = k + int(self.rng.integers(round(1.5 * self.gap), 4 * self.spec.video_fps + 1))
        text = f"The {obj.name()} starts moving {_MOVE_PHRASE[direction]}."
        return [self._event(k, "move", obj, text, direction=direction)]

    def _stop(self, k: int, moving: list[_Obj]) -> list[dict[str, Any]]:
        obj = self._pick(moving)
        obj.direction, obj.stop_at, obj.last_change = None, None, k
        word = self._where(obj)
        return [self._event(k, "stop", obj, f"The {obj.name()} stops {position_phrase(word)}.")]

    def _recolor(self, k: int, free: list[_Obj]) -> list[dict[str, Any]]:
        obj = self._pick(free)
        used = {(o.color, o.shape) for o in self.objects}
        colors = [c for c in COLORS if (c, obj.shape) not in used]
        if not colors:
            return []
        new = colors[int(self.rng.integers(0, len(colors)))]
        event = self._event(k, "color", obj, f"The {obj.name()} turns {new}.", new_color=new)
        obj.color, obj.last_change = new, k
        return [event]

    def _resize(self, k: int, free: list[_Obj]) -> list[dict[str, Any]]:
        obj = self._pick(free)
        new = "large" if obj.size == "small" else "small"
        if new == "large":  # grow only where the larger object fits: in the frame, clear of the others
            grown = _Obj(obj.id, obj.shape, obj.color, new, obj.x, obj.y)
            if not self._inside(grown) or any(_overlap(grown.box(self.side), o.box(self.side), 0.02 * self.side)
                                              for o in self.objects if o is not obj):
                return []
        change = "grow" if new == "large" else "shrink"
        text = f"The {obj.name()} {'grows' if change == 'grow' else 'shrinks'}."
        event = self._event(k, "size", obj, text, new_size=new, change=change)
        obj.size, obj.last_change = new, k
        return [event]

    def _vanish(self, k: int, free: list[_Obj]) -> list[dict[str, Any]]:
        obj = self._pick(free)
        self.objects.remove(obj)
        word = self._where(obj)
        return [self._event(k, "leave", obj, f"The {obj.name()} vanishes {position_phrase(word)}.",
                            how="vanish")]

    # -- motion and what it causes ----------------------------------------------------------------------

    def _move_all(self) -> None:
        for obj in self.objects:
            if obj.direction is not None:
                dx, dy = DIRECTIONS[obj.direction]
                obj.x += dx * self.step_px
                obj.y += dy * self.step_px

    def _exits(self, k: int) -> list[dict[str, Any]]:
        events = []
        for obj in list(self.objects):
            x0, y0, x1, y1 = obj.box(self.side)
            if obj.direction is not None and (x1 <= 0 or y1 <= 0 or x0 >= self.side or y0 >= self.side):
                self.objects.remove(obj)
                text = f"The {obj.name()} leaves the frame {_EXIT_PHRASE[obj.direction]}."
                events.append(self._event(k, "leave", obj, text, how="exit", direction=obj.direction))
        return events

    def _collisions(self, k: int) -> list[dict[str, Any]]:
        """A moving object that would reach another within its next step closes the gap and stops.

        Closing the gap in this frame (instead of stopping one step short or overlapping) makes the
        frame of the event the first that shows the two touching, after a visible last step.
        """
        events = []
        for obj in self.objects:
            if obj.direction is None:
                continue
            for other in self.objects:
                gap = self._gap_ahead(obj, other) if other is not obj else None
                if gap is None or gap >= self.step_px:
                    continue
                dx, dy = DIRECTIONS[obj.direction]
                close = max(gap, -self.step_px)  # overlap caused by the other's motion: back off a step at most
                obj.x += dx * close
                obj.y += dy * close
                obj.direction = other.direction = None
                obj.stop_at = other.stop_at = None
                obj.last_change = other.last_change = k
                text = f"The {obj.name()} bumps into the {other.name()}."
                events.append(self._event(k, "collide", obj, text, other=other.describe()))
                break
        return events

    def _gap_ahead(self, obj: _Obj, other: _Obj) -> float | None:
        """Distance from `obj` to `other` along obj's direction, if `other` is squarely ahead; else None."""
        dx, dy = DIRECTIONS[obj.direction or "left"]
        a, b = obj.box(self.side), other.box(self.side)
        if dx:
            lateral = a[1] < b[3] and b[1] < a[3]
            gap = b[0] - a[2] if dx > 0 else a[0] - b[2]
        else:
            lateral = a[0] < b[2] and b[0] < a[2]
            gap = b[1] - a[3] if dy > 0 else a[1] - b[3]
        ahead = (other.x - obj.x) * dx + (other.y - obj.y) * dy > 0
        reach = (obj.side(self.side) + other.side(self.side)) / 2
        return gap if lateral and ahead and gap > -reach else None

    def _threatened(self, obj: _Obj) -> bool:
        """True if `obj` will collide or exit within min_gap: a change now would blur into that event."""
        horizon = self.step_px * (self.gap + 1)
        for other in self.objects:
            if other is obj:
                continue
            for mover, target in ((obj, other), (other, obj)):
                if mover.direction is not None:
                    gap = self._gap_ahead(mover, target)
                    if gap is not None and gap < horizon:
                        return True
        return obj.direction is not None and not self._path_clear(obj, obj.direction)

    def _inside(self, obj: _Obj) -> bool:
        x0, y0, x1, y1 = obj.box(self.side)
        return x0 >= 0 and y0 >= 0 and x1 <= self.side and y1 <= self.side

    def _path_clear(self, obj: _Obj, direction: str) -> bool:
        """True if moving `obj` in `direction` for min_gap (+1 frame) neither collides nor exits."""
        dx, dy = DIRECTIONS[direction]
        for m in range(1, self.gap + 2):
            x, y = obj.x + dx * self.step_px * m, obj.y + dy * self.step_px * m
            x0, y0, x1, y1 = obj.box(self.side, x, y)
            if x1 <= 0 or y1 <= 0 or x0 >= self.side or y0 >= self.side:
                return False
            if any(_overlap((x0, y0, x1, y1), o.box(self.side)) for o in self.objects if o is not obj):
                return False
        return True

    def _heads_for_other(self, obj: _Obj, direction: str) -> bool:
        """True if another object lies ahead in `direction`, squarely enough in the way to be hit."""
        dx, dy = DIRECTIONS[direction]
        for other in self.objects:
            if other is obj:
                continue
            ahead = (other.x - obj.x) * dx + (other.y - obj.y) * dy
            lateral = abs((other.x - obj.x) * dy) + abs((other.y - obj.y) * dx)
            if ahead > 0 and lateral < 0.35 * (obj.side(self.side) + other.side(self.side)):
                return True
        return False

    # -- records ------------------------------------------------------------------------------------------

    def _where(self, obj: _Obj) -> str:
        return position_word(obj.x / self.side, obj.y / self.side)

    def _event(self, k: int, kind: str, obj: _Obj, text: str, **extra: Any) -> dict[str, Any]:
        return {"time_s": round(k / self.spec.video_fps, 6), "frame": k, "kind": kind, "text": text,
                "object": obj.describe(), "position": self._where(obj),
                "center": [round(obj.x / self.side, 4), round(obj.y / self.side, 4)],
                "moving": obj.direction is not None, **extra}

    def _track_steps(self, event: dict[str, Any]) -> None:
        obj, k, kind = event["object"], event["frame"], event["kind"]
        oid = obj["id"]
        if kind == "appear":
            article = "An" if obj["color"][0] in "aeiou" else "A"
            self._open_presence[oid] = (k, f"{article} {obj['color']} {obj['shape']} is in view.")
        elif kind == "move":
            phrase = _MOVE_PHRASE[event["direction"]]
            self._open_move[oid] = (k, f"The {obj['color']} {obj['shape']} moves {phrase}.")
        if kind in ("stop", "leave", "collide"):
            self._close(self._open_move, oid, k)
        if kind == "collide":
            self._close(self._open_move, event["other"]["id"], k)
        if kind == "leave":
            self._close(self._open_presence, oid, k)

    def _close(self, open_steps: dict[int, tuple[int, str]], oid: int, k: int) -> None:
        if oid in open_steps:
            start, text = open_steps.pop(oid)
            fps = self.spec.video_fps
            self.steps.append({"start_s": round(start / fps, 6), "end_s": round(k / fps, 6), "text": text})

    def finish(self) -> None:
        """Close the segments still open at the end of the video."""
        for open_steps in (self._open_move, self._open_presence):
            for oid in sorted(open_steps):
                self._close(open_steps, oid, self.spec.frames)
        self.steps.sort(key=lambda s: (s["start_s"], s["end_s"], s["text"]))


# ---------------------------------------------------------------------------------------------------
# rendering


def _shape_points(shape: str, box: tuple[float, ...]) -> list[tuple[float, float]]:
    x0, y0, x1, y1 = box
    cx, cy, r = (x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) / 2
    if shape == "triangle":
        return [(cx, y0), (x1, y1), (x0, y1)]
    # star: five outer points alternating with inner points at half the radius
    return [(cx + rr * math.sin(math.pi * i / 5), cy - rr * math.cos(math.pi * i / 5))
            for i, rr in ((i, r if i % 2 == 0 else 0.5 * r) for i in range(10))]


def _draw(image: Image.Image, objects: list[_Obj], side: int) -> None:
    draw = ImageDraw.Draw(image)
    for obj in objects:
        box = obj.box(side)
        color = COLORS[obj.color]
        if obj.shape == "circle":
            draw.ellipse(box, fill=color)
        elif obj.shape == "square":
            draw.rectangle(box, fill=color)
        else:
            draw.polygon(_shape_points(obj.shape, box), fill=color)


class _Painter:
    """Turns the world state into RGB frames: background, shapes, then camera noise and flicker."""

    def __init__(self, spec: WorldSpec) -> None:
        self.spec = spec
        # A stream separate from the simulation's, so render options never change the events.
        self.rng = np.random.default_rng([spec.seed, spec.index, 1])
        self.background = self._background()
        self.noise_bank = [self.rng.normal(0, spec.noise, (spec.size, spec.size, 3)).astype(np.int16)
                           for _ in range(8)] if spec.noise > 0 else []
        self._last_key: tuple[Any, ...] | None = None
        self._last_frame: np.ndarray | None = None

    def _background(self) -> np.ndarray:
        side = self.spec.size
        flat = np.full((side, side, 3), BACKGROUND, dtype=np.uint8)
        if not self.spec.texture:
            return flat
        coarse = self.rng.uniform(-28, 28, (8, 8)).astype(np.float32)
        smooth = np.asarray(Image.fromarray(coarse, mode="F").resize((side, side), Image.Resampling.BICUBIC))
        fine = self.rng.uniform(-8, 8, (side, side)).astype(np.float32)
        grey = np.clip(BACKGROUND + smooth + fine, 0, 255).astype(np.uint8)
        return np.repeat(grey[:, :, None], 3, axis=2)

    def frame(self, objects: list[_Obj]) -> np.ndarray:
        """[size, size, 3] uint8 RGB picture of `objects`."""
        key = tuple((o.shape, o.color, o.size, round(o.x, 3), round(o.y, 3)) for o in objects)
        if key != self._last_key or self._last_frame is None:
            image = Image.fromarray(self.background)
            _draw(image, objects, self.spec.size)
            self._last_key, self._last_frame = key, np.asarray(image)
        frame = self._last_frame
        if not self.noise_bank and self.spec.flicker == 0:
            return frame
        out = frame.astype(np.int16)
        if self.spec.flicker > 0:
            out = (out * (1 + self.spec.flicker * self.rng.uniform(-1, 1))).astype(np.int16)
        if self.noise_bank:
            out += self.noise_bank[int(self.rng.integers(0, len(self.noise_bank)))]
        return np.clip(out, 0, 255).astype(np.uint8)


def _annotation(spec: WorldSpec, world: _World) -> dict[str, Any]:
    return {"duration_s": round(spec.frames / spec.video_fps, 6), "fps": SAMPLE_FPS,
            "video_fps": spec.video_fps, "width": spec.size, "height": spec.size,
            "seed": spec.seed, "index": spec.index, "events": world.events, "steps": world.steps}


def plan_video(spec: WorldSpec) -> dict[str, Any]:
    """The annotation of the video `spec` describes, without rendering it (fast: no pixels).

    Returns:
        {"duration_s", "fps" (dialogue sampling rate, 2), "video_fps", "width", "height", "seed",
         "index", "events": [...], "steps": [...]} — identical to what `render_video` returns.
    """
    world = _World(spec)
    for k in range(spec.frames):
        world.step(k)
    world.finish()
    return _annotation(spec, world)


def render_video(spec: WorldSpec, path: str | Path, *, preset: str = "veryfast", crf: int = 20
                 ) -> dict[str, Any]:
    """Render the video `spec` describes to an H.264 MP4 at `path`; return its annotation.

    Frames are drawn and encoded one at a time (constant memory for any duration). The file is written
    under a temporary name and renamed when complete, so a killed run never leaves a half file at
    `path`; `movflags=faststart` puts the index first, so even a truncated copy stays decodable up to
    the cut.

    Returns:
        the same dict as `plan_video(spec)`.
    Raises:
        OSError: if `path` cannot be written.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    world = _World(spec)
    painter = _Painter(spec)
    with atomic_path(path) as tmp:
        container = av.open(str(tmp), "w", format="mp4", options={"movflags": "+faststart"})
        try:
            stream = container.add_stream("libx264", rate=spec.video_fps, options={
                "preset": preset, "crf": str(crf), "g": str(5 * spec.video_fps), "threads": "2"})
            stream.width = stream.height = spec.size
            stream.pix_fmt = "yuv420p"
            for k in range(spec.frames):
                world.step(k)
                frame = av.VideoFrame.from_ndarray(painter.frame(world.objects), format="rgb24")
                frame.pts = k
                container.mux(stream.encode(frame))
            container.mux(stream.encode(None))
        finally:
            container.close()
    world.finish()
    return _annotation(spec, world)


# ---------------------------------------------------------------------------------------------------
# a set of videos and the command


def _render_job(job: tuple[WorldSpec, Path, str]) -> dict[str, Any]:
    """Render one video of a set (a top-level function, so worker processes can run it)."""
    spec, out, relative = job
    start = time.perf_counter()
    record = render_video(spec, out / relative)
    logger.info("rendered %s (%.0f s of video, %d events) in %.1f s", relative, record["duration_s"],
                len(record["events"]), time.perf_counter() - start)
    return record


def generate_world(out_dir: str | Path, videos: int = 10, seed: int = 0, duration: float = 30.0,
                   workers: int = 1, **options: Any) -> Path:
    """Render `videos` videos into OUT/videos/000.mp4 … and write OUT/annotations.jsonl.

    Args:
        out_dir: output folder (created).
        videos, seed, duration: how many, the set's seed, seconds each.
        workers: processes rendering at once. Video i depends only on (seed, i), so any number of
            workers writes the same files and the same annotations, in index order.
        options: other `WorldSpec` fields (size, video_fps, density, noise, flicker, texture, …).
    Returns:
        the annotations path. Each line: {"video": "videos/000.mp4" (relative to the file),
        "duration_s", "fps": 2, "events", "steps", …}; written atomically once all videos exist.
    Raises:
        ValueError: an invalid option (the message names it).
    """
    if videos < 1:
        raise ValueError(f"world: videos={videos} is invalid; generate at least 1 video")
    if workers < 1:
        raise ValueError(f"world: workers={workers} is invalid; use 1 or more processes")
    valid = sorted(set(WorldSpec.__dataclass_fields__) - {"seed", "index", "duration"})
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise ValueError(f"world: unknown option {unknown[0]!r}; valid options: {valid}")
    out = Path(out_dir)
    specs = [WorldSpec(seed=seed, index=i, duration=duration, **options) for i in range(videos)]
    width = max(3, len(str(videos - 1)))
    jobs = [(spec, out, f"videos/{spec.index:0{width}d}.mp4") for spec in specs]
    if workers == 1:
        records = [_render_job(job) for job in jobs]
    else:
        with ProcessPoolExecutor(min(workers, videos), mp_context=multiprocessing.get_context("spawn")) as pool:
            records = list(pool.map(_render_job, jobs))  # map keeps index order
    lines = [json.dumps({"video": relative, **record}, ensure_ascii=False)
             for (_, _, relative), record in zip(jobs, records, strict=True)]
    annotations = write_text_atomically(out / "annotations.jsonl", "\n".join(lines) + "\n")
    return annotations


def demo_video(seed: int = 7, duration: float = 30.0, cache_dir: str | Path | None = None
               ) -> tuple[Path, dict[str, Any]]:
    """A synthetic-world video for demos and examples, rendered once into the cache, and its annotation.

    Returns:
        (the MP4's path, its annotation: `events` with `time_s` and `text`, the truth to compare with).
    """
    from livevlm.backbones import default_cache_dir
    from livevlm.files import write_text_atomically

    folder = Path(cache_dir) if cache_dir is not None else default_cache_dir() / "demo"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"world-seed{seed}-{duration:g}s.mp4"
    annotation_file = path.with_suffix(".json")
    if path.is_file() and annotation_file.is_file():
        return path, json.loads(annotation_file.read_text())
    annotation = render_video(WorldSpec(seed=seed, index=0, duration=duration), path)  # written atomically
    write_text_atomically(annotation_file, json.dumps(annotation))
    return path, annotation
