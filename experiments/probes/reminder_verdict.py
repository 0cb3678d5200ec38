"""Can a reminder's decision be learnt at all, and where? The frame decision against a verdict after the event's words.

Why: `reminder_context.py` found the default model's speak decision at a reminder's answer frame blind to what the
request asks, and no recipe lever (data, rank, loss weight, step size, the decision's position) fitted it, not even
on 100 pairs seen eight times. This trains a copy of the model, every weight (not LoRA), on a few reminder clips
and their unanswered twins (the same frames, a request about another object) and scores the decision it has to
learn, on those pairs and on held-out pairs of another world seed, under three layouts of the same dialogues:

- `frame`: the LIVE decision as the streams train it: at the answer frame the clip speaks and the twin stays
  silent (P(stay silent) is the score; key frames weighted `--key-weight`);
- `near`: the same with the request moved to one second before the answer frame (is it the distance?);
- `verdict`: both dialogues say what happens at that frame (the clip's answer, e.g. "A small purple star appears
  on the right.") and then a verdict, " You asked for this." for the clip and " Not yet." for the twin; the score
  is P(" Not") / (P(" Not") + P(" You")) at the words' last token, a text position right after the event's name;
- `notes`: the layout of `format.note_role` (docs/stream-layout.md): both write those words as a note at that
  frame; the clip then answers ("\nAssistant: …"), the twin goes on watching ("\n["); the score is P(watch) /
  (P(watch) + P(answer)) where the two continuations part after the note's eos.

A pair is right when the clip scores below 0.5 and the twin at or above. Prints each layout's figures before and
after every epoch; asserts nothing. Each layout is its own copy of the model: ~8 minutes each on 2 CPU cores for
30 training pairs and 3 epochs.

    python experiments/probes/reminder_verdict.py \
        --train data/world-train5/reminders12pk.jsonl data/world-train5/features-chg12 \
        --test data/world-val/reminders4pk.jsonl data/world-val/features-chg12
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # scripts, not a package: reminder_probe.py is beside it
from reminder_probe import rendered, twin_pairs  # noqa: E402

LAYOUTS = ("frame", "near", "verdict", "notes")
YES, NO = " You asked for this.", " Not yet."


def pairs(path: str, count: int) -> list[tuple[dict, dict]]:
    """The first `count` (clip, twin) pairs of a `--reminder-pairs` file."""
    return twin_pairs([json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()], count)


def fmt(vlm, layout: str):
    """The model's stream format; with notes for the `notes` layout."""
    if layout != "notes":
        return vlm.fmt
    from dataclasses import replace

    from livevlm.stream_format import StreamFormat

    return StreamFormat(vlm.fmt.tokenizer, replace(vlm.fmt.config, note_role="Note"), vlm.fmt.tokens_per_frame)


def laid_out(clip: dict, twin: dict, layout: str) -> tuple[dict, dict]:
    """Copies of a pair in one layout. The twin takes the clip's acknowledgement, so the two differ only in the
    request (and, with `verdict`, in the verdict)."""
    clip, twin = copy.deepcopy(clip), copy.deepcopy(twin)
    twin["turns"][1]["text"] = clip["turns"][1]["text"]
    answer = clip["turns"][-1]
    if layout == "near":
        for record in (clip, twin):
            record["turns"][0]["time_s"] = record["turns"][1]["time_s"] = max(record["start_s"], answer["time_s"] - 1)
            record["key_frames_s"] = [s for s in record.get("key_frames_s", []) if s >= answer["time_s"]]
    if layout == "verdict":
        twin["turns"].append(dict(answer, text=answer["text"] + NO))
        answer["text"] += YES
    if layout == "notes":
        twin["turns"].append(dict(answer, role="note"))
        clip["turns"].insert(len(clip["turns"]) - 1, dict(answer, role="note"))
    return clip, twin


class Scored:
    """Rendered dialogues of one layout, with the position whose prediction scores each."""

    def __init__(self, vlm, records: list[dict], data: tuple[str, str], layout: str) -> None:
        from livevlm.stream_format import fork

        layout_fmt = fmt(vlm, layout)
        self.samples, dialogues = rendered(records, data[0], layout_fmt, data[1])
        tokenizer = vlm.fmt.tokenizer
        self.yes, self.no = (tokenizer(text, add_special_tokens=False).input_ids for text in (YES, NO))
        self.layout, self.separator = layout, vlm.fmt.separator_id
        if layout == "notes":  # where "\nAssistant:" and "\n[" part after a note's eos
            answer, reopen = layout_fmt.answer_after_note_ids(), layout_fmt.reopen_ids()
            shared = fork(answer, reopen)
            self.yes, self.no = answer[shared:], reopen[shared:]
        self.positions = []
        for index, sample in enumerate(self.samples):
            if layout == "notes":
                ids, note = sample.input_ids.tolist(), layout_fmt.note_ids()
                start = next(i for i in range(len(ids)) if ids[i:i + len(note)] == note)
                self.positions.append(ids.index(layout_fmt.eos_id, start) + shared)
            elif layout == "verdict":
                ids, verdict = sample.input_ids.tolist(), self.no if index % 2 else self.yes
                start = next(i for i in range(len(ids)) if ids[i:i + len(verdict)] == verdict)
                self.positions.append(start - 1)  # the prediction of the verdict's first token
            else:
                answer_s = records[index - index % 2]["turns"][-1]["time_s"]  # the clip's answer frame
                self.positions.append(sample.frame_ends[dialogues[index].frame_index(answer_s)])

    @torch.no_grad()
    def scores(self, model) -> list[float]:
        """Per dialogue, the probability of the twin's side: stay silent, " Not", or going on watching."""
        out = []
        for sample, position in zip(self.samples, self.positions, strict=True):
            logits, _, _ = model(sample.input_ids[None], sample.frame_tokens)
            p = logits[0, position].float().softmax(-1)
            if self.layout in ("verdict", "notes"):
                no, yes = p[self.no[0]].item(), p[self.yes[0]].item()
                out.append(no / (no + yes))
            else:
                out.append(p[self.separator].item())
        return out


def summary(scores: list[float]) -> str:
    clips, twins = scores[0::2], scores[1::2]
    right = statistics.mean((c < 0.5) and (t >= 0.5) for c, t in zip(clips, twins, strict=True))
    return (f"clip {statistics.mean(clips):.2f}  twin {statistics.mean(twins):.2f}  "
            f"twin - clip {statistics.mean(t - c for c, t in zip(clips, twins, strict=True)):+.2f}  "
            f"pairs right {right:.2f}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="default", help="checkpoint folder, or 'default' (the shipped model)")
    p.add_argument("--train", nargs=2, required=True, metavar=("PAIRS", "FEATURES"),
                   help="reminder clips and their twins to train on (--from world-reminders --reminder-pairs)")
    p.add_argument("--test", nargs=2, required=True, metavar=("PAIRS", "FEATURES"), help="held-out pairs")
    p.add_argument("--train-pairs", type=int, default=30)
    p.add_argument("--test-pairs", type=int, default=20)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--key-weight", type=float, default=10.0, help="train.key_frame_weight for the key frames")
    p.add_argument("--layouts", nargs="+", choices=LAYOUTS, default=list(LAYOUTS))
    a = p.parse_args()

    import livevlm

    train_pairs, test_pairs = pairs(a.train[0], a.train_pairs), pairs(a.test[0], a.test_pairs)
    print(f"{len(train_pairs)} training pairs ({a.train[0]}), {len(test_pairs)} held-out ({a.test[0]}); "
          f"every weight trained, AdamW lr {a.lr}, {a.epochs} epochs")
    for layout in a.layouts:
        torch.manual_seed(0)
        vlm = livevlm.load(a.model)
        model = vlm.model
        train = Scored(vlm, [r for pair in train_pairs for r in laid_out(*pair, layout)], a.train, layout)
        test = Scored(vlm, [r for pair in test_pairs for r in laid_out(*pair, layout)], a.test, layout)
        for parameter in model.parameters():
            parameter.requires_grad_(True)
        optimizer = torch.optim.AdamW(model.parameters(), lr=a.lr, weight_decay=0.0)
        start = time.time()
        for epoch in range(a.epochs + 1):
            model.eval()
            print(f"[{layout}] epoch {epoch} ({time.time() - start:.0f} s)  train: {summary(train.scores(model))}"
                  f"  |  held-out: {summary(test.scores(model))}", flush=True)
            if epoch == a.epochs:
                break
            model.train()
            for sample in train.samples:
                _, loss, _ = model(sample.input_ids[None], sample.frame_tokens, labels=sample.labels[None],
                                   frame_target=sample.frame_target[None], key_frame_weight=a.key_weight,
                                   key_target=None if sample.key_target is None else sample.key_target[None])
                loss.backward()
                optimizer.step()
                optimizer.zero_grad()


if __name__ == "__main__":
    main()
