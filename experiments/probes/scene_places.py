"""Does a model name where each object is? Held-out "What is on the screen?" frames answered greedily.

Why: narration's wrong sentences go wrong first at the place or direction in two thirds of them
(docs/experiments.md, "What the sentences get wrong: where"). A model trained on single frames with each
object's place in the answer (`livevlm data convert --from world-scene --scene-places`) is asked the same about
held-out frames; each true object is looked up in its answer by colour and shape, and its place compared with
the world's (the ninth of the frame holding the object's centre). Prints one line per count and asserts nothing.

    python experiments/probes/scene_places.py runs/experiment-align-places/model \
        data/world-heldout/scene-places5.jsonl data/world-heldout/features-chg12
"""

from __future__ import annotations

import argparse
import re

ITEM = re.compile(r"^(?:a|an) (?P<size>small|large) (?P<colour>\w+) (?P<shape>\w+)(?: (?P<place>.+))?$")


def items(answer: str) -> dict[tuple[str, str], tuple[str, str | None]]:
    """"A small red circle on the left and a large blue star." → {(red, circle): (small, "on the left"),
    (blue, star): (large, None)}; items the pattern does not read are left out."""
    found = {}
    for part in re.split(r", | and ", answer.strip().rstrip(".").lower()):
        match = ITEM.match(part.strip())
        if match:
            found[(match["colour"], match["shape"])] = (match["size"], match["place"])
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model")
    parser.add_argument("data", help="scene clips made with --scene-places")
    parser.add_argument("features")
    args = parser.parse_args()

    import livevlm
    from livevlm import runtime
    from livevlm.data.dataset import StreamDataset
    from livevlm.engine.session import ResponseEvent
    from livevlm.evaluation.free_running import stream_dialogue

    runtime.use_all_cores()
    model = livevlm.load(args.model, dtype="float32")
    dataset = StreamDataset(args.data, model.fmt, cache_dir=args.features, max_frames=1200)
    counts = {"frames": 0, "answers_exact": 0, "objects": 0, "named": 0, "sized": 0, "placed": 0}
    for dialogue in dataset.dialogues:
        session = model.session(max_new_tokens=96)
        events = stream_dialogue(session, dataset.frame_tokens(dialogue), dialogue)
        reply = next((e.text for e in events if isinstance(e, ResponseEvent) and e.answer_to_query), "")
        truth = next(turn.text for turn in dialogue.turns if turn.role == "assistant")
        counts["frames"] += 1
        counts["answers_exact"] += reply.strip() == truth.strip()
        said = items(reply)
        for key, (size, place) in items(truth).items():
            counts["objects"] += 1
            if key in said:
                counts["named"] += 1
                counts["sized"] += said[key][0] == size
                counts["placed"] += said[key][1] == place
    print(f"{counts['frames']} frames, answers word for word: {counts['answers_exact']}")
    print(f"{counts['objects']} objects: named (colour and shape) {counts['named']}, of those the size right "
          f"{counts['sized']}, the place right {counts['placed']}")


if __name__ == "__main__":
    main()
