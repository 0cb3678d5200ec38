"""The synthetic proactive benchmark anyone can run offline: `livevlm evaluate --benchmark world`.

Held-out synthetic-world videos (`livevlm.world`, rendered once into the cache) are converted into the
project's streaming dialogues (narration, "tell me when …" reminders, questions: `data convert --from
world`) and streamed through the real engine (`free_running.evaluate_free_running`). The defaults, seed 1,
20 videos of 30 s, are the held-out set of the default model's card, never seen in training.

Besides the free-running scores, a world response can be checked for what it names: `object_words` gives
the colour and shape words of a sentence, and a matched response "names the object" when it has the shape and
colour words of one of its ground-truth turn's events (the user's complaint is "a red circle" said for a
green square, not a reworded sentence).
"""

from __future__ import annotations

import re
from pathlib import Path

from livevlm.data.converters.common import ConvertOptions
from livevlm.world import COLORS, SHAPES

HELD_OUT = {"videos": 20, "seed": 1, "duration": 30.0}  # the default model's held-out set


def object_words(text: str) -> set[str]:
    """The world's colour and shape words in `text` (lower-case; "circles" counts as "circle")."""
    from livevlm.evaluation.free_running import words

    found = set()
    for word in words(text):
        stem = word[:-1] if word.endswith("s") and word[:-1] in SHAPES else word
        if stem in COLORS or stem in SHAPES:
            found.add(stem)
    return found


def names_object(response: str, turn: str) -> bool | None:
    """Whether `response` names the object of one of `turn`'s events (None: the turn names no object).

    A turn merges the events of one frame, a sentence each ("A red square appears. A blue star leaves."); an
    event's object is its shape and colour ("The green star turns blue": a star, green or blue). The response
    names it when it has that shape word and one of those colour words (just the shape when none is given).
    """
    verdicts = []
    for sentence in re.split(r"[.!?]+", turn):
        found = object_words(sentence)
        shapes, colours = found & set(SHAPES), found & set(COLORS)
        if not shapes:
            continue
        said = object_words(response)
        verdicts.append(bool(shapes & said) and (not colours or bool(colours & said)))
    return any(verdicts) if verdicts else None


def prepare(videos: int, seed: int, duration: float, cache_dir: str | Path | None = None) -> Path:
    """The benchmark's dialogue file: videos rendered and converted once into the cache, then reused.

    Video i depends only on (seed, i), so a set is the same wherever and whenever it is made.
    """
    from livevlm.backbones import default_cache_dir
    from livevlm.data.convert import convert
    from livevlm.world import generate_world

    if videos < 1 or duration <= 0:
        raise ValueError(f"the world benchmark needs videos ≥ 1 and a duration > 0 s, got {videos} and {duration:g}")
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir() / "benchmarks"
    folder = root / f"world-seed{seed}-{videos}x{duration:g}s"
    annotations, dialogue = folder / "annotations.jsonl", folder / "dialogue.jsonl"
    if not annotations.is_file():
        generate_world(folder, videos=videos, seed=seed, duration=duration)
    if not dialogue.is_file():
        convert(ConvertOptions(input=str(annotations), output=str(dialogue), kind="world"))
    return dialogue
