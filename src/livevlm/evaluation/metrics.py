"""The paper's teacher-forced streaming metrics, computed from one forward over a ground-truth stream.

For every assistant turn of a rendered stream (`stream_format.RenderedStream`):

* LM-PPL: exp(mean cross-entropy over the turn's learned text tokens — "Assistant", ":", the response
  and eos); averaged over turns.
* LM-Correctness (the paper's LG-Match): the share of the turn's text tokens predicted correctly (argmax)
  before the first error; averaged over turns.
* TimeDiff (seconds), for turns the model must start by itself (a frame is trained to "speak" before
  them; answers to user queries are immediate and have none): |g − j| / fps, where g is the ground-truth
  frame and j the first frame since the previous turn where the model would speak; when it would not
  speak by g, the search goes on into the following frames (it is late); never speaking counts the frames
  left until the stream ends.
* Fluency: the share of the turn's predictions — its frame decisions (silent frames, then the speak frame)
  followed by its text tokens — that are correct in one unbroken run from the start; averaged over turns.

The frame decision at threshold θ is the engine's rule (`model.silent_decisions`): silent iff
P(separator) ≥ θ and the separator is the argmax (θ = 0: plain argmax; θ ≥ 0.5: just P(separator) ≥ θ).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from livevlm.model import silent_decisions
from livevlm.stream_format import IGNORE


@dataclass
class Turn:
    """Positions in a stream of one assistant turn: the frames since the previous turn and its text."""

    frame_positions: list[int] = field(default_factory=list)  # frame ends (last tokens), labelled or not
    text_positions: list[int] = field(default_factory=list)
    model_initiated: bool = False  # the last frame is labelled "speak": the model must start this turn


def split_turns(labels: list[int], frame_ends: list[int], eos_id: int) -> list[Turn]:
    """Group a stream's frames and labelled text positions into assistant turns.

    Frames after the last turn belong to no turn (TimeDiff still looks ahead into them).
    """
    turns: list[Turn] = []
    current = Turn()
    is_frame_end = set(frame_ends)
    for i, label in enumerate(labels):
        if i in is_frame_end:
            current.frame_positions.append(i)
        elif label != IGNORE:
            current.text_positions.append(i)
            if label == eos_id:
                turns.append(current)
                current = Turn()
    for turn in turns:
        last = turn.frame_positions[-1] if turn.frame_positions else None
        turn.model_initiated = last is not None and labels[last] != IGNORE and last + 1 == turn.text_positions[0]
    return turns


@dataclass
class StreamScores:
    """Per-turn values, to be pooled over a data set."""

    ppl: list[float] = field(default_factory=list)
    correctness: list[float] = field(default_factory=list)
    time_diff_s: list[float] = field(default_factory=list)
    fluency: list[float] = field(default_factory=list)

    def extend(self, other: StreamScores) -> None:
        for name in ("ppl", "correctness", "time_diff_s", "fluency"):
            getattr(self, name).extend(getattr(other, name))

    def summary(self, threshold: float) -> dict[str, float | int]:
        def mean(values: list[float]) -> float:
            return float(sum(values) / len(values)) if values else float("nan")

        return {"lm_ppl": mean(self.ppl), "lm_correctness": mean(self.correctness),
                "time_diff_s": mean(self.time_diff_s), "fluency": mean(self.fluency),
                "threshold": threshold, "turns": len(self.ppl), "timed_turns": len(self.time_diff_s)}


def leading_run(correct: list[bool]) -> int:
    """How many of `correct` are True before the first False: LM-Correctness and Fluency count only those."""
    for i, ok in enumerate(correct):
        if not ok:
            return i
    return len(correct)


def reply_correctness(header: int, truth: list[int], reply: list[int]) -> float:
    """LM-Correctness of an answer the model decoded itself (greedy, free-running) rather than one scored under
    teacher forcing: the share of the turn's labelled tokens before the first the reply gets wrong.

    Why: before its first wrong token a greedy reply has seen exactly what teacher forcing would feed it, so on
    the same history the two agree; free-running, the history is the model's own (its own notes, its own
    silences), which is what a user gets. header: the turn's labelled tokens the engine feeds rather than the
    model choosing them ("Assistant:" after a query: right by construction); truth, reply: the answer's tokens
    after them, each ending with eos.
    """
    right = leading_run([i < len(reply) and reply[i] == token for i, token in enumerate(truth)])
    return (header + right) / (header + len(truth))


def stream_scores(logits: torch.Tensor, labels: list[int], frame_ends: list[int], separator_id: int,
                  eos_id: int, fps: float, threshold: float, silent: list[bool] | None = None) -> StreamScores:
    """Metrics of one teacher-forced stream.

    Args:
        logits: `[L, V]` from one forward over the rendered stream.
        labels: the rendered stream's targets (length L); frame_ends: the positions of its frames' last tokens.
        separator_id / eos_id: the silence token and the end of a response.
        fps: frames per second (TimeDiff in seconds).
        threshold: θ of the frame decision.
        silent: the per-frame decisions, when they come from elsewhere than the frame ends' logits (a model
            that answers every frame and says whether it stays silent in words); one per frame end.
    """
    turns = split_turns(labels, frame_ends, eos_id)
    scores = StreamScores()
    if not turns:
        return scores
    if silent is None:
        silent = silent_decisions(logits[frame_ends], separator_id, threshold).tolist() if frame_ends else []
    elif len(silent) != len(frame_ends):
        raise ValueError(f"got {len(silent)} silence decisions for {len(frame_ends)} frames")
    frame_index = {position: k for k, position in enumerate(frame_ends)}
    log_probs = logits.float().log_softmax(-1)
    predicted = logits.argmax(-1).tolist()
    previous_end = -1  # frame index of the previous turn
    for turn in turns:
        text = turn.text_positions
        ce = [-log_probs[i, labels[i]].item() for i in text]
        scores.ppl.append(math.exp(sum(ce) / len(ce)))
        text_correct = [predicted[i] == labels[i] for i in text]
        scores.correctness.append(leading_run(text_correct) / len(text))
        frame_correct = []
        if turn.model_initiated:
            g = frame_index[turn.frame_positions[-1]]
            scores.time_diff_s.append(_frame_diff(silent, previous_end + 1, g) / fps)
            frame_correct = [silent[frame_index[p]] for p in turn.frame_positions[:-1]] + [not silent[g]]
        elif turn.frame_positions:  # frames before a query should be silent; the very last is unlabelled
            frame_correct = [silent[frame_index[p]] for p in turn.frame_positions[:-1]]
        run = frame_correct + text_correct
        scores.fluency.append(leading_run(run) / len(run))
        if turn.frame_positions:
            previous_end = frame_index[turn.frame_positions[-1]]
    return scores


def _frame_diff(silent: list[bool], first: int, truth: int) -> int:
    """Frames between the ground-truth speak frame and the first frame the model would speak at."""
    for j in range(first, truth + 1):
        if not silent[j]:
            return truth - j
    for j in range(truth + 1, len(silent)):
        if not silent[j]:
            return j - truth
    return len(silent) - truth
