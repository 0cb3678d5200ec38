"""COIN step annotations → step-stream dialogues, and the COIN offline benchmark samples.

Input: `COIN.json`, `{"database": {youtube_id: {"class": "ReplaceBatteryOnKey", "recipe_type": 1,
"subset": "training", "duration": 98.2, "start": 20.0, "end": 80.0, "annotation": [{"id": "3",
"segment": [20.0, 30.0], "label": "place the battery"}, ...]}}}`.

Step stream (one dialogue per video, the whole video): a user asks for guidance at the first frame
(answered by an acknowledgement, or by the first step when it starts there); at each step start, "Now
doing the step to {step}. Then try to {next}." ("This is the last step." for the last); at each step
end, "Just finished the step to {step}." plus "Next, try to {next}." or "The task is done."; texts that
fall on one frame are merged with " ".

Benchmark samples (`coin_benchmark_samples`), one JSON object per line, the questions of the public
VideoLLM-online COIN benchmarks so results compare:

    {"id": "<youtube_id>-step-0", "benchmark": "step" | "next" | "task" | "procedure" | "procedure+",
     "video": "videos/<youtube_id>.mp4", "fps": 2.0, "start_s": 20.0, "end_s": 30.5, "num_frames": 21,
     "question": "What is the action in the video? ...", "answer": "Place the battery.",
     "labels": ["place the battery"], "task": "replace battery on key", "subset": "training"}

The model is asked `question`, then sees frames `start_s + i / fps` for i < num_frames (a step's frames: the
first at or after its start to the first at or after its end, inclusive), the public code's layout, and answers
(`livevlm.evaluation.coin_benchmark` runs and scores them); `answer` is the reference
text and `labels` the category names (in order: one for step/next/task, up to five for the procedures)
that a prediction is fuzzily matched against. step: the step being shown; next: the step after it;
task: the video's task over the task's span; procedure / procedure+: the next up-to-5 steps, procedure+
telling the task in the question.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from livevlm.data.converters.common import (
    NUMBER,
    AnnotationError,
    ConvertOptions,
    StreamBuilder,
    VideoPaths,
    ceil_frame,
    count_frames,
    read_json,
    require,
    sentence,
)
from livevlm.data.schema import Dialogue

GUIDE_PROMPTS = ("Guide me through this task step by step.", "Tell me which step I am doing and what comes next.",
                 "I want to {task}. Tell me what to do at each step.", "Help me {task}, step by step.")
GUIDE_ACKS = ("Sure, I will follow along and tell you each step.", "OK, I will guide you through the steps.")
# Label fixes of the public VideoLLM-online code (two COIN labels read badly as "the step to ...").
_STEP_FIXES = {"process (crop, fold) paper": "crop and fold paper",
               "try to press gun head, spray residual old grease":
                   "try to press gun head to spray residual old grease"}
_SUFFIX = " Format your answer concisely. No extra text output."
_LIST_SUFFIX = (" Format your answer concisely, listing each action on a new line with a number prefix. "
                "No extra text output.")
MAX_PROCEDURE_STEPS = 5


@dataclass
class CoinVideo:
    """One COIN video: its task, step segments [(start, end, label)] in time order, and spans."""

    youtube_id: str
    task: str
    subset: str
    duration: float
    start: float
    end: float
    steps: list[tuple[float, float, str]]


def clean_task(name: str) -> str:
    """"ReplaceBatteryOnTVRemote" → "replace battery on TV remote" (acronyms such as TV, SIM, RJ45 kept)."""
    spaced = re.sub(r"([a-z0-9])([A-Z])", r"\1 \2", name)
    spaced = re.sub(r"([A-Z]+)([A-Z][a-z])", r"\1 \2", spaced)
    return " ".join(w if sum(c.isupper() for c in w) > 1 else w.lower() for w in spaced.split())


def parse_coin(data: Any, source: Path, subset: str = "") -> list[CoinVideo]:
    """The videos of a COIN.json value (those whose subset contains `subset`, when given)."""
    database = require(data, "database", str(source), dict, 'expected COIN.json: {"database": {youtube_id: ...}}')
    videos = []
    for yid, record in database.items():
        where = f"{source}: database.{yid}"
        if subset and subset.lower() not in str(require(record, "subset", where, str)).lower():
            continue
        steps = []
        for i, step in enumerate(require(record, "annotation", where, list)):
            segment = require(step, "segment", f"{where}.annotation[{i}]", list)
            if len(segment) != 2 or not all(isinstance(x, NUMBER) and not isinstance(x, bool) for x in segment) \
                    or segment[1] < segment[0]:
                raise AnnotationError(f"{where}.annotation[{i}]: segment: expected [start, end] seconds with "
                                      f"start <= end, got {segment!r}")
            label = require(step, "label", f"{where}.annotation[{i}]", str).strip()
            steps.append((float(segment[0]), float(segment[1]), _STEP_FIXES.get(label, label)))
        if not steps:
            continue
        steps.sort(key=lambda s: s[0])
        duration = float(record.get("duration") or max(s[1] for s in steps))
        videos.append(CoinVideo(yid, clean_task(require(record, "class", where, str)), str(record.get("subset", "")),
                                duration, float(record.get("start", steps[0][0])),
                                float(record.get("end", steps[-1][1])), steps))
    return videos


def step_stream(video: CoinVideo, args: ConvertOptions, video_ref: str) -> Dialogue:
    """The step-stream dialogue of one video (see the module docstring)."""
    rng = random.Random(f"{args.seed}:coin:{video.youtube_id}")
    builder = StreamBuilder(args.fps, start_s=0.0, end_s=video.duration)
    builder.ask(0.0, rng.choice(GUIDE_PROMPTS).format(task=video.task), rng.choice(GUIDE_ACKS), absorb=True)
    steps = video.steps
    for i, (start, end, label) in enumerate(steps):
        nxt = steps[i + 1][2] if i + 1 < len(steps) else None
        then = f"Then try to {nxt}." if nxt else "This is the last step."
        builder.say(start, f"Now doing the step to {label}. {then}")
        after = f"Next, try to {nxt}." if nxt else "The task is done."
        builder.say(end, f"Just finished the step to {label}. {after}")
    return Dialogue(id=f"{video.youtube_id}-steps", video=video_ref, fps=args.fps, turns=builder.turns(),
                    duration_s=video.duration, start_s=0.0, end_s=video.duration, task="coin-steps",
                    meta={"source": "coin", "task": video.task, "subset": video.subset})


def _clip(start: float, end: float, duration: float, fps: float) -> tuple[float, int]:
    """(start_s, num_frames) of the frames from the first at or after `start` to the one at/after `end`."""
    last = max(0, count_frames(0.0, duration, fps) - 1)
    first, final = min(ceil_frame(start, fps), last), min(ceil_frame(end, fps), last)
    return first / fps, final - first + 1


def _sample(video: CoinVideo, kind: str, index: int, span: tuple[float, float], question: str, answer: str,
            labels: list[str], fps: float, video_ref: str) -> dict[str, Any]:
    start_s, num_frames = _clip(span[0], span[1], video.duration, fps)
    return {"id": f"{video.youtube_id}-{kind}-{index}", "benchmark": kind, "video": video_ref, "fps": fps,
            "start_s": start_s, "end_s": start_s + num_frames / fps, "num_frames": num_frames,
            "question": question, "answer": answer, "labels": labels, "task": video.task,
            "subset": video.subset}


def _procedure_question(n: int, task: str | None) -> str:
    lead = f"To {task}, what" if task else "What"
    if n == 1:
        return f"{lead} is the next action for the video?{_SUFFIX}"
    return f"{lead} is the next {n} actions for the video?{_LIST_SUFFIX}"


def coin_benchmark_samples(video: CoinVideo, fps: float, video_ref: str) -> list[dict[str, Any]]:
    """The step / next / task / procedure / procedure+ samples of one video (format in the docstring)."""
    steps, samples = video.steps, []
    samples.append(_sample(video, "task", 0, (video.start, video.end), f"What is the overall activity in the "
                           f"video?{_SUFFIX}", sentence(video.task) + ".", [video.task], fps, video_ref))
    for i, (start, end, label) in enumerate(steps):
        samples.append(_sample(video, "step", i, (start, end), f"What is the action in the video?{_SUFFIX}",
                               sentence(label) + ".", [label], fps, video_ref))
        if i + 1 == len(steps):
            continue
        samples.append(_sample(video, "next", i, (start, end), _procedure_question(1, None),
                               sentence(steps[i + 1][2]) + ".", [steps[i + 1][2]], fps, video_ref))
        upcoming = [s[2] for s in steps[i + 1: i + 1 + MAX_PROCEDURE_STEPS]]
        answer = (sentence(upcoming[0]) + "." if len(upcoming) == 1
                  else "\n".join(f"{j + 1}. {sentence(s)}." for j, s in enumerate(upcoming)))
        for kind, task in (("procedure", None), ("procedure+", video.task)):
            samples.append(_sample(video, kind, i, (start, end), _procedure_question(len(upcoming), task),
                                   answer, upcoming, fps, video_ref))
    return samples


def _videos(args: ConvertOptions) -> list[tuple[CoinVideo, str]]:
    source = Path(args.input)
    paths = VideoPaths.from_args(args)
    out = []
    for video in parse_coin(read_json(source), source, args.subset):
        ref = paths.ref(video.youtube_id)
        if paths.exists(ref, f"database.{video.youtube_id}"):
            out.append((video, ref))
    return out


def convert_coin(args: ConvertOptions) -> list[Dialogue]:
    """COIN.json (`args.input`) → one step-stream dialogue per video."""
    return [step_stream(video, args, ref) for video, ref in _videos(args)]


def coin_benchmarks(args: ConvertOptions) -> list[dict[str, Any]]:
    """COIN.json (`args.input`) → the offline benchmark samples of every video (paths as in OUTPUT)."""
    return [s for video, ref in _videos(args) for s in coin_benchmark_samples(video, args.fps, ref)]
