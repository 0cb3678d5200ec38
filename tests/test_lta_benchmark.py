"""Ego4D long-term action anticipation: the windows built from an fho_lta JSON, ED@20 of fixed answers by hand,
bad input, and one run through `LiveVLM.evaluate_lta` on a tiny random model."""

import json
import shutil

import pytest

from livevlm.data.converters.common import AnnotationError
from livevlm.evaluation.lta_benchmark import (
    NO_ACTION,
    LtaVocabulary,
    answer_actions,
    build_lta_questions,
    edit_distance_at_z,
    lta_name,
    score_lta,
)

TAXONOMY = {"verbs": ["take_(pick,_grab,_get)", "turn_off_(turn_off,_switch_off)", "cut_(trim,_slice,_chop)"],
            "nouns": ["knife_(knife,_machete)", "light_(lamp,_bulb)", "tomato", "nut_(food)"]}


def lta_records(clip_uid: str, count: int, *, step: float = 1.0, parent_start: float = 100.0) -> list[dict]:
    """`count` actions of one clip in fho_lta_val.json's layout: action k from k·step + 0.3·step to k·step +
    0.9·step (clip time), verb k % 3, noun k % 4; listed in reverse, as nothing promises the file's order."""
    return [{"clip_uid": clip_uid, "video_uid": f"video-{clip_uid}", "clip_idx": 0, "action_idx": k,
             "clip_parent_start_sec": parent_start, "clip_parent_end_sec": parent_start + 480.0,
             "clip_parent_start_frame": int(parent_start * 30), "action_clip_start_sec": k * step + 0.3 * step,
             "action_clip_end_sec": k * step + 0.9 * step, "action_clip_start_frame": 0, "action_clip_end_frame": 0,
             "verb": TAXONOMY["verbs"][k % 3], "verb_label": k % 3, "noun": TAXONOMY["nouns"][k % 4],
             "noun_label": k % 4} for k in reversed(range(count))]


@pytest.fixture
def lta(tmp_path):
    """fho_lta_val.json with clip A (29 actions: 2 windows) and clip B (27: too few), its taxonomy next to it, and a
    folder with (an empty stand-in for) clip A's full video."""
    data = {"version": "v2", "split": "val", "clips": lta_records("A", 29) + lta_records("B", 27)}
    (tmp_path / "fho_lta_val.json").write_text(json.dumps(data))
    (tmp_path / "fho_lta_taxonomy.json").write_text(json.dumps(TAXONOMY))
    (tmp_path / "videos").mkdir()
    (tmp_path / "videos" / "video-A.mp4").write_bytes(b"")
    return tmp_path / "fho_lta_val.json", tmp_path / "videos"


def vocabulary() -> LtaVocabulary:
    return LtaVocabulary({i: lta_name(r) for i, r in enumerate(TAXONOMY["verbs"])},
                         {i: lta_name(r) for i, r in enumerate(TAXONOMY["nouns"])})


# ---------------------------------------------------------------------------------------------------
# scoring fixed answers


def test_edit_distance_at_z_by_hand():
    truth = [1, 3, 3, 4]
    assert edit_distance_at_z([[1, 2, 3, 4]], truth, z=4) == 0.25  # one substitution over Z = 4
    assert edit_distance_at_z([[9, 9, 9, 9], [3, 3, 4, 4]], truth, z=4) == 0.5  # -1 … +4: 2; the best candidate
    assert edit_distance_at_z([[1, 3, 3, 4, 7]], truth + [8], z=4) == 0.0  # only the first Z count


def test_taxonomy_rows_become_the_names_answers_use():
    assert lta_name("take_(pick,_grab,_get)") == "take"
    assert lta_name("turn_off_(turn_off,_switch_off)") == "turn off"
    assert lta_name("tomato") == "tomato" and lta_name("nut_(food)") == "nuts"


def test_an_answer_becomes_twenty_actions():
    """Exact names, a two-word verb, misspellings; padded with the last action; no action at all is all wrong."""
    actions = answer_actions("1. Take knife.\n2. Turn off light.\n\n3. Cutt tomatos", vocabulary())
    assert actions[:3] == [(0, 0), (1, 1), (2, 2)] and actions[3:] == [(2, 2)] * 17
    assert answer_actions("", vocabulary()) == [NO_ACTION] * 20


def test_lta_scores_by_hand():
    """Question 1 is predicted exactly. Question 2 has the right verbs but the nouns of its first two actions
    swapped (0, 1 → 1, 0): 2 substitutions, so its noun and action ED are 2/20 and its verb ED 0."""
    truth = [(k % 3, k % 4) for k in range(20)]
    swapped = [(0, 1), (1, 0)] + truth[2:]
    scores = score_lta([[truth], [swapped]], [truth, truth])
    assert scores.verb_ed == 0.0
    assert scores.noun_ed == pytest.approx((0 + 2 / 20) / 2) and scores.action_ed == pytest.approx((0 + 2 / 20) / 2)
    assert (scores.questions, scores.z, scores.candidates) == (2, 20, 1)


# ---------------------------------------------------------------------------------------------------
# the questions


def test_the_windows_follow_the_public_protocol(lta):
    """Clip A: windows of actions 0–7 and 1–8 (a clip of 8 + 20 actions or more); clip B has too few. Full video
    times: action 0 starts at 100 + 0.3 s (frame round(200.6) = 201), action 7 ends at 100 + 7.9 s (frame 216)."""
    data, videos = lta
    benchmark = build_lta_questions(data, videos)
    assert [q.clip.id for q in benchmark.questions] == ["A_7", "A_8"] and benchmark.clips == 1
    first = benchmark.questions[0]
    assert (first.clip.first_frame, first.clip.num_frames, first.clip.video) == (201, 16, videos / "video-A.mp4")
    assert first.clip.question.startswith("After 16 video frames, anticipate the next 20 actions. Format your "
                                          "answer concisely, listing each action on a new line with a number prefix.")
    assert first.future == tuple((k % 3, k % 4) for k in range(8, 28))
    assert benchmark.vocabulary.source == "taxonomy" and benchmark.vocabulary.verbs[1] == "turn off"


def test_a_clip_video_is_read_at_the_clips_own_times(lta):
    data, videos = lta
    (videos / "video-A.mp4").rename(videos / "A.mp4")
    first = build_lta_questions(data, videos).questions[0]  # round(0.6) = 1 … round(15.8) = 16
    assert (first.clip.first_frame, first.clip.num_frames, first.clip.video.name) == (1, 16, "A.mp4")


def test_without_a_taxonomy_the_records_name_their_labels(lta):
    data, videos = lta
    (data.parent / "fho_lta_taxonomy.json").unlink()
    benchmark = build_lta_questions(data, videos)
    assert benchmark.vocabulary.source == "annotations" and benchmark.vocabulary.nouns == vocabulary().nouns


# ---------------------------------------------------------------------------------------------------
# bad input


def test_a_record_without_its_start_is_named(lta):
    data, videos = lta
    records = json.loads(data.read_text())
    del records["clips"][3]["action_clip_start_sec"]
    data.write_text(json.dumps(records))
    with pytest.raises(AnnotationError, match=r"fho_lta_val.json: clips\[3\]: action_clip_start_sec: missing"):
        build_lta_questions(data, videos)


def test_an_unlabelled_record_says_the_benchmark_needs_labels(lta):
    data, videos = lta
    records = json.loads(data.read_text())
    del records["clips"][0]["verb_label"]
    data.write_text(json.dumps(records))
    with pytest.raises(AnnotationError, match=r"clips\[0\]: verb_label: missing; the benchmark needs labelled"):
        build_lta_questions(data, videos)


def test_a_label_outside_the_taxonomy_is_named(lta):
    data, videos = lta
    records = json.loads(data.read_text())
    records["clips"][5]["noun_label"] = 40
    data.write_text(json.dumps(records))
    with pytest.raises(AnnotationError, match=r"clips\[5\]: noun_label: 40 is not in the taxonomy \(4 nouns\)"):
        build_lta_questions(data, videos)


def test_a_missing_video_names_the_clip_and_both_paths(lta):
    data, videos = lta
    (videos / "video-A.mp4").unlink()
    with pytest.raises(FileNotFoundError, match=r"clip_uid A\): neither the video .*video-A.mp4 nor the clip .*A.mp4"):
        build_lta_questions(data, videos)
    assert build_lta_questions(data, videos, skip_missing=True).skipped == ["A"]


def test_the_command_reports_a_missing_video_in_one_line_before_loading(lta, capsys, monkeypatch):
    import livevlm
    from livevlm.cli import run

    data, videos = lta
    (videos / "video-A.mp4").unlink()
    monkeypatch.setattr(livevlm, "load", lambda *a, **k: pytest.fail("loaded the model before checking the data"))
    assert run(["evaluate", "--benchmark", "ego4d-lta", "--data", str(data), "--video-dir", str(videos)]) == 2
    err = capsys.readouterr().err
    assert "(clip_uid A): neither the video" in err and len(err.strip().splitlines()) == 1


# ---------------------------------------------------------------------------------------------------
# end to end


def test_the_api_answers_each_window_and_returns_strict_json(tiny_checkpoint, tmp_path):
    """28 actions of 0.2 s inside the 6-s clip video: one window, whose 8 actions span frames 0–3."""
    import livevlm
    from livevlm.evaluation.stream_eval import json_ready

    ckpt, video = tiny_checkpoint
    (tmp_path / "videos").mkdir()
    shutil.copy(video, tmp_path / "videos" / "C.mp4")
    (tmp_path / "lta.json").write_text(json.dumps({"clips": lta_records("C", 28, step=0.2)}))
    (tmp_path / "fho_lta_taxonomy.json").write_text(json.dumps(TAXONOMY))
    model = livevlm.load(ckpt, device="cpu")
    result = model.evaluate_lta(tmp_path / "lta.json", tmp_path / "videos", max_new_tokens=3)
    result = json.loads(json.dumps(json_ready(result), allow_nan=False))
    assert (result["questions"], result["clips"], result["videos"], result["candidates"]) == (1, 1, 1, 1)
    assert all(0 <= result[key] <= 1 for key in ("verb_ed", "noun_ed", "action_ed"))
    assert result["benchmark"]["name"] == "ego4d-lta" and result["vocabulary"] == "taxonomy"
