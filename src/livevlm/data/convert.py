"""The registry of annotation converters and `convert`, what `livevlm data convert --from KIND IN OUT` runs.

Each converter reads one source format and returns schema dialogues (`livevlm.data.schema`); `convert`
writes them atomically, so an existing OUT is replaced only by a complete file. The formats and
what each converter produces are documented in its module under `livevlm.data.converters`.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from livevlm.data.converters.coin import coin_benchmarks, convert_coin
from livevlm.data.converters.common import AnnotationError, ConvertOptions
from livevlm.data.converters.ego4d import convert_ego4d_narration
from livevlm.data.converters.segments import convert_segments
from livevlm.data.converters.world import (
    convert_world,
    convert_world_changes,
    convert_world_narration,
    convert_world_questions,
    convert_world_reminders,
    convert_world_scene,
)
from livevlm.data.schema import Dialogue, write_dialogues, write_jsonl

__all__ = ["CONVERTERS", "AnnotationError", "ConvertOptions", "convert", "get_converter"]

Converter = Callable[[ConvertOptions], list[Dialogue]]

CONVERTERS: dict[str, Converter] = {
    "world": convert_world,  # synthetic-world annotations.jsonl: narration, reminders, questions
    "world-scene": convert_world_scene,  # the same: single-frame "What is on the screen?" clips (alignment)
    "world-changes": convert_world_changes,  # the same: two-frame "What just changed?" clips around events
    "world-reminders": convert_world_reminders,  # the same: reminders alone, clips from the request to past the answer
    "world-narration": convert_world_narration,  # the same: narration alone, short clips under each prompt
    "world-questions": convert_world_questions,  # the same: question dialogues alone, many questions each
    "ego4d-narration": convert_ego4d_narration,  # Ego4D all_narrations_redacted.json / narration.json
    "coin": convert_coin,  # COIN.json step annotations: step-stream dialogues
    "segments": convert_segments,  # {video, start, end, text} lists, ActivityNet Captions, YouCook2
}


def get_converter(kind: str) -> Converter:
    """The converter registered under `kind`.

    Raises:
        AnnotationError: unknown or empty kind, listing the valid ones.
    """
    if kind not in CONVERTERS:
        what = f"unknown source format {kind!r}" if kind else "no source format given"
        raise AnnotationError(f"{what}; choose one with --from: {', '.join(CONVERTERS)}")
    return CONVERTERS[kind]


def convert(args: ConvertOptions) -> tuple[int, int]:
    """Convert `args.input` into dialogues at `args.output` (and COIN benchmarks at `args.benchmarks`).

    Returns:
        (dialogues written, their turns).
    Raises:
        FileNotFoundError / AnnotationError / DialogueError: with the file, record and remedy.
    """
    converter = get_converter(args.kind)
    if args.benchmarks and args.kind != "coin":
        raise AnnotationError(f"--benchmarks is for --from coin, not {args.kind}")
    if Path(args.output).resolve() == Path(args.input).resolve():
        raise AnnotationError(f"{args.output}: the output would overwrite the annotations; choose another path")
    dialogues = converter(args)
    if not dialogues:
        raise AnnotationError(f"{args.input}: no dialogue could be made (no usable annotation in it); check "
                              f"that it is a {args.kind} annotation file")
    count = write_dialogues(args.output, dialogues)
    if args.benchmarks:
        write_jsonl(args.benchmarks, coin_benchmarks(args))
    return count, sum(len(d.turns) for d in dialogues)
