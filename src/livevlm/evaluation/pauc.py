"""PAUC, ProactiveVideoQA's Proactive Area Under Curve: how right the replies to a turn are, and how early.

ProactiveVideoQA (Wang et al., arXiv 2507.09313, §3 and §3.1). For one ground-truth turn with a reply span
[t_start, t_end) and P replies at τ_1 < … < τ_P inside it, s_p is the judge's score of the replies given so
far ({reply_1 … reply_p}, concatenated) against the turn, on [0, S]. The score curve is a step function:
s_0 (the paper's 0.5 with S = 2: saying nothing beats saying something wrong) until τ_1, then s_p from τ_p
on, held to t_end. PAUC = area under it / ((t_end − t_start)·S), Eq. (1):

    [(τ_1 − t_start)·s_0 + Σ_{p<P} (τ_{p+1} − τ_p)·s_p + (t_end − τ_P)·s_P] / ((t_end − t_start)·S)

ω ∈ [0, 1] weighs timing against content by moving every reply towards the span's start,
τ'_p = t_start + (1 − ω)(τ_p − t_start), before the area is taken: ω = 0 is Eq. (1) as is (a late reply
counts for little), ω = 1 puts every reply at t_start (only s_P, the whole answer's score, counts). The
paper recommends ω = 0.5. A turn without a reply in its span scores s_0 / S, as in the paper's code.

Here scores are normalised to [0, 1] (y = s / S, so s_0 / S = 0.25), which makes PAUC the mean height of
the curve. livevlm's dialogues give each turn a time, not a span: `turn_spans` makes the span run from the
turn to the next later turn (or the end of the stream). docs/evaluation.md lists the differences.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

OMEGAS = (0.0, 0.5, 1.0)  # reported: timing only, the paper's default, content only
START_SCORE = 0.25  # the curve before the first reply: the paper's 0.5 of its maximum 2


def omega_key(omega: float) -> str:
    """How an ω is written as a JSON key: "0", "0.5", "1"."""
    return f"{omega:g}"


def normalise(score: float, lowest: int = 1, highest: int = 5) -> float:
    """A judge's score on lowest…highest as a height in [0, 1] (1–5 → (score − 1) / 4).

    Raises:
        ValueError: the score is outside the scale.
    """
    if not lowest <= score <= highest:
        raise ValueError(f"judge score {score} is outside {lowest}–{highest}")
    return (score - lowest) / (highest - lowest)


def turn_spans(turn_times: Sequence[float], end_s: float) -> list[tuple[float, float]]:
    """Each turn's reply span [its time, the next later turn's time), the last one ending at `end_s`.

    A turn is due from its time until something new is due. Turns at the same time share one span; a turn
    at or after `end_s` (past the streamed frames) gets an empty span.
    """
    later = sorted(set(turn_times))
    spans = []
    for t in turn_times:
        after = [u for u in later if u > t]
        spans.append((t, max(t, min(after[0], end_s) if after else end_s)))
    return spans


def replies_in_span(span: tuple[float, float], reply_times: Sequence[float]) -> list[int]:
    """Indices of the replies inside [start, end), in time order (a reply on the next turn's time is its)."""
    start, end = span
    inside = [j for j, t in enumerate(reply_times) if start - 1e-9 <= t < end - 1e-9]
    return sorted(inside, key=lambda j: reply_times[j])


def turn_pauc(span: tuple[float, float], replies: Sequence[tuple[float, float]], omega: float = 0.5,
              start_score: float = START_SCORE) -> float:
    """PAUC of one turn (Eq. 1 with ω), in [0, 1].

    Args:
        span: the turn's reply span (start_s, end_s).
        replies: (time_s, height) of each reply inside the span, height = the normalised score of the
            replies accumulated up to it (`normalise`); any order.
        omega: ω ∈ [0, 1]; 0 = timing counts fully, 1 = only the final score counts.
        start_score: the curve's height before the first reply.
    Returns:
        the area under the step curve over the span's length; `start_score` without a reply (or span).
    Raises:
        ValueError: ω or a height outside [0, 1], or a reply outside the span.
    """
    start, end = span
    if not 0.0 <= omega <= 1.0:
        raise ValueError(f"PAUC's ω must be in [0, 1], got {omega}")
    for time_s, height in replies:
        if not 0.0 <= height <= 1.0 or math.isnan(height):
            raise ValueError(f"a reply's height must be in [0, 1] (a normalised judge score), got {height}")
        if not start - 1e-9 <= time_s <= end + 1e-9:
            raise ValueError(f"a reply at {time_s:g} s is outside its turn's span [{start:g}, {end:g}) s")
    if not replies or end <= start:
        return start_score
    # stable: replies at one time keep their order (the later one holds the more accumulated score)
    moved = sorted(((start + (1.0 - omega) * (time_s - start), height) for time_s, height in replies),
                   key=lambda reply: reply[0])
    area, previous_time, previous_height = 0.0, start, start_score
    for time_s, height in [*moved, (end, moved[-1][1])]:
        area += (time_s - previous_time) * previous_height
        previous_time, previous_height = time_s, height
    return area / (end - start)
