"""Free-running timing match: events ↔ responses within a tolerance, one to one (and the looser coverage)."""

import math

import pytest

from livevlm.evaluation.free_running import (
    TimingScores,
    event_frames,
    match_one_to_one,
    match_timing,
    reminder_outcome,
    trigger_scores,
    word_f1,
)


def test_events_on_the_same_frame_count_once_and_are_ceiled_to_the_grid():
    events = [{"time_s": 3.1, "text": "a"}, {"time_s": 3.4, "text": "b"}, {"time_s": 7.0, "text": "c"}]
    grouped = event_frames(events, fps=2.0, duration_s=30.0)
    assert [(t, [e["text"] for e in g]) for t, g in grouped] == [(3.5, ["a", "b"]), (7.0, ["c"])]


def test_matching_is_one_to_one_within_tolerance():
    red_circle = {"object": {"shape": "circle", "color": "red"}}
    events = [(2.0, [red_circle]), (5.0, [red_circle]), (20.0, [red_circle])]
    responses = [(2.5, "A red circle appears."), (3.0, "Something."), (9.0, "Late.")]
    scores = match_timing(events, responses, tolerance_s=1.0)
    assert (scores.events, scores.responses, scores.matched, scores.named) == (3, 3, 1, 1)
    assert scores.recall == pytest.approx(1 / 3) and scores.precision == pytest.approx(1 / 3)
    assert scores.mean_abs_offset_s == pytest.approx(0.5)


def test_coverage_counts_events_a_shared_response_is_near():
    # one response at 2.5 s is within 1 s of both events; one to one it matches only the first
    events = [(2.0, []), (3.0, []), (9.0, [])]
    scores = match_timing(events, [(2.5, "Two things happen.")], tolerance_s=1.0)
    assert (scores.matched, scores.covered) == (1, 2)
    assert scores.recall == pytest.approx(1 / 3) and scores.coverage == pytest.approx(2 / 3)


def test_pooled_scores_sum_the_counts_and_weight_the_offset_by_matches():
    a = TimingScores(events=4, responses=3, matched=2, named=1, mean_abs_offset_s=0.5, covered=3)
    b = TimingScores(events=2, responses=2, matched=1, named=1, mean_abs_offset_s=0.2, covered=1)
    empty = TimingScores(0, 0, 0, 0, math.nan, 0)
    pooled = empty + a + b
    assert (pooled.events, pooled.responses, pooled.matched, pooled.named, pooled.covered) == (6, 5, 3, 2, 4)
    assert pooled.mean_abs_offset_s == pytest.approx((2 * 0.5 + 1 * 0.2) / 3)


@pytest.mark.parametrize(("responses", "kind", "offset", "extra"), [
    ([], "never", None, 0),
    ([11.0], "on_time", -0.5, 0),
    ([12.5, 20.0], "on_time", 1.0, 1),  # exactly at the tolerance still counts; the second is chatter
    ([8.0, 11.5], "early", -3.5, 1),  # a false alarm decides, even if the model speaks again on time
    ([13.0], "late", 1.5, 0),
])
def test_a_reminder_is_judged_by_its_first_spontaneous_response(responses, kind, offset, extra):
    outcome = reminder_outcome(11.5, responses, tolerance_s=1.0)
    assert (outcome.kind, outcome.extra) == (kind, extra)
    assert outcome.offset_s == (pytest.approx(offset) if offset is not None else None)


# ---------------------------------------------------------------------------------------------------
# one-to-one trigger matching, duplicates, TimeDiff, word F1 (hand-computed)


def test_the_matching_takes_the_most_pairs_not_the_nearest_response():
    # nearest-first would give turn 5.0 the response at 5.0 and leave 5.9 without one (4.2 is 1.7 s away)
    assert match_one_to_one([5.0, 5.9], [4.2, 5.0]) == [(0, 0), (1, 1)]


def test_among_the_most_pairs_the_matching_takes_the_smallest_offsets():
    # both responses fit both turns; pairing 1.0-1.2 and 2.0-2.1 (0.3 s) beats 1.0-2.1, 2.0-1.2 (1.9 s)
    assert match_one_to_one([2.0, 1.0], [2.1, 1.2]) == [(1, 1), (0, 0)]


def test_trigger_scores_by_hand():
    # turns at 1, 4, 10; responses at 1.5 (turn 1), 2.0 (again turn 1: a duplicate), 4.0 (turn 4), 7.0 (nothing)
    scores = trigger_scores([1.0, 4.0, 10.0], [1.5, 2.0, 4.0, 7.0], tolerance_s=1.0)
    assert (scores.turns, scores.responses, scores.matched, scores.duplicates) == (3, 4, 2, 1)
    assert scores.precision == 2 / 4 and scores.recall == 2 / 3
    assert scores.f1 == pytest.approx(2 * (1 / 2) * (2 / 3) / (1 / 2 + 2 / 3))  # 4/7
    assert scores.time_diff_s == pytest.approx((0.5 + 0.0) / 2)
    assert scores.duplicate_ratio == 1 / 4


def test_trigger_scores_pool_by_adding_counts():
    pooled = trigger_scores([1.0], [1.0]) + trigger_scores([3.0, 6.0], [3.5])
    assert (pooled.turns, pooled.responses, pooled.matched) == (3, 2, 2)
    assert pooled.time_diff_s == pytest.approx(0.25) and pooled.recall == 2 / 3


def test_no_responses_gives_no_precision_and_zero_recall():
    scores = trigger_scores([1.0, 2.0], [])
    assert math.isnan(scores.precision) and scores.recall == 0.0 and math.isnan(scores.f1)


def test_word_f1_by_hand():
    # prediction: a red circle appears (4 words); reference: a green circle appears on the left (7 words)
    # shared: a, circle, appears = 3 -> P 3/4, R 3/7, F1 = 2·(3/4)(3/7)/(3/4 + 3/7) = 6/11
    assert word_f1("A red circle appears.", "A green circle appears on the left.") == pytest.approx(6 / 11)
    assert word_f1("Red, red!", "red") == pytest.approx(2 / 3)  # a repeat counts: P 1/2, R 1
    assert word_f1("", "") == 1.0 and word_f1("x", "") == 0.0


def test_world_object_words_and_naming():
    from livevlm.evaluation.world_benchmark import names_object, object_words

    assert object_words("A large red square appears; two blue circles leave.") == {"red", "square", "blue", "circle"}
    assert names_object("A red square appears at the top.", "A large red square appears at the bottom left.")
    assert names_object("A red circle appears.", "A large red square appears.") is False  # the wrong shape
    assert names_object("A blue star leaves.", "A red square appears. A blue star leaves.")  # one of two events
    assert names_object("The blue star stops.", "The green star turns blue.")  # its colour before or after
    assert names_object("The green square stops.", "The green star turns blue.") is False
    assert names_object("Something appears.", "It stops.") is None  # the turn names nothing to check
