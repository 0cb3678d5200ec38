"""The dialogue schema: time semantics, roundtrip, atomic writes, and one exact error per broken rule."""

import json
import re
from pathlib import Path

import pytest

from livevlm.cli.data import ValidateArgs
from livevlm.cli.data import validate as validate_command
from livevlm.data.schema import (
    Dialogue,
    DialogueError,
    Turn,
    check_file,
    read_dialogues,
    write_dialogues,
)


def good_record(**changes) -> dict:
    record = {"id": "000-narration", "video": "videos/000.mp4", "fps": 2.0, "duration_s": 30.0,
              "turns": [{"role": "system", "time_s": 0.0, "text": "Be brief."},
                        {"role": "user", "time_s": 0.0, "text": "Please narrate the video in real time."},
                        {"role": "assistant", "time_s": 0.0, "text": "Sure."},
                        {"role": "assistant", "time_s": 3.5, "text": "A red circle appears on the left."},
                        {"role": "user", "time_s": 12.0, "text": "What just happened?"},
                        {"role": "assistant", "time_s": 12.0, "text": "The red circle stopped."},
                        {"role": "assistant", "time_s": 13.5, "text": "The red circle leaves."}]}
    record.update(changes)
    return record


def write_lines(path: Path, lines: list) -> Path:
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


def with_turn(index: int, **changes) -> dict:
    record = good_record()
    record["turns"][index].update(changes)
    return record


def test_frame_index_places_a_turn_after_the_frame_at_or_before_it():
    d = Dialogue.from_json(good_record(start_s=10.0, end_s=20.0, turns=[
        {"role": "assistant", "time_s": 10.0, "text": "a"}]))
    assert [d.frame_index(t) for t in (10.0, 10.49, 10.5, 13.5, 19.99)] == [0, 0, 1, 7, 19]
    assert d.frame_time(7) == 13.5
    assert d.num_frames() == 20  # frames at 10.0, 10.5, ..., 19.5


def test_num_frames_defaults_to_duration_and_then_to_the_last_turn():
    assert Dialogue.from_json(good_record()).num_frames() == 60
    assert Dialogue.from_json(good_record(duration_s=29.7)).num_frames() == 60
    no_end = Dialogue.from_json(good_record(duration_s=None))
    assert no_end.num_frames() == 28  # the last turn, at 13.5 s, follows frame 27


def test_roundtrip_write_then_read_gives_equal_dialogues(tmp_path):
    dialogues = [Dialogue.from_json(good_record()),
                 Dialogue.from_json(good_record(id="b", video=None, features="f/b.safetensors", start_s=1.0,
                                                end_s=20.0, task="narration", meta={"k": [1, 2]},
                                                turns=[{"role": "assistant", "time_s": 1.5, "text": "x"}]))]
    path = tmp_path / "sub" / "dialogue.jsonl"
    assert write_dialogues(path, dialogues) == 2
    assert read_dialogues(path) == dialogues
    assert json.loads(path.read_text().splitlines()[1])["features"] == "f/b.safetensors"


def test_key_frames_round_trip_and_map_to_the_frame_at_or_before_them(tmp_path):
    path = write_lines(tmp_path / "d.jsonl", [good_record(key_frames_s=[3.5, 12.2])])
    (dialogue,) = read_dialogues(path)
    assert dialogue.key_frames() == [7, 24]
    write_dialogues(tmp_path / "again.jsonl", [dialogue])
    assert read_dialogues(tmp_path / "again.jsonl") == [dialogue]
    assert "key_frames_s" not in Dialogue.from_json(good_record()).to_json()  # left out when unset


def test_write_refuses_an_invalid_dialogue_and_keeps_the_existing_file(tmp_path):
    path = tmp_path / "dialogue.jsonl"
    write_dialogues(path, [Dialogue.from_json(good_record())])
    before = path.read_bytes()
    bad = Dialogue(id="bad", video="v.mp4", fps=2.0, turns=[Turn("user", 1.0, "hello?")])
    with pytest.raises(DialogueError, match=r"dialogue 'bad': turns\[1\]: a user turn"):
        write_dialogues(path, [Dialogue.from_json(good_record(id="ok")), bad])
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["dialogue.jsonl"]  # no temp file left behind


def test_video_and_features_paths_resolve_against_the_jsonl_folder(tmp_path):
    d = Dialogue.from_json(good_record(features="feat/000.safetensors"))
    assert d.video_path(tmp_path) == tmp_path / "videos" / "000.mp4"
    assert d.features_path(tmp_path) == tmp_path / "feat" / "000.safetensors"


BAD_LINES = [
    ('{"id": "x", "fps": 2', "not valid JSON (column 21: Expecting ',' delimiter); each line must be one "
                            "complete JSON object"),
    ("[1, 2]", "expected a JSON object (one dialogue per line), got list"),
    (good_record(speaker="me"), "speaker: unknown field; valid fields: ['id', 'video', 'features', 'fps', "
                                "'duration_s', 'start_s', 'end_s', 'task', 'meta', 'key_frames_s', 'turns']"),
    ({k: v for k, v in good_record().items() if k != "fps"},
     "fps: missing (required fields: id, fps, turns, and video or features)"),
    (good_record(video=None), "video: missing; a dialogue needs a video or a features file"),
    (good_record(fps=0), "fps: must be positive, got 0.0"),
    (good_record(fps="2"), "fps: expected a finite number, got '2'"),
    (good_record(id=""), "id: expected a non-empty string, got ''"),
    (good_record(end_s=31.0), "end_s: 31.0 is after the end of the video (duration_s 30.0)"),
    (good_record(turns=[]), "turns: expected a non-empty list"),
    (good_record(key_frames_s=3.5), "key_frames_s: expected a list of times in seconds, got 3.5"),
    (good_record(key_frames_s=[30.5]), "key_frames_s[0]: 30.5 is outside the clip [0.0, 30.0)"),
    (good_record(key_frames_s=[30.0]), "key_frames_s[0]: 30.0 falls after frame 60, but the clip has 60 frames"),
    (good_record(key_frames_s=[3.5, 3.7]), "key_frames_s[1]: 3.7 falls on frame 7 like 3.5; give each key frame "
                                           "once"),
    (with_turn(3, time_s="3.5"), "turns[3].time_s: expected a finite number of seconds, got '3.5'"),
    (with_turn(3, who="me"), "turns[3].who: unknown field; a turn has ['role', 'time_s', 'text']"),
    (with_turn(3, role="bot"), "turns[3].role: 'bot' is not one of ['system', 'user', 'assistant', 'note']"),
    (with_turn(3, role="system"), "turns[3].role: a system turn may only be the first turn"),
    (with_turn(3, text="  "), "turns[3].text: empty; every turn needs some text"),
    (with_turn(5, time_s=11.0), "turns[5].time_s: 11.0 is before the previous turn (12.0); turns must be in "
                                "time order"),
    (good_record(start_s=1.0), "turns[0].time_s: 0.0 is before start_s (1.0)"),
    (with_turn(6, time_s=30.0), "turns[6].time_s: 30.0 falls after frame 60, but the clip has 60 frames (the "
                                "last at 29.5 s); move the turn to 29.5 s or earlier"),
    (good_record(end_s=13.0), "turns[6].time_s: 13.5 is after the end of the clip (13.0)"),
    (with_turn(5, time_s=12.5), "turns[5]: a user turn (turns[4] at 12.0 s) must be followed at once by an "
                                "assistant turn at the same time; got assistant at 12.5 s; add an "
                                "acknowledgement or the answer"),
    (with_turn(6, time_s=12.4), "turns[6].time_s: 12.4 falls on frame 24 like turns[5] (an assistant turn) "
                                "with no user turn between; merge their texts into one turn"),
    (with_turn(6, role="note", time_s=12.0), "turns[6].time_s: a note must be the first turn on its frame (frame "
                                             "24), after turns[5] (assistant) there; move the note to a frame of "
                                             "its own or before that turn"),
]


@pytest.mark.parametrize(("line", "message"), BAD_LINES, ids=[m.split(":")[0].split(" (")[0] for _, m in BAD_LINES])
def test_a_malformed_line_names_the_file_line_field_and_problem(tmp_path, line, message):
    path = write_lines(tmp_path / "dialogue.jsonl", [good_record(id="first"), "", line])
    with pytest.raises(DialogueError) as info:
        read_dialogues(path)
    assert str(info.value).startswith(f"{path} line 3: {message}")


def test_a_note_may_come_first_on_its_frame_with_the_answer_after_it(tmp_path):
    record = good_record()
    record["turns"][3:4] = [{"role": "note", "time_s": 3.5, "text": "A red circle appears on the left."},
                            {"role": "assistant", "time_s": 3.5, "text": "There is the red circle."},
                            {"role": "note", "time_s": 5.0, "text": "A blue square appears."}]
    (dialogue,) = read_dialogues(write_lines(tmp_path / "d.jsonl", [record]))
    assert [turn.role for turn in dialogue.turns[3:6]] == ["note", "assistant", "note"]


def test_a_user_turn_last_in_the_dialogue_is_reported(tmp_path):
    record = good_record()
    record["turns"] = record["turns"][:5]
    with pytest.raises(DialogueError, match=re.escape("turns[5]: a user turn (turns[4] at 12.0 s) must be "
                                                      "followed at once by an assistant turn at the same time; "
                                                      "got nothing")):
        read_dialogues(write_lines(tmp_path / "d.jsonl", [record]))


def test_a_duplicate_id_names_the_first_line(tmp_path):
    path = write_lines(tmp_path / "d.jsonl", [good_record(), good_record()])
    with pytest.raises(DialogueError, match=re.escape(f"{path} line 2: id: '000-narration' is already used on "
                                                      "line 1; ids must be unique")):
        read_dialogues(path)


@pytest.mark.parametrize("content", ["", "\n\n  \n"])
def test_an_empty_file_is_a_clear_error(tmp_path, content):
    path = tmp_path / "d.jsonl"
    path.write_text(content)
    with pytest.raises(DialogueError, match=re.escape(f"{path} is empty: no dialogues in it")):
        read_dialogues(path)


def test_a_missing_file_says_how_to_make_one(tmp_path):
    with pytest.raises(FileNotFoundError, match="livevlm data convert"):
        read_dialogues(tmp_path / "nope.jsonl")


def test_validate_command_prints_the_totals_when_ok(tmp_path, capsys):
    path = write_lines(tmp_path / "d.jsonl", [good_record(), good_record(id="second")])
    assert validate_command(ValidateArgs(str(path))) == 0
    assert capsys.readouterr().out == "2 dialogues, 14 turns: ok\n"


def test_validate_command_lists_every_error_and_exits_1(tmp_path, capsys):
    path = write_lines(tmp_path / "d.jsonl", [good_record(fps=-1), good_record(id="b"), with_turn(3, text="")])
    assert validate_command(ValidateArgs(str(path))) == 1
    out = capsys.readouterr().out.splitlines()
    assert out == [f"{path} line 1: fps: must be positive, got -1.0",
                   f"{path} line 3: turns[3].text: empty; every turn needs some text",
                   f"{path}: 2 error(s)"]


def test_check_videos_reports_a_missing_video(tmp_path):
    (tmp_path / "videos").mkdir()
    (tmp_path / "videos" / "000.mp4").write_bytes(b"")
    path = write_lines(tmp_path / "d.jsonl", [good_record(), good_record(id="b", video="videos/001.mp4")])
    assert check_file(path)[2] == []
    n_dialogues, n_turns, errors = check_file(path, check_videos=True)
    assert (n_dialogues, n_turns) == (1, 7)
    assert errors == [f"{path} line 2: video: videos/001.mp4 does not exist (looked for "
                      f"{tmp_path / 'videos' / '001.mp4'}); paths are relative to the JSONL file's folder"]


def test_render_shows_a_dialogue_in_its_recipes_layout(tmp_path, capsys):
    from conftest import save_tiny_llm
    from livevlm.cli.render import RenderArgs, render
    from livevlm.stream_format import StreamFormatError

    save_tiny_llm(tmp_path / "llm")
    record = good_record()
    record["turns"][3]["role"] = "note"  # "A red circle appears on the left.", noted and not said
    path = write_lines(tmp_path / "d.jsonl", [record])
    recipe = tmp_path / "notes.yaml"
    recipe.write_text("format:\n  note_role: Note\n")
    assert render(RenderArgs(str(path), llm=str(tmp_path / "llm"), tokens_per_frame=1, recipe=str(recipe))) == 0
    shown = capsys.readouterr().out
    assert '-> "["' in shown  # after the note's eos, going on watching is learnt (never after a response)
    with pytest.raises(StreamFormatError, match="format.note_role"):  # the paper's layout has no notes
        render(RenderArgs(str(path), llm=str(tmp_path / "llm"), tokens_per_frame=1))
