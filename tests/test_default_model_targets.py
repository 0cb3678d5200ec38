"""benchmarks/default_model_targets.py: the questions by kind, and which token of a turn is its first wrong one."""

import pytest

from livevlm.data.converters import world as world_converter
from livevlm.data.schema import Dialogue, Turn
from livevlm.world import WorldSpec, plan_video

IGNORE = -100
EOS = 2


@pytest.fixture(scope="module")
def targets(load_script):
    return load_script("benchmarks/default_model_targets.py")


def test_every_question_the_world_asks_falls_into_one_of_its_six_templates(targets):
    asked = set()
    for seed in range(4):
        events = world_converter.parse_events(plan_video(WorldSpec(seed=seed, duration=30.0))["events"], "x")
        for time_s in range(0, 30, 2):
            for options in world_converter.question_options(events, float(time_s)).values():
                asked.update(question for question, _ in options)
    assert {targets.question_kind(question) for question in asked} == {
        "What just happened?", "What appeared last?", "How many objects are there?", "What colour is the X?",
        "How big is the X?", "What is the X doing?"}


def test_each_answer_is_paired_with_the_last_question_before_it(targets):
    turns = [Turn("user", 0.0, "What appeared last?"), Turn("assistant", 0.0, "A red star."),
             Turn("user", 2.0, "How big is the red star?"), Turn("user", 2.5, "What is the red star doing?"),
             Turn("assistant", 2.5, "It is standing still.")]
    dialogue = Dialogue("d", "v.mp4", 2.0, turns)
    assert targets.asked_before_each_answer(dialogue) == ["What appeared last?", "What is the red star doing?"]


def test_a_turns_correctness_stops_at_its_first_wrong_token(targets):
    from livevlm.evaluation.metrics import split_turns

    # positions: 0 a frame end (unlabelled), 1-3 turn one (its middle token wrong), 4 a frame end, 5-6 turn two
    labels = [IGNORE, 5, 6, EOS, IGNORE, 7, EOS]
    predicted = [0, 5, 9, 8, 0, 7, EOS]  # turn one: 9 for 6, then 8 for EOS (after the first: not counted)
    assert targets.turn_first_errors(predicted, labels, split_turns(labels, [0, 4], EOS)) == [(1 / 3, 2), (1.0, None)]


def test_a_free_running_reply_scores_its_header_and_the_tokens_before_its_first_wrong_one():
    from livevlm.evaluation.metrics import reply_correctness

    truth = [5, 6, 7, EOS]  # "It is red." and eos, after a 3-token header the engine feeds
    assert reply_correctness(3, truth, [5, 6, 7, EOS]) == 1.0
    assert reply_correctness(3, truth, [5, 9, 7, EOS]) == 4 / 7  # the header and the first token
    assert reply_correctness(3, truth, [5, 6]) == 5 / 7  # a reply cut short: the missing tokens are wrong
    assert reply_correctness(3, truth, []) == 3 / 7  # no reply at all: the header alone


def test_narration_wording_counts_exact_responses_and_the_kind_of_each_first_wrong_word(targets):
    turns = [Turn("user", 0.0, "Please narrate the video in real time."),
             Turn("assistant", 0.0, "Sure."),  # the request's answer: not matched for timing
             Turn("assistant", 1.0, "A large red star appears on the left."),
             Turn("assistant", 5.0, "The red star starts moving up."),
             Turn("assistant", 9.0, "The red star turns blue."),
             Turn("assistant", 14.0, "The blue star leaves the frame at the top.")]
    dialogue = Dialogue("d", "v.mp4", 2.0, turns, task="narration")
    said = [(1.0, "A large red star appears on the left."),  # word for word
            (5.5, "The red star starts moving to the left."),  # "up" → "to": where it goes
            (9.0, "The red star turns green."),  # the new colour
            (14.5, "The blue star leaves the frame."),  # "at" → ".": where
            (20.0, "The blue star appears.")]  # matches no turn
    record = {"id": "d", "task": "narration", "said": [{"time_s": t, "text": text} for t, text in said]}
    wording = targets.sentence_errors([record], {"d": dialogue}, 1.0)
    assert wording["matched"] == 4 and wording["exact"] == 1
    assert dict(wording["first_wrong"]) == {"place or direction": 2, "colour": 1}


def test_a_response_that_stops_short_of_its_turn_is_a_length_error(targets):
    turns = [Turn("user", 0.0, "Please narrate the video in real time."), Turn("assistant", 0.0, "Sure."),
             Turn("assistant", 3.0, "The red star grows.")]
    record = {"id": "d", "task": "narration", "said": [{"time_s": 3.0, "text": "The red star"}]}
    wording = targets.sentence_errors([record], {"d": Dialogue("d", "v.mp4", 2.0, turns, task="narration")}, 1.0)
    assert wording == {"matched": 1, "exact": 0, "first_wrong": [("length", 1)]}
