"""Does a reminder's speak decision read the request? Teacher-forced P(stay silent) and linear probes at its key frames.

Why: free-running, the default model answers a reminder at another object's event, and a clip's unanswered twin
(the same frames, the request about another object: `livevlm data convert --from world-reminders
--reminder-pairs`) as readily as the clip itself. This looks inside, teacher-forced, at the decision position of
the frame that answers each clip (and the same frame of its twin):
- P(stay silent) there and at the reminder's other key frames (`key_frames_s`: the events it must wait
  through), for clips and twins: if the decision read the request, the clip's answer frame would be low and the
  twin's high;
- linear probes on each layer's hidden state there (fitted on the training pairs, scored on the validation
  pairs, both balanced): clip or twin (what the decision needs), and the colour the request names (whether the
  request reaches the position at all).
Prints figures; asserts nothing.

    python experiments/probes/reminder_probe.py --model runs/experiment-reminder-keyframes/model \
        --train data/world-train5/reminder-pairs.jsonl data/world-train5/features-chg12 \
        --test data/world-val/reminder-pairs.jsonl data/world-val/features-chg12
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # scripts, not a package: feature_probe.py is beside it
from feature_probe import probe_accuracy  # noqa: E402

TWIN = "-unanswered"


def twin_pairs(rows: list[dict], count: int) -> list[tuple[dict, dict]]:
    """(clip, twin) for the first `count` twins among dialogue records (`--reminder-pairs`)."""
    clips = {r["id"]: r for r in rows if not r["id"].endswith(TWIN)}
    return [(clips[t["id"].removesuffix(TWIN)], t) for t in [r for r in rows if r["id"].endswith(TWIN)][:count]]


def rendered(records: list[dict], beside: str | Path, fmt, features: str) -> tuple[list, list]:
    """The training render of dialogue records (`StreamSample`s) and their `Dialogue`s, with frames from a feature
    cache. The records name their videos relative to the file `beside` (the JSONL they came from): they are
    written to a temporary file in its folder."""
    import json
    import tempfile

    from livevlm.data.dataset import StreamDataset

    with tempfile.NamedTemporaryFile("w", suffix=".jsonl", dir=Path(beside).parent) as file:
        file.write("".join(json.dumps(r) + "\n" for r in records))
        file.flush()
        dataset = StreamDataset(file.name, fmt, cache_dir=features, max_frames=1200)
        return [dataset[i] for i in range(len(records))], dataset.dialogues


def request_colour(text: str) -> str | None:
    from livevlm.world import COLORS

    words = text.lower().rstrip(".").split()
    return next((w for w in words if w in COLORS), None)


def collect(vlm, data: str, features: str, layers: list[int]) -> tuple[list[dict], dict[str, list[float]]]:
    """One record per clip that has a twin and per twin: hidden states at the clip's answer frame, and the
    P(stay silent) of every key frame, grouped."""
    from livevlm.data.dataset import StreamDataset

    dataset = StreamDataset(data, vlm.fmt, cache_dir=features, max_frames=1200)
    separator = vlm.fmt.separator_id
    answer_frame: dict[str, int] = {}
    records, silent = [], {"clip, its answer": [], "clip, other events": [], "twin, the clip's answer frame": [],
                           "twin, other events": []}
    with torch.no_grad():
        for index, dialogue in enumerate(dataset.dialogues):
            twin = dialogue.id.endswith(TWIN)
            base = dialogue.id.removesuffix(TWIN)
            if not twin:
                answer_frame[base] = dialogue.frame_index(dialogue.turns[-1].time_s)
            sample = dataset[index]
            embeds = vlm.model.embed(sample.input_ids[None], sample.frame_tokens)
            out = vlm.model.llm(inputs_embeds=embeds, output_hidden_states=True)
            p_silent = out.logits[0].float().softmax(-1)[:, separator]  # [L]
            for frame in dialogue.key_frames():
                position = sample.frame_ends[frame] if frame < len(sample.frame_ends) else None
                if position is None or not sample.frame_target[position]:
                    continue
                at_answer = frame == answer_frame.get(base)
                group = ("twin, the clip's answer frame" if twin else "clip, its answer") if at_answer else \
                    ("twin, other events" if twin else "clip, other events")
                silent[group].append(p_silent[position].item())
            frame = answer_frame.get(base)
            if frame is None or frame >= len(sample.frame_ends):
                continue
            position = sample.frame_ends[frame]
            record = {"base": base, "speaks": not twin, "colour": request_colour(dialogue.turns[0].text)}
            record |= {f"layer{layer}": out.hidden_states[layer][0, position].float() for layer in layers}
            records.append(record)
    paired = {r["base"] for r in records if not r["speaks"]}
    return [r for r in records if r["base"] in paired], silent


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="default", help="checkpoint folder, or 'default' (the shipped model)")
    p.add_argument("--train", nargs=2, required=True, metavar=("DIALOGUE", "FEATURES"),
                   help="reminder clips and twins (--from world-reminders --reminder-pairs) to fit on")
    p.add_argument("--test", nargs=2, required=True, metavar=("DIALOGUE", "FEATURES"), help="the same, to score on")
    p.add_argument("--layers", type=int, nargs="+", default=[8, 16, 24, 30], help="hidden-state layers")
    a = p.parse_args()

    import livevlm

    vlm = livevlm.load(a.model)
    train, _ = collect(vlm, *a.train, a.layers)
    test, silent = collect(vlm, *a.test, a.layers)
    print(f"P(stay silent), teacher-forced, on {a.test[0]} (θ 0.8 stays silent at ≥ 0.8):")
    for group, values in silent.items():
        if values:
            print(f"  {group:30s} n={len(values):4d}  mean {statistics.mean(values):.3f}  median "
                  f"{statistics.median(values):.3f}  ≥ 0.8: {sum(v >= 0.8 for v in values)}")
    print(f"linear probes at the answer frame: fitted on {len(train)} ({a.train[0]}), scored on {len(test)}; "
          "chance 0.5 for clip or twin")
    for layer in a.layers:
        key = f"layer{layer}"
        speaks = probe_accuracy(train, test, key, "speaks")
        named = [r for r in train if r["colour"]], [r for r in test if r["colour"]]
        colour = probe_accuracy(*named, key, "colour")
        print(f"  layer {layer:2d}: clip or twin {speaks:.3f}   the request's colour {colour:.3f}")


if __name__ == "__main__":
    main()
