"""The paper's offline COIN benchmarks: Step, Task, Next, Procedure and Procedure+ top-1 accuracy.

Protocol (the paper's public code, `data/coin/benchmarks.py`; the questions and clips are those of
`data.converters.coin.coin_benchmark_samples`):

- step: the frames of each step (from the first frame at or after its start to the first at or after its end),
  "What is the action in the video?"; the answer is the step.
- next: the same clip of every step but the last, "What is the next action for the video?"; the next step.
- task: the frames of the task's span (the record's start to end), "What is the overall activity in the video?";
  the task.
- procedure / procedure+: the clip of every step but the last, "What is the next N actions …?" (N = the up to 5
  steps that follow; one step is asked as "the next action"); procedure+ tells the task in the question ("To
  {task}, what …"). The answer lists the steps, one a line.

The question comes before the clip's frames, as in the public code (`offline.prompt_ids`), and the model answers
greedily. Its answer is mapped to the nearest category by Levenshtein distance (`offline.NearestName`): the whole
answer for step / next / task, each non-empty line (its "1. " number removed) for the procedures, whose accuracy
counts the steps predicted at their position over all the steps asked. The categories are every step (task)
name of the whole COIN.json, all subsets, sorted: the public code names such lists but does not ship how it
builds them.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from livevlm.evaluation.offline import ClipQuestion, NearestName, find_video, keep_last

if TYPE_CHECKING:
    from livevlm.model import LiveModel
    from livevlm.stream_format import StreamFormat
    from livevlm.vision import FrameEncoder

COIN_KINDS = ("step", "task", "next", "procedure", "procedure+")
MAX_NEW_TOKENS = 128  # a procedure's five steps take ~60 Llama-3 tokens
_NUMBERED = re.compile(r"^\s*\d+\s*[.)]\s*")


def coin_kinds(kinds: str | Sequence[str]) -> list[str]:
    """The benchmark kinds named by `kinds`: one name or several, each "step" or "coin-step" (…), or "coin" / "all"
    for the five.

    Raises:
        ValueError: an unknown name, listing the valid ones.
    """
    names = [kinds] if isinstance(kinds, str) else list(kinds)
    chosen: list[str] = []
    for name in names:
        if name in ("coin", "all"):
            chosen += COIN_KINDS
            continue
        kind = name.removeprefix("coin-")
        if kind not in COIN_KINDS:
            raise ValueError(f"unknown COIN benchmark {name!r}: choose among "
                             f"{', '.join('coin-' + k for k in COIN_KINDS)} or coin (all five)")
        chosen.append(kind)
    if not chosen:
        raise ValueError("no COIN benchmark named: choose among " + ", ".join("coin-" + k for k in COIN_KINDS))
    return list(dict.fromkeys(chosen))


@dataclass(frozen=True)
class CoinVocabulary:
    """The category lists answers are matched to: every step name and every task name of a COIN.json, sorted."""

    steps: tuple[str, ...]
    tasks: tuple[str, ...]

    def names(self, kind: str) -> tuple[str, ...]:
        return self.tasks if kind == "task" else self.steps


@dataclass(frozen=True)
class CoinQuestion:
    """One benchmark question: its clip and question, the kind, and the reference as indices into the kind's
    category list (one for step / next / task, the next steps in order for the procedures)."""

    clip: ClipQuestion
    kind: str
    labels: tuple[int, ...]
    answer: str  # the reference text, as the public code trains it


@dataclass
class CoinBenchmark:
    """The questions of a COIN.json, ready to run: what `build_coin_questions` returns."""

    questions: list[CoinQuestion]
    vocabulary: CoinVocabulary
    videos: int  # videos the questions are about
    skipped: list[str] = field(default_factory=list)  # videos left out because their file is missing
    max_frames: int = 0  # the cap the clips were cut to (0 = none)


@dataclass(frozen=True)
class CoinScores:
    """Top-1 accuracy of one kind: `correct` of `total` labels (one per question, or each step of a procedure)."""

    kind: str
    questions: int
    correct: int
    total: int

    @property
    def accuracy(self) -> float:
        return self.correct / self.total if self.total else float("nan")

    def as_dict(self) -> dict[str, Any]:
        return {"accuracy": self.accuracy, "correct": self.correct, "total": self.total, "questions": self.questions}


# ---------------------------------------------------------------------------------------------------
# scoring fixed predictions


def answer_lines(text: str) -> list[str]:
    """The non-empty lines of a listed answer, each without its "1." / "2)" number."""
    return [_NUMBERED.sub("", line).strip() for line in text.splitlines() if _NUMBERED.sub("", line).strip()]


def predicted_labels(kind: str, answer: str, nearest: NearestName) -> list[int]:
    """The category indices an answer says: the whole answer's nearest for step / next / task, each line's for the
    procedures (an empty answer is matched as the empty text)."""
    if kind in ("procedure", "procedure+"):
        return [nearest(line) for line in answer_lines(answer)]
    return [nearest(answer)]


def score_coin(kind: str, labels: Sequence[Sequence[int]], answers: Sequence[str], nearest: NearestName) -> CoinScores:
    """Accuracy of answers against their labels: a label counts when the answer's category at its position is it
    (a procedure's missing lines count as wrong, extra lines are ignored).

    Args:
        labels: per question, its category indices (`CoinQuestion.labels`).
        answers: per question, the model's answer text.
        nearest: the matcher over the kind's categories (`NearestName(vocabulary.names(kind))`).
    """
    if len(labels) != len(answers):
        raise ValueError(f"{len(labels)} questions but {len(answers)} answers")
    correct = total = 0
    for truth, answer in zip(labels, answers, strict=True):
        predicted = predicted_labels(kind, answer, nearest)
        correct += sum(p == t for p, t in zip(predicted, truth, strict=False))
        total += len(truth)
    return CoinScores(kind, len(labels), correct, total)


# ---------------------------------------------------------------------------------------------------
# the questions of a COIN.json


def build_coin_questions(data: str | Path, video_dir: str | Path, kinds: str | Sequence[str] = "coin", *,
                         subset: str = "testing", fps: float = 2.0, max_frames: int = 0, limit: int = 0,
                         skip_missing: bool = False) -> CoinBenchmark:
    """The questions of the videos of `data` (a COIN.json) whose subset contains `subset`.

    Args:
        video_dir: the folder of the videos, `{youtube_id}.mp4` (or another extension).
        max_frames: a clip longer than this keeps its last `max_frames` frames (0 = no cap).
        limit: only the first `limit` questions of each kind (0 = all), in the file's order.
        skip_missing: leave out the videos whose file is missing (listed in `skipped`) instead of failing.
    Raises:
        FileNotFoundError / AnnotationError: the file is missing, not JSON, or a record lacks a field (naming the
            record and the field, e.g. "COIN.json: database.<id>.annotation[2]: segment: missing").
        FileNotFoundError: a question's video is missing (naming the record and the path).
        ValueError: an unknown kind; no video of `subset`.
    """
    from livevlm.data.converters.coin import coin_benchmark_samples, parse_coin
    from livevlm.data.converters.common import read_json

    chosen = coin_kinds(kinds)
    source, folder = Path(data), Path(video_dir)
    everything = parse_coin(read_json(source), source)
    vocabulary = CoinVocabulary(tuple(sorted({s[2] for video in everything for s in video.steps})),
                                tuple(sorted({video.task for video in everything})))
    videos = [video for video in everything if subset.lower() in video.subset.lower()]
    if not videos:
        subsets = sorted({video.subset for video in everything})
        raise ValueError(f"{source}: no video with steps in subset {subset!r} (its subsets: {subsets}); choose "
                         "another subset")
    samples = [s | {"youtube_id": v.youtube_id} for v in videos for s in coin_benchmark_samples(v, fps, v.youtube_id)]
    if limit:
        samples = [s for kind in chosen for s in [t for t in samples if t["benchmark"] == kind][:limit]]
    samples = [s for s in samples if s["benchmark"] in chosen]
    paths, skipped = {}, []
    for youtube_id in dict.fromkeys(s["youtube_id"] for s in samples):
        path = find_video(folder, youtube_id)
        if path is None and not skip_missing:
            raise FileNotFoundError(f"{source}: database.{youtube_id}: video {folder / youtube_id}.mp4 does not "
                                    "exist; download it, point --video-dir at the folder of the videos, or pass "
                                    "--skip-missing to leave such videos out")
        if path is None:
            skipped.append(youtube_id)
        paths[youtube_id] = path
    questions = [_question(s, paths[s["youtube_id"]], vocabulary, fps, max_frames) for s in samples
                 if paths[s["youtube_id"]] is not None]
    return CoinBenchmark(questions, vocabulary, len({q.clip.video for q in questions}), skipped, max_frames)


def _question(sample: dict[str, Any], video: Path, vocabulary: CoinVocabulary, fps: float,
              max_frames: int) -> CoinQuestion:
    names = vocabulary.names(sample["benchmark"])
    first, count = keep_last(round(sample["start_s"] * fps), sample["num_frames"], max_frames)
    clip = ClipQuestion(sample["id"], video, first, count, sample["question"])
    return CoinQuestion(clip, sample["benchmark"], tuple(names.index(label) for label in sample["labels"]),
                        sample["answer"])


# ---------------------------------------------------------------------------------------------------
# running a model


def run_coin(model: LiveModel, fmt: StreamFormat, encoder: FrameEncoder, benchmark: CoinBenchmark, fps: float, *,
             max_new_tokens: int = MAX_NEW_TOKENS, results: str | Path | None = None,
             progress: bool = False) -> dict[str, Any]:
    """Answer every question of `benchmark` greedily and score the answers per kind.

    results: a JSONL file keeping each answer as it is made; a rerun with the same settings answers only the
        questions not in it (one written with other settings is refused).
    Returns:
        `by_kind`: per kind, accuracy / correct / total / questions; with one kind, its scores at top level too;
        `questions`, `videos`, `skipped_videos` (the ids of videos left out as missing).
    """
    from livevlm.evaluation.offline import answer_resumably

    settings = {"benchmark": "coin", "fps": fps, "max_new_tokens": max_new_tokens, "max_frames": benchmark.max_frames}
    answers = answer_resumably(model, fmt, encoder, [q.clip for q in benchmark.questions], fps, max_new_tokens,
                               settings, results, progress, desc="COIN")
    return coin_result(benchmark, answers)


def coin_result(benchmark: CoinBenchmark, answers: dict[str, str]) -> dict[str, Any]:
    """The scores of `answers` (question id → text) on `benchmark`, as `run_coin` returns them."""
    by_kind = {}
    for kind in dict.fromkeys(q.kind for q in benchmark.questions):
        asked = [q for q in benchmark.questions if q.kind == kind]
        nearest = NearestName(benchmark.vocabulary.names(kind))
        by_kind[kind] = score_coin(kind, [q.labels for q in asked], [answers[q.clip.id] for q in asked],
                                   nearest).as_dict()
    result: dict[str, Any] = dict(next(iter(by_kind.values()))) if len(by_kind) == 1 else {}
    result |= {"by_kind": by_kind, "questions": len(benchmark.questions), "videos": benchmark.videos,
               "skipped_videos": benchmark.skipped}
    return result
