"""PAUC (ProactiveVideoQA, arXiv 2507.09313, Eq. 1 and §3.1) on hand-computed cases; heights are judge scores
normalised to [0, 1], so the paper's start score 0.5 of its maximum 2 is 0.25."""

import pytest

from livevlm.evaluation.pauc import START_SCORE, normalise, replies_in_span, turn_pauc, turn_spans

# The paper's Figure 3: span 311-360 s, replies at 312, 328, 344, 352 s scored 0, 1, 2, 2 of 2.
PAPER_SPAN = (311.0, 360.0)
PAPER_REPLIES = [(312.0, 0.0), (328.0, 0.5), (344.0, 1.0), (352.0, 1.0)]


def test_omega_0_is_the_papers_figure_3():
    # (312-311)·0.5 + (328-312)·0 + (344-328)·1 + (360-344)·2 = 48.5 of (360-311)·2 = 98 (the paper's 0.49)
    assert turn_pauc(PAPER_SPAN, PAPER_REPLIES, omega=0.0) == pytest.approx(48.5 / 98)


def test_omega_half_moves_each_reply_halfway_to_the_span_start():
    # τ' = 311 + 0.5·(τ − 311): 311.5, 319.5, 327.5, 331.5
    # area = 0.5·0.25 + 8·0 + 8·0.5 + 4·1 + (360 − 331.5)·1 = 0.125 + 0 + 4 + 4 + 28.5 = 36.625 of 49
    assert turn_pauc(PAPER_SPAN, PAPER_REPLIES, omega=0.5) == pytest.approx(36.625 / 49)


def test_omega_1_counts_only_the_final_score():
    # every reply at 311: the curve is the last height, 1, over the whole span
    assert turn_pauc(PAPER_SPAN, PAPER_REPLIES, omega=1.0) == pytest.approx(1.0)
    assert turn_pauc((0.0, 4.0), [(1.0, 1.0), (3.0, 0.25)], omega=1.0) == pytest.approx(0.25)


def test_a_late_right_reply_counts_less_the_smaller_omega():
    # one right reply at 3 s of a 0-4 s span: ω 0: (3·0.25 + 1·1)/4 = 0.4375; ω 0.5 (at 1.5 s): (1.5·0.25 + 2.5)/4
    late = [(3.0, 1.0)]
    assert turn_pauc((0.0, 4.0), late, omega=0.0) == pytest.approx(0.4375)
    assert turn_pauc((0.0, 4.0), late, omega=0.5) == pytest.approx(0.71875)


def test_a_turn_without_a_reply_scores_the_start_height():
    assert turn_pauc((2.0, 6.0), [], omega=0.5) == START_SCORE == 0.25
    assert turn_pauc((6.0, 6.0), [], omega=0.0) == START_SCORE  # an empty span (past the stream's end)


def test_a_span_runs_to_the_next_later_turn_or_the_end():
    # turns at 2, 5, 5, 9 in a 12-s stream; the two at 5 share a span; a turn at 12 has nothing left
    assert turn_spans([2.0, 5.0, 5.0, 9.0, 12.0], end_s=12.0) == [(2.0, 5.0), (5.0, 9.0), (5.0, 9.0), (9.0, 12.0),
                                                                 (12.0, 12.0)]


def test_a_reply_on_the_next_turns_time_belongs_to_the_next_turn():
    times = [4.5, 2.0, 5.0, 1.5]
    assert replies_in_span((2.0, 5.0), times) == [1, 0]  # 2.0 and 4.5, in time order; 1.5 before, 5.0 after


def test_judge_scores_1_to_5_become_heights_0_to_1():
    assert [normalise(s) for s in (1, 2, 3, 4, 5)] == [0.0, 0.25, 0.5, 0.75, 1.0]
    with pytest.raises(ValueError, match="judge score 6 is outside 1–5"):
        normalise(6)


@pytest.mark.parametrize(("replies", "omega", "message"), [
    ([(3.0, 1.0)], 1.5, "ω must be in"),
    ([(7.0, 1.0)], 0.5, "outside its turn's span"),
    ([(3.0, 2.0)], 0.5, "height must be in"),
])
def test_bad_input_is_named(replies, omega, message):
    with pytest.raises(ValueError, match=message):
        turn_pauc((2.0, 6.0), replies, omega)
