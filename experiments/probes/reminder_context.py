"""Which part of the request does a reminder's speak decision read? The same clip under four requests.

Why: `reminder_probe.py` found a clip's answer frame and the same frame of its unanswered twin equally likely to
stay silent. This asks what the decision does read: each reminder clip that has a twin is streamed teacher-forced
with the same frames and four different requests before them —
- its own ("Tell me when the yellow circle leaves."), which the answer frame answers;
- its twin's (another object of the scene), which it does not;
- the narration prompt, which every event answers;
- none: no request before the answer frame (a closing "Thanks." at the clip's last frame, as a dialogue needs a
  turn) —
and P(stay silent) at the answer frame is printed for each, with the mean difference from its own request. It also
prints how much attention the decision position pays to the request, layer by layer (eager attention, own
request), and the norms of frame and text embeddings where they enter the LLM. Prints figures; asserts nothing.

    python experiments/probes/reminder_context.py --model runs/experiment-reminder-overfit/model \
        --data data/world-train5/reminder-pairs100.jsonl data/world-train5/features-chg12 --pairs 40
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # scripts, not a package: reminder_probe.py is beside it
from reminder_probe import rendered, twin_pairs  # noqa: E402

REQUESTS = ("own", "twin", "narration", "none")


def variants(rows: list[dict], pairs: int) -> list[tuple[str, float, dict]]:
    """(request kind, answer time, dialogue) for the first `pairs` clips that have a twin, four each."""
    from livevlm.data.converters.world import NARRATION_PROMPTS

    out = []
    for clip, twin in twin_pairs(rows, pairs):
        request, acknowledgement = clip["turns"][0], clip["turns"][1]
        last_frame_s = clip["end_s"] - 1 / clip["fps"]
        turns = {
            "own": clip["turns"],
            "twin": twin["turns"],
            "narration": [dict(request, text=NARRATION_PROMPTS[0]), dict(acknowledgement, text="Sure.")],
            "none": [dict(request, time_s=last_frame_s, text="Thanks."),
                     dict(acknowledgement, time_s=last_frame_s, text="You are welcome.")],
        }
        for kind in REQUESTS:
            record = copy.deepcopy(clip)
            record.pop("key_frames_s", None)
            record["id"], record["turns"] = f"{clip['id']}-{kind}", turns[kind]
            out.append((kind, clip["turns"][-1]["time_s"], record))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="default", help="checkpoint folder, or 'default' (the shipped model)")
    p.add_argument("--data", nargs=2, required=True, metavar=("DIALOGUE", "FEATURES"),
                   help="reminder clips and their twins (--from world-reminders --reminder-pairs)")
    p.add_argument("--pairs", type=int, default=40, help="how many clips (with a twin) to stream")
    a = p.parse_args()

    import livevlm

    rows = [json.loads(line) for line in Path(a.data[0]).read_text().splitlines() if line.strip()]
    streams = variants(rows, a.pairs)
    vlm = livevlm.load(a.model)
    samples, dialogues = rendered([record for _, _, record in streams], a.data[0], vlm.fmt, a.data[1])
    separator = vlm.fmt.separator_id
    silent = {kind: [] for kind in REQUESTS}
    to_request: list[list[float]] = []
    norms = {"frame": [], "text": []}
    vlm.model.llm.config._attn_implementation = "eager"  # attention weights for the own request
    with torch.no_grad():
        for (kind, answer_s, _), dialogue, sample in zip(streams, dialogues, samples, strict=True):
            position = sample.frame_ends[dialogue.frame_index(answer_s)]
            embeds = vlm.model.embed(sample.input_ids[None], sample.frame_tokens)  # [1, L, H]
            out = vlm.model.llm(inputs_embeds=embeds, output_attentions=kind == "own")
            silent[kind].append(out.logits[0, position].float().softmax(-1)[separator].item())
            if kind != "own":
                continue
            is_frame = sample.input_ids == vlm.fmt.placeholder_id
            norms["frame"].append(embeds[0][is_frame].norm(dim=-1).mean().item())
            norms["text"].append(embeds[0][~is_frame].norm(dim=-1).mean().item())
            ids = sample.input_ids.tolist()
            prompt = len(vlm.fmt.prompt_ids())
            end = ids.index(vlm.fmt.tokenizer.eos_token_id, prompt)  # the acknowledgement's last token
            first = max([e + 1 for e in sample.frame_ends if e < end], default=prompt)  # after the frame before
            to_request.append([layer[0, :, position, first:end + 1].sum(-1).mean().item()
                               for layer in out.attentions])
    print(f"P(stay silent), teacher-forced, at the answer frame of {a.pairs} clips ({a.data[0]}), by request:")
    for kind in REQUESTS:
        gap = statistics.mean(abs(x - y) for x, y in zip(silent[kind], silent["own"], strict=True))
        print(f"  {kind:9s} mean {statistics.mean(silent[kind]):.3f}  median {statistics.median(silent[kind]):.3f}"
              f"  mean |difference from own| {gap:.3f}")
    layers = [statistics.mean(column) for column in zip(*to_request, strict=True)]
    print("attention from the decision position to the request and its acknowledgement (mean over heads), by layer:")
    print("  " + "  ".join(f"{i}: {share:.3f}" for i, share in enumerate(layers)))
    print(f"embedding norms where they enter the LLM: frame tokens {statistics.mean(norms['frame']):.1f}, "
          f"text tokens {statistics.mean(norms['text']):.1f}")


if __name__ == "__main__":
    main()
