"""Which words does a model read from the frames? Teacher-forced accuracy of colour and shape words.

Why: LM-Correctness says a sentence went wrong, not where. On the synthetic world a narration's colour word
has three sources: a new object ("A small red circle appears", only the frames tell it), a colour change
("… turns red", the frames again) and an object named before ("The red circle starts moving", which the
model may copy from its own earlier words). Their accuracies, set against `experiments/probes/feature_probe.py`
(what a linear probe reads from the same frozen features), say whether the features or the model fall
short. Each word is scored under teacher forcing: the reference prefix is given, the argmax must be the
reference token. A second table says which kind of token (article, size, colour, shape, event, place,
end of turn) is each turn's first wrong one: LM-Correctness counts only the tokens before it, so that table
says which word caps the metric. Prints the tables; asserts nothing.

    python benchmarks/word_accuracy.py data/world-heldout/dialogue.jsonl --features data/world-heldout/features
"""

from __future__ import annotations

import argparse
from bisect import bisect_left
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import torch

# What the first wrong token of a turn is, by kind: the turn's LM-Correctness is the share of its tokens
# before it, so the kind that comes first and is often wrong caps the metric.
FIRST_ERROR_KINDS = ("none", "turn start", "article", "size", "colour", "shape", "event", "place",
                     "end of turn", "other")
EVENT_WORDS = {"appears", "vanishes", "starts", "moving", "stops", "turns", "grows", "shrinks", "bumps", "into",
               "collides", "with", "leaves", "moves"}
PLACE_WORDS = {"on", "in", "at", "to", "left", "right", "up", "down", "top", "bottom", "centre"}

SLOTS = ("colour: new object", "colour: new object, first frame", "colour: new object, later",
         "colour: colour change", "colour: object named before", "shape: new object", "shape: any")


def slot_of(words: list[str], j: int, colours: set[str], shapes: set[str]) -> str | None:
    """The slot of word j of a sentence (lower-case words), or None for other words."""
    if words[j] in shapes:
        return "shape: any"
    if words[j] not in colours:
        return None
    before = words[j - 1] if j else ""
    if before in ("a", "small", "large"):
        return "colour: new object"
    return "colour: colour change" if before == "turns" else "colour: object named before"


def finer_slot(words: list[str], j: int, slot: str, frame: int, colours: set[str]) -> str | None:
    """A second slot that splits the first: a new object's colour at the stream's first frame (no change
    since an earlier frame to see it by: the object must be read from the frame itself) or later, and the
    shape of a new object ("a small red circle") against shapes named before."""
    if slot == "colour: new object":
        return f"colour: new object, {'first frame' if frame == 0 else 'later'}"
    if slot == "shape: any" and j >= 2 and words[j - 1] in colours and words[j - 2] in ("a", "an", "small", "large"):
        return "shape: new object"
    return None


def slotted_words(labels: list[int], frame_ends: list[int], eos_id: int,
                  tokenizer) -> Iterator[tuple[int, str, str, str | None]]:
    """(position, lower-case word, slot, finer slot or None) of every colour or shape word in a stream's
    assistant turns; the position is the one that predicts the word (labels are shifted)."""
    from livevlm.evaluation.metrics import split_turns
    from livevlm.world import COLORS, SHAPES

    colours, shapes = set(COLORS), set(SHAPES)
    for turn in split_turns(labels, frame_ends, eos_id):
        positions = turn.text_positions
        words = [tokenizer.decode([labels[i]]).strip().lower() for i in positions]
        for j, word in enumerate(words):
            if (slot := slot_of(words, j, colours, shapes)) is not None:
                frame = bisect_left(frame_ends, positions[j]) - 1  # the last frame before the word
                yield positions[j], word, slot, finer_slot(words, j, slot, frame, colours)


def first_error_kind(word: str, is_eos: bool) -> str:
    """The kind of a turn's first wrong token (`word`: its text, lower-case, stripped)."""
    from livevlm.world import COLORS, SHAPES, SIZES

    word = word.strip(".,")
    if is_eos:
        return "end of turn"
    if word in ("assistant", ":", ""):
        return "turn start"
    for kind, words in (("article", {"a", "an", "the"}), ("size", set(SIZES)), ("colour", set(COLORS)),
                        ("shape", set(SHAPES)), ("event", EVENT_WORDS), ("place", PLACE_WORDS)):
        if word in words:
            return kind
    return "other"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data", type=Path, help="dialogue JSONL (held-out)")
    parser.add_argument("--features", default="", help="feature cache folder")
    parser.add_argument("--model", default="", help="checkpoint folder; empty = the shipped default model")
    parser.add_argument("--task", default="narration", help="only dialogues of this task ('' = all)")
    args = parser.parse_args()

    from livevlm.checkpoint import load_checkpoint
    from livevlm.data.dataset import StreamDataset
    from livevlm.default_model import default_model_path
    from livevlm.stream_format import StreamFormat

    loaded = load_checkpoint(args.model or default_model_path())
    fmt = StreamFormat(loaded.tokenizer, loaded.format_config, loaded.model_config.tokens_per_frame)
    dataset = StreamDataset(args.data, fmt, cache_dir=args.features or None)
    tasks = Counter(d.task for d in dataset.dialogues)
    if args.task and args.task not in tasks:
        parser.error(f"{args.data} holds no dialogue of task {args.task!r} (it holds {dict(tasks)}); "
                     "choose one with --task, or --task '' for all")
    from livevlm.evaluation.metrics import split_turns

    right, total, confusions = Counter(), Counter(), Counter()
    first_errors, first_words, turns = Counter(), Counter(), 0
    for index in range(len(dataset)):
        if args.task and dataset.dialogues[index].task != args.task:
            continue
        sample = dataset[index]
        with torch.no_grad():
            logits = loaded.model(sample.input_ids[None], sample.frame_tokens)[0][0]  # [L, V]
        predicted, labels = logits.argmax(-1).tolist(), sample.labels.tolist()
        for position, word, slot, finer in slotted_words(labels, sample.frame_ends, fmt.eos_id, loaded.tokenizer):
            ok = predicted[position] == labels[position]
            for counted in (slot, finer) if finer else (slot,):
                total[counted] += 1
                right[counted] += ok
            if not ok:
                confusions[(word, loaded.tokenizer.decode([predicted[position]]).strip())] += 1
        for turn in split_turns(labels, sample.frame_ends, fmt.eos_id):
            turns += 1
            wrong = next((i for i in turn.text_positions if predicted[i] != labels[i]), None)
            if wrong is None:
                first_errors["none"] += 1
                continue
            word = loaded.tokenizer.decode([labels[wrong]]).strip().lower()
            first_errors[first_error_kind(word, labels[wrong] == fmt.eos_id)] += 1
            first_words[word] += 1
    print("| word | right | of |\n|---|---|---|")
    for slot in SLOTS:
        if total[slot]:
            print(f"| {slot} | {right[slot] / total[slot]:.0%} | {total[slot]} |")
    print("\nmost common mistakes (reference → predicted):",
          ", ".join(f"{a} → {b} ({n})" for (a, b), n in confusions.most_common(6)))
    print(f"\n| first wrong token of a turn | share of {turns} turns |\n|---|---|")
    for kind in FIRST_ERROR_KINDS:
        if first_errors[kind]:
            print(f"| {kind} | {first_errors[kind] / turns:.0%} |")
    print("\nmost common first wrong tokens (reference):",
          ", ".join(f"{w or repr(w)} ({n})" for w, n in first_words.most_common(8)))


if __name__ == "__main__":
    main()
