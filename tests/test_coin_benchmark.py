"""The paper's offline COIN benchmarks: the questions built from a COIN.json, the scoring of fixed answers by hand,
bad input, and one run of `livevlm evaluate --benchmark coin` on a tiny random model."""

import json
import shutil

import pytest

from livevlm.cli import run
from livevlm.data.converters.common import AnnotationError
from livevlm.evaluation.coin_benchmark import (
    COIN_KINDS,
    build_coin_questions,
    coin_kinds,
    score_coin,
)
from livevlm.evaluation.offline import NearestName, keep_last, levenshtein, prompt_ids

# COIN.json's real layout: two videos of the test split, one of the training split (its steps still name categories)
COIN = {"database": {
    "vid1": {"class": "ReplaceBatteryOnKey", "recipe_type": 1, "subset": "testing", "duration": 20.0,
             "start": 2.0, "end": 18.0, "url": "https://www.youtube.com/watch?v=vid1",
             "annotation": [{"id": "1", "segment": [2.0, 5.2], "label": "open the cover"},
                            {"id": "2", "segment": [6.0, 9.0], "label": "take out the old battery"},
                            {"id": "3", "segment": [10.0, 18.0], "label": "put in the new battery"}]},
    "vid2": {"class": "MakeCoffee", "recipe_type": 2, "subset": "testing", "duration": 5.0, "start": 0.0,
             "end": 5.0, "annotation": [{"id": "1", "segment": [0.0, 2.0], "label": "pour water"},
                                        {"id": "2", "segment": [2.5, 5.0], "label": "add coffee"}]},
    "vid3": {"class": "PlantTree", "recipe_type": 3, "subset": "training", "duration": 9.0, "start": 0.0,
             "end": 9.0, "annotation": [{"id": "1", "segment": [0.0, 9.0], "label": "dig a hole"}]},
}}
STEPS = ["add coffee", "dig a hole", "open the cover", "pour water", "put in the new battery",
         "take out the old battery"]


@pytest.fixture
def coin(tmp_path):
    """COIN.json and a video folder holding (empty stand-ins for) the two test videos."""
    (tmp_path / "videos").mkdir()
    for name in ("vid1.mp4", "vid2.webm"):
        (tmp_path / "videos" / name).write_bytes(b"")
    (tmp_path / "COIN.json").write_text(json.dumps(COIN))
    return tmp_path / "COIN.json", tmp_path / "videos"


# ---------------------------------------------------------------------------------------------------
# scoring fixed answers


def test_levenshtein_by_hand():
    assert levenshtein("kitten", "sitting") == 3  # k→s, e→i, +g
    assert levenshtein([1, 2, 3, 4], [1, 3, 3]) == 2  # 2→3, -4
    assert levenshtein("", "abc") == 3
    assert levenshtein("kitten", "sitting", bound=1) == 2  # past the bound: only "more than 1" is known


def test_an_answer_is_mapped_to_the_nearest_category_ignoring_case_and_full_stop():
    nearest = NearestName(STEPS)
    assert nearest("Open the cover.") == STEPS.index("open the cover")
    assert nearest("Put in new battery") == STEPS.index("put in the new battery")  # 4 letters off
    assert NearestName(["ab", "ba"])("aa") == 0  # a tie goes to the earlier name


def test_step_accuracy_by_hand():
    nearest = NearestName(STEPS)
    labels = [(STEPS.index("open the cover"),), (STEPS.index("pour water"),), (STEPS.index("add coffee"),)]
    scores = score_coin("step", labels, ["Open the cover.", "Pour the water.", "Dig a hole."], nearest)
    assert (scores.correct, scores.total, scores.questions) == (2, 3, 3) and scores.accuracy == 2 / 3


def test_procedure_accuracy_counts_each_step_at_its_position():
    """First question: steps 1 right, 2 wrong (a third line is ignored); second: no answer, its step is wrong."""
    nearest = NearestName(STEPS)
    take, put = STEPS.index("take out the old battery"), STEPS.index("put in the new battery")
    answers = ["1. Take out the old battery.\n2. Open the cover.\n3. Pour water.", ""]
    scores = score_coin("procedure", [(take, put), (put,)], answers, nearest)
    assert (scores.correct, scores.total) == (1, 3)


# ---------------------------------------------------------------------------------------------------
# the questions


def test_the_questions_follow_the_public_protocol(coin):
    data, videos = coin
    benchmark = build_coin_questions(data, videos, "coin")
    assert benchmark.vocabulary.steps == tuple(STEPS)  # every subset's steps, sorted
    assert benchmark.vocabulary.tasks == ("make coffee", "plant tree", "replace battery on key")
    counts = {kind: sum(q.kind == kind for q in benchmark.questions) for kind in COIN_KINDS}
    assert counts == {"step": 5, "task": 2, "next": 3, "procedure": 3, "procedure+": 3}  # vid3 is training
    by_id = {q.clip.id: q for q in benchmark.questions}
    step = by_id["vid1-step-0"]  # [2.0, 5.2] s at 2 fps: frames ceil(4.0) = 4 … ceil(10.4) = 11
    assert (step.clip.first_frame, step.clip.num_frames, step.clip.video) == (4, 8, videos / "vid1.mp4")
    assert step.clip.question == "What is the action in the video? Format your answer concisely. No extra text output."
    plus = by_id["vid1-procedure+-0"]
    assert plus.clip.question.startswith("To replace battery on key, what is the next 2 actions for the video?")
    assert plus.labels == (STEPS.index("take out the old battery"), STEPS.index("put in the new battery"))
    assert by_id["vid2-task-0"].clip.video == videos / "vid2.webm"  # another extension is found
    assert benchmark.videos == 2 and benchmark.skipped == []


def test_the_prompt_puts_the_question_before_the_frames(tiny_tokenizer):
    from livevlm.config import FormatConfig
    from livevlm.stream_format import StreamFormat, register_placeholder

    register_placeholder(tiny_tokenizer)
    fmt = StreamFormat(tiny_tokenizer, FormatConfig(), tokens_per_frame=2)
    text = tiny_tokenizer.decode(prompt_ids(fmt, "What is the action?", 2))
    assert text.endswith("\nUser: What is the action?\n[<v><v>,<v><v>]\nAssistant:")


def test_the_greedy_answer_equals_decoding_without_a_cache(tiny_tokenizer):
    """The cached decoding loop against a full forward of the whole sequence for every token (atol = 0 on the
    argmax: the same tokens)."""
    import torch

    from conftest import build_tiny_llm
    from livevlm.config import FormatConfig, ModelConfig
    from livevlm.evaluation.offline import greedy_answer
    from livevlm.model import build_live_model
    from livevlm.stream_format import StreamFormat, register_placeholder

    placeholder = register_placeholder(tiny_tokenizer)
    fmt = StreamFormat(tiny_tokenizer, FormatConfig(), tokens_per_frame=2)
    model = build_live_model(ModelConfig(finetune="connector"), build_tiny_llm(len(tiny_tokenizer)), 8, placeholder)
    frames = torch.randn(3, 2, 8, generator=torch.Generator().manual_seed(0))  # [T, N, D]
    ids = prompt_ids(fmt, "What is the action?", 3)
    with torch.no_grad():
        for _ in range(6):
            logits, _, _ = model(torch.tensor([ids]), frames)
            logits[0, -1, placeholder] = -float("inf")
            ids.append(int(logits[0, -1].argmax()))
    expected = ids[len(prompt_ids(fmt, "What is the action?", 3)):]
    expected = expected[:expected.index(fmt.eos_id)] if fmt.eos_id in expected else expected
    assert greedy_answer(model, fmt, frames, "What is the action?", 6) == \
        tiny_tokenizer.decode(expected, skip_special_tokens=True).strip()


def test_a_clip_longer_than_max_frames_keeps_its_last_frames(coin):
    assert keep_last(4, 8, 3) == (9, 3) and keep_last(4, 8, 0) == (4, 8)
    step = build_coin_questions(*coin, "coin-step", max_frames=3).questions[0]
    assert (step.clip.first_frame, step.clip.num_frames) == (9, 3)


def test_limit_takes_the_first_questions_of_each_kind(coin):
    benchmark = build_coin_questions(*coin, ["coin-step", "coin-next"], limit=2)
    assert [q.clip.id for q in benchmark.questions] == ["vid1-step-0", "vid1-step-1", "vid1-next-0", "vid1-next-1"]


# ---------------------------------------------------------------------------------------------------
# bad input


def test_a_step_without_a_segment_is_named(tmp_path):
    broken = json.loads(json.dumps(COIN))
    del broken["database"]["vid1"]["annotation"][1]["segment"]
    (tmp_path / "COIN.json").write_text(json.dumps(broken))
    with pytest.raises(AnnotationError, match=r"COIN.json: database.vid1.annotation\[1\]: segment: missing"):
        build_coin_questions(tmp_path / "COIN.json", tmp_path)


def test_a_missing_video_names_the_record_and_the_path(coin):
    data, videos = coin
    (videos / "vid2.webm").unlink()
    with pytest.raises(FileNotFoundError, match=r"database.vid2: video .*videos/vid2.mp4 does not exist"):
        build_coin_questions(data, videos)
    benchmark = build_coin_questions(data, videos, skip_missing=True)
    assert benchmark.skipped == ["vid2"] and {q.clip.video.name for q in benchmark.questions} == {"vid1.mp4"}


def test_an_unknown_kind_lists_the_valid_ones():
    assert coin_kinds("coin") == list(COIN_KINDS) and coin_kinds(["step", "coin-task"]) == ["step", "task"]
    with pytest.raises(ValueError, match="coin-step, coin-task, coin-next, coin-procedure, coin-procedure\\+"):
        coin_kinds("coin-steps")


@pytest.mark.parametrize("extra, said", [([], "needs the annotations and their videos"),
                                         (["--video-dir", "."], "drop --threshold")])
def test_the_command_refuses_bad_options_before_loading(coin, capsys, extra, said):
    data, _ = coin
    args = ["evaluate", "--benchmark", "coin-step", "--data", str(data), *extra]
    assert run(args + (["--threshold", "0.5"] if extra else [])) == 2
    err = capsys.readouterr().err
    assert said in err and len(err.strip().splitlines()) == 1


def test_the_command_reports_a_bad_file_in_one_line_before_loading(coin, capsys, monkeypatch):
    import livevlm

    data, videos = coin
    broken = json.loads(json.dumps(COIN))
    del broken["database"]["vid2"]["annotation"][0]["segment"]
    data.write_text(json.dumps(broken))
    monkeypatch.setattr(livevlm, "load", lambda *a, **k: pytest.fail("loaded the model before checking the data"))
    assert run(["evaluate", "--benchmark", "coin-task", "--data", str(data), "--video-dir", str(videos)]) == 2
    err = capsys.readouterr().err
    assert "database.vid2.annotation[0]: segment: missing" in err and len(err.strip().splitlines()) == 1


# ---------------------------------------------------------------------------------------------------
# end to end


def test_the_command_answers_every_question_and_prints_strict_json(tiny_checkpoint, tmp_path, capsys, monkeypatch):
    """All five kinds over one 6-s video: 3 steps → 3 step, 1 task, 2 next, 2 procedure, 2 procedure+ questions.
    A second run with the same results file answers nothing again and prints the same."""
    ckpt, video = tiny_checkpoint
    (tmp_path / "videos").mkdir()
    shutil.copy(video, tmp_path / "videos" / "w1.mp4")
    data = {"database": {"w1": {"class": "MoveShapes", "subset": "testing", "duration": 6.0, "start": 0.0,
                                "end": 6.0, "annotation": [{"id": "1", "segment": [0.0, 1.5], "label": "draw a circle"},
                                                           {"id": "2", "segment": [2.0, 3.5], "label": "move it"},
                                                           {"id": "3", "segment": [4.0, 6.0], "label": "erase it"}]}}}
    (tmp_path / "COIN.json").write_text(json.dumps(data))
    command = ["evaluate", "--benchmark", "coin", "--model", str(ckpt), "--device", "cpu", "--data",
               str(tmp_path / "COIN.json"), "--video-dir", str(tmp_path / "videos"), "--max-new-tokens", "3",
               "--results", str(tmp_path / "answers.jsonl")]

    def strict(text):
        return json.loads(text, parse_constant=lambda c: pytest.fail(f"not JSON: {c}"))

    assert run(command) == 0
    result = strict(capsys.readouterr().out)
    assert {k: v["questions"] for k, v in result["by_kind"].items()} == \
        {"task": 1, "step": 3, "next": 2, "procedure": 2, "procedure+": 2}
    assert result["by_kind"]["procedure"]["total"] == 3  # 2 + 1 steps asked
    assert (result["questions"], result["videos"], result["skipped_videos"]) == (10, 1, [])
    assert all(0 <= v["accuracy"] <= 1 for v in result["by_kind"].values())
    assert result["benchmark"]["name"] == "coin" and result["benchmark"]["max_new_tokens"] == 3
    assert len((tmp_path / "answers.jsonl").read_text().splitlines()) == 10

    import livevlm.evaluation.offline as offline

    monkeypatch.setattr(offline, "greedy_answer", lambda *a: pytest.fail("answered a question twice"))
    assert run(command) == 0
    assert strict(capsys.readouterr().out) == result
