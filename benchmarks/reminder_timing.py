"""Free-running reminder timing: "Tell me when …" asked mid-stream, through `livevlm stream`.

The teacher-forced `livevlm evaluate` times a reminder on the ground-truth stream; here the model runs as a
user would run it. For each reminder dialogue (task "reminder": a user request, an immediate
acknowledgement, then one response the model must start by itself at the event):
`livevlm stream VIDEO --query REQUEST --at T --jsonl --fast`. The first response after the query is the
acknowledgement; the first one after that decides (`livevlm.evaluation.free_running.reminder_outcome`):
on time (within ±tolerance of the event), early (a false alarm), late, or never. Also printed: responses
before the request (the model should wait for it), responses after the reminder (it should be said once)
and, for on-time reminders, whether they name the object as the reference does (its colour and shape).

    livevlm world generate data/world-heldout --videos 20 --seed 1 --duration 30   # if not there yet
    livevlm data convert --from world data/world-heldout/annotations.jsonl data/world-heldout/dialogue.jsonl
    python benchmarks/reminder_timing.py data/world-heldout/dialogue.jsonl --dialogues 10
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from collections import Counter
from pathlib import Path

from livevlm.evaluation.free_running import REMINDER_OUTCOMES, reminder_outcome
from livevlm.evaluation.stream_eval import json_ready
from livevlm.world import COLORS, SHAPES

# Scripts, not a package: narration_timing.py sits beside this file, whatever the working directory.
sys.path.insert(0, str(Path(__file__).resolve().parent))
from narration_timing import stream  # noqa: E402  (the same `livevlm stream` call, with a query and its time)

OBJECT_WORDS = set(COLORS) | set(SHAPES)


def request_and_event(record: dict) -> tuple[dict, dict]:
    """The user's request and the assistant turn the model must start by itself (the first one after it)."""
    request = next(t for t in record["turns"] if t["role"] == "user")
    event = next(t for t in record["turns"] if t["role"] == "assistant" and t["time_s"] > request["time_s"] + 1e-6)
    return request, event


def split_responses(events: list[dict]) -> tuple[list[dict], list[dict]]:
    """(responses before the query, spontaneous responses after its acknowledgement), in stream order."""
    before, after, state = [], [], "before"
    for event in events:
        if event["type"] == "query":
            state = "ack"
        elif event["type"] == "response":
            if state == "before":
                before.append(event)
            elif state == "ack":
                state = "after"  # this one is the acknowledgement
            else:
                after.append(event)
    return before, after


def names_object(response: str, reference: str) -> bool:
    """The response has the reference's colour and shape words (and no other object's shape or colour)."""
    expected = object_words(reference)
    return bool(expected) and object_words(response) == expected


def object_words(text: str) -> set[str]:
    return set(re.findall(r"[a-z]+", text.lower())) & OBJECT_WORDS


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dialogues", type=Path, help="dialogue JSONL (its videos relative to its folder)")
    parser.add_argument("--dialogues", dest="limit", type=int, default=0, help="the first N reminders (0 = all)")
    parser.add_argument("--model", default="")
    parser.add_argument("--threshold", type=float, default=None,
                        help="speak threshold θ (default: the model's recommended θ, else 0.725)")
    parser.add_argument("--tolerance", type=float, default=1.0)
    args = parser.parse_args()
    records = [json.loads(line) for line in args.dialogues.read_text().splitlines() if line.strip()]
    records = [r for r in records if r.get("task") == "reminder"][: args.limit or None]
    if not records:
        raise SystemExit(f"{args.dialogues} has no dialogue with task 'reminder'")
    counts: Counter[str] = Counter()
    offsets, named, unprompted, repeated, threshold = [], 0, 0, 0, args.threshold
    for record in records:
        request, event = request_and_event(record)
        events = stream(args.dialogues.parent / record["video"], args.model, args.threshold,
                        query=request["text"], at=request["time_s"])
        threshold = next(e["threshold"] for e in events if e["type"] == "summary")
        before, after = split_responses(events)
        outcome = reminder_outcome(event["time_s"], [r["time_s"] for r in after], args.tolerance)
        counts[outcome.kind] += 1
        unprompted += len(before)
        repeated += outcome.extra
        said = after[0]["text"] if after else ""
        if outcome.kind == "on_time":
            offsets.append(abs(outcome.offset_s))
            named += names_object(said, event["text"])
        offset = "-" if outcome.offset_s is None else f"{outcome.offset_s:+.1f} s"
        print(f"{record['id']}: {outcome.kind} ({offset}) | {request['text']} | truth {event['time_s']} s: "
              f"{event['text']} | said: {said}", flush=True)
    total = len(records)
    summary = {"reminders": total, "threshold": threshold, "tolerance_s": args.tolerance}
    summary |= {kind: counts[kind] / total for kind in REMINDER_OUTCOMES}
    summary |= {"mean_abs_offset_s": sum(offsets) / len(offsets) if offsets else math.nan,
                "named_share": named / len(offsets) if offsets else math.nan,
                "unprompted_responses": unprompted, "repeated_responses": repeated}
    print(json.dumps(json_ready(summary), indent=2))


if __name__ == "__main__":
    main()
