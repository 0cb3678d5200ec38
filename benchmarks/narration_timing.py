"""Free-running narration timing of a model on held-out synthetic-world videos, through `livevlm stream`.

For each video: `livevlm stream VIDEO --query "Please narrate the video in real time." --at 0 --jsonl
--fast`, then its spontaneous responses are matched to the annotated events within ±1 s
(`livevlm.evaluation.free_running`). Prints per-video and pooled recall / precision / F1, and the coverage
(events with any response within ±1 s, one response possibly covering two close events).

    livevlm world generate data/world-heldout --videos 20 --seed 1 --duration 30   # if not there yet
    python benchmarks/narration_timing.py data/world-heldout/annotations.jsonl --videos 5
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
from pathlib import Path

from livevlm.evaluation.free_running import TimingScores, event_frames, match_timing
from livevlm.evaluation.stream_eval import json_ready

QUERY = "Please narrate the video in real time."


def stream(video: Path, model: str, threshold: float | None, query: str = QUERY, at: float = 0.0) -> list[dict]:
    """The JSON events of `livevlm stream VIDEO --query QUERY --at AT --jsonl --fast` (no frame events)."""
    # float32 on any device, as `livevlm evaluate`: these figures score timing and words, not speed
    cmd = [sys.executable, "-m", "livevlm.cli", "stream", str(video), "--query", query, "--at", str(at),
           "--jsonl", "--fast", "--no-frames", "--dtype", "float32"]
    if threshold is not None:
        cmd += ["--threshold", str(threshold)]
    if model:
        cmd += ["--model", model]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, stdin=subprocess.DEVNULL).stdout
    return [json.loads(line) for line in out.splitlines() if line.startswith("{")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("annotations", type=Path)
    parser.add_argument("--videos", type=int, default=5)
    parser.add_argument("--model", default="")
    parser.add_argument("--threshold", type=float, default=None,
                        help="speak threshold θ (default: the model's recommended θ, else 0.725)")
    parser.add_argument("--tolerance", type=float, default=1.0)
    args = parser.parse_args()
    pooled = TimingScores(0, 0, 0, 0, math.nan, 0)
    lines = args.annotations.read_text().splitlines()[: args.videos]
    threshold = args.threshold
    for line in lines:
        record = json.loads(line)
        video = args.annotations.parent / record["video"]
        events = stream(video, args.model, args.threshold)
        threshold = next(e["threshold"] for e in events if e["type"] == "summary")
        # the immediate answer to the narration query is not a timed narration; the rest are
        responses = [(e["time_s"], e["text"]) for e in events if e["type"] == "response"][1:]
        truth = event_frames(record["events"], record["fps"], record["duration_s"])
        truth = [(t, group) for t, group in truth if t > 0]  # events at 0 s are answered with the query
        scores = match_timing(truth, responses, args.tolerance)
        print(f"{record['video']}: {json.dumps(json_ready(scores.as_dict()))}", flush=True)
        pooled += scores
    print(json.dumps(json_ready({"videos": len(lines), "tolerance_s": args.tolerance, "threshold": threshold}
                                | pooled.as_dict()), indent=2))


if __name__ == "__main__":
    main()
