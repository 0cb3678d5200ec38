"""The streaming metrics on hand-built logits, with values computed by hand."""

import math

import pytest
import torch

from livevlm.evaluation.metrics import stream_scores
from livevlm.model import silent_decisions

SEP, SPEAK, EOS, A, B = 0, 1, 2, 3, 4
IGN = -100


def rows(*probabilities):
    """Logits whose softmax is exactly the given probability rows."""
    return torch.log(torch.tensor(probabilities, dtype=torch.float64))


# Positions: 0, 1, 2 frame ends (silent, silent, speak), 3-5 the response "a b <eos>", 6 a trailing frame.
LABELS = [SEP, SEP, SPEAK, A, B, EOS, SEP]
FRAME_ENDS = [0, 1, 2, 6]
LOGITS = rows(
    [0.9, 0.1, 0, 0, 0],  # frame 0: silent (correct)
    [0.3, 0.7, 0, 0, 0],  # frame 1: speaks one frame early
    [0.2, 0.8, 0, 0, 0],  # frame 2: speaks (the ground truth)
    [0, 0, 0, 0.5, 0.5],  # "a": p = 1/2, argmax a (tie -> first index) -> correct
    [0, 0, 0.25, 0.5, 0.25],  # "b": p = 1/4, argmax a -> wrong
    [0.25, 0, 0.5, 0.25, 0],  # eos: p = 1/2 -> correct
    [1.0, 0, 0, 0, 0],
)


def test_metrics_by_hand():
    scores = stream_scores(LOGITS, LABELS, FRAME_ENDS, SEP, EOS, fps=2.0, threshold=0.5)
    summary = scores.summary(0.5)
    assert summary["lm_ppl"] == pytest.approx(2 ** (4 / 3))  # exp((ln2 + ln4 + ln2) / 3)
    assert summary["lm_correctness"] == pytest.approx(1 / 3)  # a ok, then b wrong
    assert summary["time_diff_s"] == pytest.approx(0.5)  # spoke at frame 1 instead of 2, at 2 fps
    assert summary["fluency"] == pytest.approx(1 / 6)  # frame 0 right, frame 1 wrong: 1 of 3 frames + 3 tokens


def test_late_speaker_is_found_by_looking_ahead():
    logits = LOGITS.clone()
    logits[1] = rows([0.9, 0.1, 0, 0, 0])[0]
    logits[2] = rows([0.9, 0.1, 0, 0, 0])[0]
    logits[6] = rows([0.1, 0.9, 0, 0, 0])[0]  # speaks only at the trailing frame: one frame (0.5 s) late
    scores = stream_scores(logits, LABELS, FRAME_ENDS, SEP, EOS, fps=2.0, threshold=0.5)
    assert scores.time_diff_s == [0.5]
    assert scores.fluency == [2 / 6]


def test_threshold_zero_is_plain_argmax_and_high_threshold_is_probability():
    logits = rows([0.6, 0.4, 0, 0, 0], [0.45, 0.1, 0.45, 0, 0])
    assert silent_decisions(logits, SEP, 0.0).tolist() == [True, True]  # sep is (first) argmax in both
    assert silent_decisions(logits, SEP, 0.5).tolist() == [True, False]
    assert silent_decisions(logits, SEP, 0.725).tolist() == [False, False]


def test_answers_to_queries_have_no_time_diff():
    # frame 0 silent, frame 1 precedes a query (unlabelled), then the answer "a <eos>"
    labels = [SEP, IGN, IGN, IGN, A, EOS]
    logits = rows([0.9, 0.1, 0, 0, 0], [0.5, 0.5, 0, 0, 0], [1, 0, 0, 0, 0], [1, 0, 0, 0, 0],
                  [0, 0, 0, 1.0, 0], [0, 0, 1.0, 0, 0])
    scores = stream_scores(logits, labels, [0, 1], SEP, EOS, fps=2.0, threshold=0.5)
    assert scores.time_diff_s == []
    assert scores.correctness == [1.0] and scores.fluency == [1.0]
    assert scores.ppl == [pytest.approx(math.exp(0.0))]


def test_decisions_given_from_outside_replace_the_frame_end_rule():
    # a per-frame model's decisions: silent at frames 0 and 1, speaks at 2 (the truth) -> on time
    scores = stream_scores(LOGITS, LABELS, FRAME_ENDS, SEP, EOS, fps=2.0, threshold=0.5,
                           silent=[True, True, False, True])
    assert scores.time_diff_s == [0.0]
    assert scores.fluency == [4 / 6]  # 3 frames right, "a" right, "b" wrong
    with pytest.raises(ValueError, match="3 silence decisions for 4 frames"):
        stream_scores(LOGITS, LABELS, FRAME_ENDS, SEP, EOS, fps=2.0, threshold=0.5, silent=[True] * 3)
