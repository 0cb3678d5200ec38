"""Free-running reminders: what the model did with each "Tell me when …", read off the free-running evaluation.

`livevlm evaluate --free-running` scores a reminder's timing as one more turn to match (the trigger recall
of the `reminder` task). A user sees more than that: the first response after the request decides, as it
would for them: on time (within ±tolerance of the event), early (a false alarm, even if the model speaks
again at the event), late, or never (`free_running.reminder_outcome`). This runs the library's free-running
evaluation (`LiveVLM.evaluate_world`, or `evaluate_free_running` on a dialogue file) with a results file
and reads each reminder dialogue's record back (what the model said, and when). It prints one line per
reminder, then the shares of each outcome, the mean |offset| of the on-time ones, the share of those that
name the object (the world benchmark's `names_object`), the responses before a request (the model should
wait for it) and those after the reminder (it should be said once).

    python benchmarks/reminder_timing.py                         # the world benchmark's held-out set
    python benchmarks/reminder_timing.py data/world-heldout/dialogue.jsonl --results runs/reminders.jsonl
    python benchmarks/reminder_timing.py data/world-val/dialogue.jsonl --features data/world-val/features-chg12

The results file is the one `livevlm evaluate --benchmark world --results R` writes: with the same θ and
tolerance, either reuses what the other streamed.
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
from collections import Counter
from pathlib import Path


def reminder_line(record: dict, dialogue, tolerance_s: float) -> tuple[object, dict]:
    """(outcome, counts) of one reminder dialogue's free-running record.

    The request is the dialogue's first user turn, the reminder the first assistant turn after it; the
    model's spontaneous responses (`said`: the acknowledgement answers the request and is not among them)
    are before the request when at or before its time (it goes in after that frame), else after it.
    """
    from livevlm.evaluation.free_running import reminder_outcome
    from livevlm.evaluation.world_benchmark import names_object

    request = next(t for t in dialogue.turns if t.role == "user")
    event = next(t for t in dialogue.turns if t.role == "assistant" and t.time_s > request.time_s + 1e-6)
    before = [r for r in record["said"] if r["time_s"] <= request.time_s + 1e-9]
    after = [r for r in record["said"] if r["time_s"] > request.time_s + 1e-9]
    outcome = reminder_outcome(event.time_s, [r["time_s"] for r in after], tolerance_s)
    said = min(after, key=lambda r: r["time_s"])["text"] if after else ""
    named = outcome.kind == "on_time" and bool(names_object(said, event.text))
    return outcome, {"request": request.text, "event_s": event.time_s, "event": event.text, "said": said,
                     "before": len(before), "named": named}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data", nargs="?", type=Path, help="dialogue JSONL (default: the world benchmark's)")
    parser.add_argument("--features", type=Path, default=None,
                        help="with DATA: its feature cache (`livevlm data encode`); default: encode the frames")
    parser.add_argument("--model", default="default")
    parser.add_argument("--videos", type=int, default=20, help="world benchmark: how many videos")
    parser.add_argument("--seed", type=int, default=1, help="world benchmark: the seed (1 = the held-out set)")
    parser.add_argument("--duration", type=float, default=30.0, help="world benchmark: seconds per video")
    parser.add_argument("--threshold", type=float, default=None, help="θ (default: the model's own, else 0.725)")
    parser.add_argument("--tolerance", type=float, default=1.0)
    parser.add_argument("--results", default="", help="free-running results JSONL (resumable); default: a temp file")
    args = parser.parse_args()

    import livevlm
    from livevlm import runtime
    from livevlm.data.schema import read_dialogues
    from livevlm.evaluation.free_running import REMINDER_OUTCOMES
    from livevlm.evaluation.stream_eval import json_ready
    from livevlm.evaluation.world_benchmark import prepare

    runtime.use_all_cores()
    model = livevlm.load(args.model, dtype="float32")  # float32 on any device, as `livevlm evaluate`
    results = Path(args.results) if args.results else Path(tempfile.mkdtemp()) / "free-running.jsonl"
    if args.data is None:
        data = prepare(args.videos, args.seed, args.duration)
        free = model.evaluate_world(args.videos, args.seed, args.duration, threshold=args.threshold,
                                    tolerance_s=args.tolerance, results=results, progress=True)
    else:
        data = args.data
        free = model.evaluate_free_running(data, args.features, threshold=args.threshold, tolerance_s=args.tolerance,
                                           results=results, progress=True)
    dialogues = {d.id: d for d in read_dialogues(data) if d.task == "reminder"}
    records = {}  # of two lines of one dialogue the later counts, as in the evaluation
    for line in results.read_text().splitlines():
        if line.strip() and (record := json.loads(line))["id"] in dialogues:
            records[record["id"]] = record
    if not records:
        raise SystemExit(f"{data} has no dialogue with task 'reminder'")
    counts: Counter[str] = Counter()
    offsets, named, unprompted, repeated = [], 0, 0, 0
    for record_id, record in records.items():
        outcome, line = reminder_line(record, dialogues[record_id], args.tolerance)
        counts[outcome.kind] += 1
        unprompted += line["before"]
        repeated += outcome.extra
        if outcome.kind == "on_time":
            offsets.append(abs(outcome.offset_s))
            named += line["named"]
        offset = "-" if outcome.offset_s is None else f"{outcome.offset_s:+.1f} s"
        print(f"{record_id}: {outcome.kind} ({offset}) | {line['request']} | truth {line['event_s']} s: "
              f"{line['event']} | said: {line['said']}", flush=True)
    total = len(records)
    summary = {"reminders": total, "threshold": free["threshold"], "tolerance_s": args.tolerance}
    summary |= {kind: counts[kind] / total for kind in REMINDER_OUTCOMES}
    summary |= {"mean_abs_offset_s": sum(offsets) / len(offsets) if offsets else math.nan,
                "named_share": named / len(offsets) if offsets else math.nan,
                "unprompted_responses": unprompted, "repeated_responses": repeated}
    print(json.dumps(json_ready(summary), indent=2, allow_nan=False))


if __name__ == "__main__":
    main()
