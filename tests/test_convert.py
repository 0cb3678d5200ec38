"""Converters on small hand-written annotation files in each source's real format: exact turn times and
texts, paths relative to the output, and errors that name the file, the record and the remedy."""

import itertools
import json
import math
import random
import re
from pathlib import Path

import pytest

from livevlm.data.convert import CONVERTERS, AnnotationError, ConvertOptions, convert, get_converter
from livevlm.data.converters import coin, ego4d, segments, world
from livevlm.data.schema import Turn, read_dialogues


def turns(dialogue) -> list[tuple[str, float, str]]:
    return [(t.role, t.time_s, t.text) for t in dialogue.turns]


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def write_json(path: Path, value) -> Path:
    path.write_text(json.dumps(value, indent=1))
    return path


def run(tmp_path: Path, kind: str, source: Path, **options) -> list:
    out = tmp_path / "out" / "dialogue.jsonl"
    convert(ConvertOptions(input=str(source), output=str(out), kind=kind, **options))
    return read_dialogues(out)


# ---------------------------------------------------------------------------------------------------
# world

RED = {"id": 0, "shape": "circle", "color": "red", "size": "small"}
BLUE = {"id": 1, "shape": "square", "color": "blue", "size": "large"}
WORLD_EVENTS = [
    {"time_s": 0.0, "frame": 0, "kind": "appear", "text": "A small red circle appears on the left.", "object": RED,
     "position": "left", "center": [0.2, 0.5]},
    {"time_s": 0.0, "kind": "appear", "text": "A large blue square appears on the right.", "object": BLUE},
    {"time_s": 2.2, "kind": "move", "text": "The red circle starts moving to the right.", "object": RED,
     "direction": "right"},
    {"time_s": 2.4, "kind": "size", "text": "The blue square shrinks.", "object": BLUE, "new_size": "small",
     "change": "shrink"},
    {"time_s": 5.0, "kind": "collide", "text": "The red circle bumps into the blue square.", "object": RED,
     "other": BLUE},
    {"time_s": 6.3, "kind": "color", "text": "The blue square turns green.", "object": BLUE, "new_color": "green"},
    {"time_s": 7.1, "kind": "teleport", "text": "The red circle teleports.", "object": RED},
    {"time_s": 8.9, "kind": "leave", "text": "The red circle vanishes on the left.", "object": RED, "how": "vanish"},
]


def world_file(tmp_path: Path) -> Path:
    folder = tmp_path / "w"
    folder.mkdir()
    record = {"video": "videos/000.mp4", "duration_s": 10.0, "fps": 2, "video_fps": 10, "events": WORLD_EVENTS,
              "steps": [{"start_s": 2.2, "end_s": 5.0, "text": "The red circle moves to the right."}]}
    return write_jsonl(folder / "annotations.jsonl", [record])


def test_world_narrates_every_event_at_the_first_frame_at_or_after_it(tmp_path):
    narration = run(tmp_path, "world", world_file(tmp_path), reminders=0, questions=0)[0]
    assert narration.id == "000-narration" and narration.task == "narration"
    assert (narration.fps, narration.start_s, narration.end_s, narration.duration_s) == (2.0, 0.0, 10.0, 10.0)
    assert turns(narration)[0][:2] == ("user", 0.0) and turns(narration)[0][2] in world.NARRATION_PROMPTS
    assert turns(narration)[1:] == [
        ("assistant", 0.0, "A small red circle appears on the left. A large blue square appears on the right."),
        ("assistant", 2.5, "The red circle starts moving to the right. The blue square shrinks."),  # one frame
        ("assistant", 5.0, "The red circle bumps into the blue square."),
        ("assistant", 6.5, "The blue square turns green."),
        ("assistant", 7.5, "The red circle teleports."),  # an unknown kind is still narrated
        ("assistant", 9.0, "The red circle vanishes on the left.")]


def test_world_video_paths_are_relative_to_the_output_folder(tmp_path):
    dialogues = run(tmp_path, "world", world_file(tmp_path))
    assert {d.video for d in dialogues} == {"../w/videos/000.mp4"}
    assert [d.id for d in dialogues] == ["000-narration", "000-reminder-0", "000-reminder-1", "000-questions"]


def test_world_reminders_are_answered_with_the_event_at_its_frame(tmp_path):
    reminders = [d for d in run(tmp_path, "world", world_file(tmp_path), reminders=5, questions=0)
                 if d.task == "reminder"]
    events = {e["text"]: e for e in WORLD_EVENTS}
    assert len(reminders) == 5  # move, size, collide, color, leave (appear is at frame 0; teleport unknown)
    for d in reminders:
        (user, ask_s, question), (_, ack_s, ack), (role, answer_s, answer) = turns(d)
        event = events[answer]
        name = f"{event['object']['color']} {event['object']['shape']}"
        assert question == world.REMINDERS[event["kind"]].format(name=name, a_name=world.with_article(name))
        assert (user, ack_s, ack in world.REMINDER_ACKS, role) == ("user", ask_s, True, "assistant")
        assert ask_s < event["time_s"] <= answer_s == math.ceil(event["time_s"] * 2) / 2


def test_world_reminder_clips_run_from_two_seconds_before_the_request_to_two_after_the_answer(tmp_path):
    clips = run(tmp_path, "world-reminders", world_file(tmp_path), reminders=5)
    events = {e["text"]: e for e in WORLD_EVENTS}
    assert [c.id for c in clips] == [f"000-reminder-clip-{j}" for j in range(5)]
    assert {events[turns(c)[2][2]]["kind"] for c in clips} == {"move", "size", "collide", "color", "leave"}
    for clip in clips:
        (_, ask_s, question), (_, ack_s, ack), (_, answer_s, answer) = turns(clip)
        assert (clip.task, clip.duration_s, ack_s, ack in world.REMINDER_ACKS) == ("reminder", 10.0, ask_s, True)
        assert ask_s < events[answer]["time_s"] <= answer_s == math.ceil(events[answer]["time_s"] * 2) / 2
        assert (clip.start_s, clip.end_s) == (max(0.0, ask_s - 2.0), min(10.0, answer_s + 2.5))  # frames to +2 s


def test_world_narration_clips_say_every_event_from_their_request_each_prompt_once(tmp_path):
    clips = run(tmp_path, "world-narration", world_file(tmp_path), narration_clips=4)
    assert [c.id for c in clips] == [f"000-narration-clip-{j}" for j in range(4)]
    assert sorted(turns(c)[0][2] for c in clips) == sorted(world.NARRATION_PROMPTS)  # the prompts in turn
    assert turns(clips[0])[0][:2] == ("user", 0.0)  # the first clip asks at the video's first frame
    for clip in clips:
        (user, ask_s, _), (role, reply_s, reply), *said = turns(clip)
        assert (clip.task, user, role, reply_s) == ("narration", "user", "assistant", ask_s)
        assert (clip.start_s, clip.end_s) == (max(0.0, ask_s - 2.0), min(10.0, ask_s + 8.5))  # frames to +8 s
        expected: dict[float, list[str]] = {}
        for e in WORLD_EVENTS:  # each event at the first frame at or after it, from the request's, if shown
            frame_s = math.ceil(e["time_s"] * 2) / 2
            if ask_s <= frame_s <= clip.end_s - 0.5:
                expected.setdefault(frame_s, []).append(e["text"])
        first = expected.pop(ask_s, None)  # what the request's frame shows first answers it; else an ack
        assert (reply == " ".join(first)) if first else (reply in world.NARRATION_ACKS)
        assert said == [("assistant", t, " ".join(texts)) for t, texts in sorted(expected.items())]
        assert (clip.key_frames_s or []) == [t for _, t, _ in said]  # the frames that narrate are the hard decisions
    assert turns(clips[0])[1][2] == "A small red circle appears on the left. A large blue square appears on the right."


def test_world_narration_needs_a_clip_per_video(tmp_path):
    with pytest.raises(AnnotationError, match="--narration-clips 0: world-narration needs at least one clip"):
        run(tmp_path, "world-narration", world_file(tmp_path), narration_clips=0)


def test_reminders_with_distractors_are_asked_before_another_objects_event_of_the_kind():
    events = world.parse_events([
        {"time_s": 0.0, "kind": "appear", "text": "A small red circle appears.", "object": RED},
        {"time_s": 0.0, "kind": "appear", "text": "A large blue square appears.", "object": BLUE},
        {"time_s": 3.0, "kind": "move", "text": "The blue square starts moving up.", "object": BLUE, "direction": "up"},
        {"time_s": 6.0, "kind": "move", "text": "The red circle starts moving up.", "object": RED, "direction": "up"}],
        "x")
    video = world.WorldVideo("v", "v.mp4", 10.0, events)
    asked = {}
    for seed in range(20):
        for distractors in (True, False):
            for d in world.reminders(video, 2.0, 2, random.Random(seed), clip=(2.0, 2.0), distractors=distractors):
                asked.setdefault((turns(d)[2][2], distractors), set()).add(turns(d)[0][1])
    red, blue = "The red circle starts moving up.", "The blue square starts moving up."
    assert asked[(red, True)] == {0.0, 0.5, 1.0, 1.5, 2.0, 2.5}  # before the blue square's start: silent through it
    assert max(asked[(red, False)]) > 3.0  # plain: anywhere before its own
    assert asked[(blue, True)] == asked[(blue, False)]  # nothing of the kind comes before it: as plain


def pairs_video() -> world.WorldVideo:
    """Three objects on screen from the start; the blue square and the red circle start moving, a yellow
    triangle appears."""
    green = {"id": 3, "shape": "star", "color": "green", "size": "small"}
    yellow = {"id": 4, "shape": "triangle", "color": "yellow", "size": "small"}
    events = world.parse_events([
        {"time_s": 0.0, "kind": "appear", "text": "A small red circle appears.", "object": RED},
        {"time_s": 0.0, "kind": "appear", "text": "A large blue square appears.", "object": BLUE},
        {"time_s": 0.0, "kind": "appear", "text": "A small green star appears.", "object": green},
        {"time_s": 3.0, "kind": "move", "text": "The blue square starts moving up.", "object": BLUE, "direction": "up"},
        {"time_s": 6.0, "kind": "move", "text": "The red circle starts moving up.", "object": RED, "direction": "up"},
        {"time_s": 8.0, "kind": "appear", "text": "A small yellow triangle appears.", "object": yellow}], "x")
    return world.WorldVideo("v", "v.mp4", 10.0, events)


def test_reminder_pairs_follow_each_clip_with_an_unanswered_twin_over_the_same_frames():
    video = pairs_video()
    twins: dict[str, set[str]] = {}
    for seed in range(20):
        dialogues = world.reminders(video, 2.0, 3, random.Random(seed), clip=(2.0, 2.0), pairs=True)
        assert sorted(d.id for d in dialogues if not d.id.endswith("-unanswered")) == [
            f"v-reminder-clip-{j}" for j in range(3)]
        assert sum(d.id.endswith("-unanswered") for d in dialogues) == 2  # the yellow triangle's clip has none
        for clip, twin in itertools.pairwise(dialogues):
            if twin.id == f"{clip.id}-unanswered":
                (_, ask_s, _), (_, ack_s, ack) = turns(twin)
                assert (twin.start_s, twin.end_s, ask_s, ack_s) == (clip.start_s, clip.end_s, turns(clip)[0][1], ask_s)
                assert len(turns(twin)) == 2 and ack in world.REMINDER_ACKS and twin.task == "reminder"
                twins.setdefault(turns(clip)[2][2], set()).add(turns(twin)[0][2])
    # the blue square's clip ends at 5.0 s, before the red circle moves; the red circle's at 8.0 s, after the
    # blue square has started; the yellow triangle's shows every other thing that appears already on screen
    assert twins == {"The blue square starts moving up.": {"Tell me when the red circle starts moving.",
                                                           "Tell me when the green star starts moving."},
                     "The red circle starts moving up.": {"Tell me when the green star starts moving."}}


def test_a_reminder_and_its_twin_mark_the_frames_of_every_event_after_the_request():
    video = pairs_video()
    for seed in range(10):
        for d in world.reminders(video, 2.0, 3, random.Random(seed), clip=(2.0, 2.0), pairs=True):
            ask_s = turns(d)[0][1]
            assert d.key_frames_s == [t for t in (3.0, 6.0, 8.0) if ask_s < t < d.end_s], (d.id, ask_s)
            if not d.id.endswith("-unanswered"):  # the answer's frame is one of them (the tail may hold more)
                assert d.frame_index(turns(d)[-1][1]) in d.key_frames()
    # an event between frames is marked at the frame that narrates it; only frames after the first index count
    moves = world.parse_events([{"time_s": 2.2, "kind": "move", "text": "The red circle starts moving up.",
                                 "object": RED, "direction": "up"}], "x")
    assert world.event_frames_s(moves, 4, 5, 2.0) == [2.5]
    assert world.event_frames_s(moves, 5, 9, 2.0) == []


def test_reminder_notes_note_every_event_up_to_the_answer_and_a_twin_every_event():
    video = pairs_video()
    said = {3.0: "The blue square starts moving up.", 6.0: "The red circle starts moving up.",
            8.0: "A small yellow triangle appears."}
    dialogues = [d for seed in range(10)
                 for d in world.reminders(video, 2.0, 3, random.Random(seed), clip=(2.0, 2.0), pairs=True, notes=True)]
    assert any(d.id.endswith("-unanswered") for d in dialogues)
    for d in dialogues:
        answer_s = None if d.id.endswith("-unanswered") else turns(d)[-1][1]
        noted = [t for t in d.key_frames_s if answer_s is None or t <= answer_s]
        expected = [("note", t, said[t]) for t in noted]
        if answer_s is not None:
            expected.append(("assistant", answer_s, turns(d)[-1][2]))
        assert turns(d)[2:] == expected, d.id
        d.validate()  # the schema's rules hold: a note first on its frame, the answer after it


def test_event_notes_note_every_event_of_a_question_dialogue_before_the_questions_of_its_frame(tmp_path):
    dialogue = run(tmp_path, "world-questions", world_file(tmp_path), questions=20, event_notes=True)[0]
    notes = [(t, text) for role, t, text in turns(dialogue) if role == "note"]
    assert notes == [(0.0, "A small red circle appears on the left. A large blue square appears on the right."),
                     (2.5, "The red circle starts moving to the right. The blue square shrinks."),
                     (5.0, "The red circle bumps into the blue square."), (6.5, "The blue square turns green."),
                     (7.5, "The red circle teleports."), (9.0, "The red circle vanishes on the left.")]
    for i, (role, time_s, text) in enumerate(turns(dialogue)):
        if role == "note":
            assert all(t[1] < time_s for t in turns(dialogue)[:i])  # the first turn on its frame
        if text == "What just happened?":  # its answer: the last note's latest events
            assert [n for t, n in notes if t <= time_s][-1].endswith(turns(dialogue)[i + 1][2])
    dialogue.validate()


def test_event_notes_note_each_narrated_event_before_saying_it_and_a_reminder_clip_from_its_first_frame():
    video = pairs_video()
    video.note_every_event = True
    narration = turns(world.narration(video, 2.0, random.Random(0)))
    notes = [(t, text) for role, t, text in narration if role == "note"]
    assert notes == [(0.0, "A small red circle appears. A large blue square appears. A small green star appears."),
                     (3.0, "The blue square starts moving up."), (6.0, "The red circle starts moving up."),
                     (8.0, "A small yellow triangle appears.")]
    assert narration[0][0] == "note" and narration[1][0] == "user"  # the request, answered by what it shows
    assert [(t, text) for role, t, text in narration[3:] if role == "assistant"] == notes[1:]  # each after its note
    for d in world.reminders(video, 2.0, 3, random.Random(1), clip=(2.0, 2.0), pairs=True, notes=True):
        noted = [t for role, t, _ in turns(d) if role == "note"]
        assert noted == [t for t in (0.0, 3.0, 6.0, 8.0) if d.start_s - 0.5 < t < d.end_s], d.id
        answers = [i for i, (role, _, _) in enumerate(turns(d)) if role == "assistant"][1:]  # after the ack
        assert len(answers) == (0 if d.id.endswith("-unanswered") else 1)
        for i in answers:  # the answer right after its event's note; the events after it noted too
            (_, answer_s, answer), (before, note_s, note) = turns(d)[i], turns(d)[i - 1]
            assert (before, note_s, note) == ("note", answer_s, answer)
        d.validate()


def test_a_reminder_is_not_asked_when_an_earlier_event_would_answer_it(tmp_path):
    events = world.parse_events(WORLD_EVENTS, "x")
    stop_like = world.Event(9.5, "The red circle stops.", "stop", RED, {})
    leave = events[-1]
    assert world._reminder_ok(events, leave, 3.0)
    assert not world._reminder_ok(events, stop_like, 1.0)  # not moving then: "tell me when it stops" is odd
    shrink = events[3]
    assert world._reminder_ok(events, shrink, 2.0)
    assert not world._reminder_ok(events, shrink, 2.5)  # already happened


def test_world_questions_are_answered_from_the_timeline_at_that_time():
    events = world.parse_events(WORLD_EVENTS, "x")
    at_3 = world.question_options(events, 3.0)
    assert at_3["past"] == [("What just happened?", "The blue square shrinks."),
                            ("What appeared last?", "A blue square.")]
    assert at_3["present"] == [("How many objects are there?", "There are two objects."),
                               ("What colour is the circle?", "It is red."),
                               ("How big is the red circle?", "It is small."),
                               ("What colour is the square?", "It is blue."),
                               ("How big is the blue square?", "It is small.")]
    assert at_3["ongoing"] == [("What is the red circle doing?", "It is moving to the right."),
                               ("What is the blue square doing?", "It is standing still.")]
    at_7 = world.question_options(events, 7.0)
    assert ("What is the red circle doing?", "It is standing still.") in at_7["ongoing"]  # stopped by the bump
    assert ("What colour is the square?", "It is green.") in at_7["present"]
    at_9 = world.question_options(events, 9.0)
    assert at_9["present"][0] == ("How many objects are there?", "There is one object.")
    assert world.question_options(events, 0.0)["past"][0] == (
        "What just happened?", "A small red circle appears on the left. A large blue square appears on the right.")


def test_world_question_dialogues_each_ask_at_their_own_frames_answered_from_the_timeline(tmp_path):
    dialogues = run(tmp_path, "world-questions", world_file(tmp_path), questions=6, question_dialogues=3)
    events = world.parse_events(WORLD_EVENTS, "x")
    assert [d.id for d in dialogues] == ["000-questions-0", "000-questions-1", "000-questions-2"]
    asked_at = []
    for d in dialogues:
        assert (d.task, d.start_s, d.end_s) == ("questions", 0.0, 10.0)
        pairs = list(zip(turns(d)[::2], turns(d)[1::2], strict=True))
        assert len(pairs) == 6
        for (user, ask_s, question), (role, answer_s, answer) in pairs:
            options = world.question_options(events, ask_s)
            assert (user, role, answer_s) == ("user", "assistant", ask_s)
            assert (question, answer) in [item for items in options.values() for item in items]
        asked_at.append([ask_s for (_, ask_s, _), _ in pairs])
    assert len({tuple(times) for times in asked_at}) == 3  # each dialogue draws its own frames


def test_world_questions_of_one_tense_ask_only_that_tenses_questions(tmp_path):
    dialogues = run(tmp_path, "world-questions", world_file(tmp_path), questions=8, question_dialogues=2,
                    question_tenses="past")
    events = world.parse_events(WORLD_EVENTS, "x")
    pairs = [pair for d in dialogues for pair in zip(turns(d)[::2], turns(d)[1::2], strict=True)]
    assert len(pairs) == 16
    for (_, ask_s, question), (_, _, answer) in pairs:
        assert (question, answer) in world.question_options(events, ask_s)["past"]


def test_world_questions_name_an_unknown_tense(tmp_path):
    with pytest.raises(AnnotationError, match=re.escape("--question-tenses 'past,future': give one or more of "
                                                        "past, present, ongoing")):
        run(tmp_path, "world-questions", world_file(tmp_path), question_tenses="past,future")


def test_world_questions_needs_a_question(tmp_path):
    with pytest.raises(AnnotationError, match=re.escape("--questions 0 --question-dialogues 1: world-questions "
                                                        "needs at least one of each")):
        run(tmp_path, "world-questions", world_file(tmp_path), questions=0)


def test_world_scene_lists_every_object_with_size_colour_and_shape_in_order_of_appearance():
    events = world.parse_events(WORLD_EVENTS, "x")
    describe = [world.describe_scene(world.state_at(events, t)) for t in (3.0, 7.0, 9.0)]
    assert describe == ["A small red circle and a small blue square.", "A small red circle and a small green square.",
                        "A small green square."]
    assert world.describe_scene({}) == "Nothing, the screen is empty."


def test_world_centres_follow_a_moving_object_between_its_events_and_beyond_at_the_videos_speed():
    a, b = {"id": 0, "shape": "circle", "color": "red", "size": "small"}, {"id": 1, "shape": "star", "color": "blue",
                                                                          "size": "large"}
    events = world.parse_events([
        {"time_s": 0.0, "kind": "appear", "text": "A.", "object": a, "center": [0.5, 0.5], "moving": False},
        {"time_s": 0.0, "kind": "appear", "text": "B.", "object": b, "center": [0.8, 0.1], "moving": False},
        {"time_s": 1.0, "kind": "move", "text": "A moves.", "object": a, "center": [0.5, 0.5], "moving": True,
         "direction": "right"},
        {"time_s": 3.0, "kind": "color", "text": "A turns.", "object": a, "center": [0.7, 0.5], "moving": True,
         "direction": "right", "new_color": "green"}], "x")
    assert world.centres_at(events, 0.5) == {0: (0.5, 0.5), 1: (0.8, 0.1)}
    assert world.centres_at(events, 2.0)[0] == pytest.approx((0.6, 0.5))  # half-way between its events
    assert world.centres_at(events, 4.0)[0] == pytest.approx((0.8, 0.5))  # on at 0.1 a second, the video's speed


def test_world_scene_lists_objects_in_reading_order_where_every_centre_is_known():
    """Top third first, then left to right: the order one frame shows (appearance order it does not)."""
    centres = {0: (0.5, 0.5), 1: (0.8, 0.1), 2: (0.1, 0.2), 3: (0.05, 0.9)}
    assert world.reading_order(centres) == [2, 1, 0, 3]
    objects = {0: world.ObjState("circle", "red", "small"), 1: world.ObjState("star", "blue", "large")}
    assert world.describe_scene(objects, [1, 0]) == "A large blue star and a small red circle."
    assert world.describe_scene(objects, [1]) == "A small red circle and a large blue star."  # one centre unknown


def test_world_scene_places_each_object_in_the_ninth_of_the_frame_holding_its_centre():
    """x 0.8 of the top third: "at the top right"; the middle ninth: "in the centre" (the world's own words)."""
    objects = {0: world.ObjState("circle", "red", "small"), 1: world.ObjState("star", "blue", "large")}
    centres = {0: (0.5, 0.5), 1: (0.8, 0.1)}
    assert world.describe_scene(objects, [1, 0], centres) == \
        "A large blue star at the top right and a small red circle in the centre."
    assert world.describe_scene(objects, [1, 0], {0: (0.1, 0.5)}) == \
        "A large blue star and a small red circle on the left."  # no centre: named without a place


def test_world_scene_places_are_asked_for_with_an_option(tmp_path):
    annotations = world_file(tmp_path)
    plain = run(tmp_path, "world-scene", annotations, scene_frames=5)
    placed = run(tmp_path, "world-scene", annotations, scene_frames=5, scene_places=True)
    assert [c.start_s for c in placed] == [c.start_s for c in plain]  # the same frames
    for with_places, without in zip(placed, plain, strict=True):
        answer = turns(with_places)[1][2]
        assert answer != turns(without)[1][2] or answer == "Nothing, the screen is empty."
        assert any(word in answer for word in (" on the ", " at the ", " in the centre"))

def test_world_scene_clips_are_one_frame_each_answered_from_the_timeline_at_that_frame(tmp_path):
    clips = run(tmp_path, "world-scene", world_file(tmp_path), scene_frames=5)
    events = world.parse_events(WORLD_EVENTS, "x")
    assert [c.id for c in clips] == [f"000-scene-{k}" for k in range(5)]
    starts = [c.start_s for c in clips]
    assert starts == sorted(set(starts)) and all(c.end_s == c.start_s + 0.5 for c in clips)
    for clip in clips:
        assert turns(clip) == [("user", clip.start_s, "What is on the screen?"),
                               ("assistant", clip.start_s, world.describe_scene(world.state_at(events, clip.start_s)))]


def test_world_changes_clips_show_the_frame_before_and_the_frame_that_narrates_each_event(tmp_path):
    """At 2 fps: 2.2 s and 2.4 s are both narrated at 2.5 s (one clip, both sentences), 5.0 at 5.0, 6.3 at 6.5,
    7.1 at 7.5, 8.9 at 9.0; the appearances at 0.0 have no frame before and make no clip."""
    clips = run(tmp_path, "world-changes", world_file(tmp_path))
    assert [c.id for c in clips] == [f"000-change-{k}" for k in range(5)]
    assert [(c.start_s, c.end_s) for c in clips] == [(2.0, 3.0), (4.5, 5.5), (6.0, 7.0), (7.0, 8.0), (8.5, 9.5)]
    assert turns(clips[0]) == [("user", 2.5, "What just changed?"), ("assistant", 2.5, "The red circle starts moving "
                                                                     "to the right. The blue square shrinks.")]
    assert [turns(c)[1][2] for c in clips[1:]] == ["The red circle bumps into the blue square.",
                                                   "The blue square turns green.", "The red circle teleports.",
                                                   "The red circle vanishes on the left."]


def test_world_scene_without_frames_says_which_option_to_raise(tmp_path):
    with pytest.raises(AnnotationError, match="--scene-frames 0"):
        run(tmp_path, "world-scene", world_file(tmp_path), scene_frames=0)


def test_world_sentences_use_an_before_a_vowel():
    assert (world.with_article("orange star"), world.with_article("red circle")) == ("an orange star", "a red circle")


def test_world_questions_sit_on_distinct_frames_each_answered_at_once(tmp_path):
    (questions,) = [d for d in run(tmp_path, "world", world_file(tmp_path), questions=6) if d.task == "questions"]
    times = [t.time_s for t in questions.turns]
    assert [t.role for t in questions.turns] == ["user", "assistant"] * 6
    assert times[::2] == times[1::2] and times[::2] == sorted(set(times[::2]))
    assert all(abs(t * 2 - round(t * 2)) < 1e-9 for t in times)  # on the 2 fps grid


def test_world_conversion_is_deterministic_and_seeded(tmp_path):
    source = world_file(tmp_path)
    out = [tmp_path / f"{name}.jsonl" for name in ("a", "b", "c")]
    for path, seed in zip(out, (0, 0, 1), strict=True):
        convert(ConvertOptions(input=str(source), output=str(path), kind="world", seed=seed, questions=8))
    assert out[0].read_bytes() == out[1].read_bytes() != out[2].read_bytes()


def test_world_event_without_time_names_file_line_and_event(tmp_path):
    source = write_jsonl(tmp_path / "annotations.jsonl", [
        {"video": "videos/000.mp4", "duration_s": 10.0, "events": []},
        {"video": "videos/001.mp4", "duration_s": 10.0, "events": [{"text": "A red circle appears."}]}])
    with pytest.raises(AnnotationError, match=re.escape(f"{source} line 2: events[0]: time_s: missing")):
        run(tmp_path, "world", source)


def test_world_missing_video_is_reported_with_the_remedy_when_checked(tmp_path):
    source = world_file(tmp_path)
    video = tmp_path / "w" / "videos" / "000.mp4"
    with pytest.raises(AnnotationError, match=re.escape(f"{source}: line 1: video {video} does not exist; "
                                                        "download it, point --video-root")):
        run(tmp_path, "world", source, check_videos=True)
    (tmp_path / "w" / "videos").mkdir()
    (tmp_path / "w" / "videos" / "000.mp4").write_bytes(b"")
    assert len(run(tmp_path, "world", source, check_videos=True)) == 4


# ---------------------------------------------------------------------------------------------------
# ego4d

EGO4D_REDACTED = {"date": "220111", "videos": {"abc-123": {
    "narrations": [  # annotator A, unsorted, and annotator B
        {"time": 2.2, "text": "#C C opens the tap .", "_annotation_uid": "A", "_clip_uid": "c1"},
        {"time": 1.2, "text": "#C C picks a cup", "_annotation_uid": "A"},
        {"time": 1.4, "text": "#c C looks around", "_annotation_uid": "A"},
        {"time": 2.1, "text": "#C C opens the tap", "_annotation_uid": "A"},
        {"time": 2.9, "text": "#unsure", "_annotation_uid": "A"},
        {"time": 4.01, "text": "#O a man X walks in .", "_annotation_uid": "A"},
        {"time": 7.0, "text": "#C C drinks water", "_annotation_uid": "B"}],
    "summaries": [{"start_time": 0.0, "end_time": 10.0, "text": "#Summary C makes tea", "_annotation_uid": "A"}]}}}


def test_clean_narration_removes_tags_and_normalises_punctuation():
    assert ego4d.clean_narration("#C C picks a cup .") == "C picks a cup."
    assert ego4d.clean_narration("#O a man X walks in,") == "A man X walks in."
    assert ego4d.clean_narration("#unsure #C ") == ""
    assert ego4d.clean_narration("#Unsure C  holds   something #unsure") == "C holds something."


def test_ego4d_redacted_file_gives_one_stream_per_annotator(tmp_path):
    source = write_json(tmp_path / "all_narrations_redacted.json", EGO4D_REDACTED)
    a, b = run(tmp_path, "ego4d-narration", source)
    assert (a.id, a.video, a.start_s, a.end_s, a.duration_s) == ("abc-123-A", "abc-123.mp4", 1.5, 5.0, None)
    assert turns(a) == [
        ("user", 1.5, ego4d.NARRATION_INSTRUCTION),
        ("assistant", 1.5, "C picks a cup. C looks around."),  # the first narrations answer the instruction
        ("assistant", 2.5, "C opens the tap."),  # its repeat at 2.2 is skipped; "#unsure" alone is dropped
        ("assistant", 4.5, "A man X walks in.")]
    assert turns(b) == [("user", 7.0, ego4d.NARRATION_INSTRUCTION), ("assistant", 7.0, "C drinks water.")]
    assert (b.id, b.start_s, b.end_s) == ("abc-123-B", 7.0, 7.5)


def test_ego4d_narration_json_gives_one_stream_per_pass(tmp_path, monkeypatch):
    def narration(t, text):
        return {"timestamp_sec": t, "timestamp_frame": round(t * 30), "narration_text": text,
                "annotation_uid": "u", "narration_annotation_uid": "n"}
    source = write_json(tmp_path / "narration.json", {"xyz": {
        "narration_pass_1": {"narrations": [narration(0.3, "#C C stands up"), narration(3.0, "#C C sits")],
                             "summaries": []},
        "narration_pass_2": {"narrations": [narration(0.0, "#C C walks")], "summaries": []}}})
    monkeypatch.chdir(tmp_path)  # a relative --video-root is taken from the current directory
    (tmp_path / "videos").mkdir()
    (tmp_path / "videos" / "xyz.mp4").write_bytes(b"")
    one, two = run(tmp_path, "ego4d-narration", source, video_root="videos")
    assert (one.id, one.video) == ("xyz-narration_pass_1", "../videos/xyz.mp4")
    assert turns(one)[1:] == [("assistant", 0.5, "C stands up."), ("assistant", 3.0, "C sits.")]
    assert turns(two)[1:] == [("assistant", 0.0, "C walks.")]


def test_ego4d_video_root_checks_videos_and_can_skip_missing_ones(tmp_path):
    source = write_json(tmp_path / "all_narrations_redacted.json", EGO4D_REDACTED)
    videos = tmp_path / "videos"
    videos.mkdir()
    with pytest.raises(AnnotationError, match=re.escape(f"{source}: video abc-123: video ") + ".*abc-123.mp4 does "
                       "not exist; download it, point --video-root at the folder that holds the videos, or pass "
                       "--skip-missing"):
        run(tmp_path, "ego4d-narration", source, video_root=str(videos))
    with pytest.raises(AnnotationError, match="no dialogue could be made"):
        run(tmp_path, "ego4d-narration", source, video_root=str(videos), skip_missing=True)
    (videos / "abc-123.mp4").write_bytes(b"")
    assert run(tmp_path, "ego4d-narration", source, video_root=str(videos))[0].video == str(videos / "abc-123.mp4")


def test_ego4d_narration_without_time_names_the_video_and_index(tmp_path):
    source = write_json(tmp_path / "n.json", {"videos": {"v1": {"narrations": [{"text": "#C C runs"}]}}})
    with pytest.raises(AnnotationError, match=re.escape(f"{source}: video v1: narrations[0]: time: missing")):
        run(tmp_path, "ego4d-narration", source)


# ---------------------------------------------------------------------------------------------------
# coin

COIN_JSON = {"database": {
    "yt1": {"recipe_type": 12, "class": "ReplaceBatteryOnKey", "subset": "training", "start": 2.0, "end": 20.0,
            "duration": 20.0, "video_url": "https://www.youtube.com/embed/yt1",
            "annotation": [{"id": "30", "segment": [12.0, 20.0], "label": "close the cover"},
                           {"id": "28", "segment": [2.0, 5.2], "label": "remove the cover"},
                           {"id": "29", "segment": [5.2, 9.0], "label": "place the battery"}]},
    "yt2": {"recipe_type": 3, "class": "MakeRJ45Cable", "subset": "testing", "duration": 8.0, "start": 0.0,
            "end": 8.0, "annotation": [{"id": "1", "segment": [0.0, 3.0], "label": "cut the cable"}]}}}


def test_coin_step_stream_says_each_step_start_and_end(tmp_path):
    source = write_json(tmp_path / "COIN.json", COIN_JSON)
    key = run(tmp_path, "coin", source, subset="training")
    assert [d.id for d in key] == ["yt1-steps"]
    (d,) = key
    assert (d.video, d.start_s, d.end_s, d.meta["task"]) == ("yt1.mp4", 0.0, 20.0, "replace battery on key")
    prompts = [p.format(task="replace battery on key") for p in coin.GUIDE_PROMPTS]
    assert turns(d)[0][:2] == ("user", 0.0) and turns(d)[0][2] in prompts
    assert turns(d)[1][:2] == ("assistant", 0.0) and turns(d)[1][2] in coin.GUIDE_ACKS
    assert turns(d)[2:] == [
        ("assistant", 2.0, "Now doing the step to remove the cover. Then try to place the battery."),
        ("assistant", 5.5, "Just finished the step to remove the cover. Next, try to place the battery. "
                           "Now doing the step to place the battery. Then try to close the cover."),
        ("assistant", 9.0, "Just finished the step to place the battery. Next, try to close the cover."),
        ("assistant", 12.0, "Now doing the step to close the cover. This is the last step."),
        ("assistant", 19.5, "Just finished the step to close the cover. The task is done.")]  # last frame


def test_coin_first_step_at_the_first_frame_answers_the_request(tmp_path):
    source = write_json(tmp_path / "COIN.json", COIN_JSON)
    (d,) = run(tmp_path, "coin", source, subset="testing")
    assert turns(d)[1:] == [("assistant", 0.0, "Now doing the step to cut the cable. This is the last step."),
                            ("assistant", 3.0, "Just finished the step to cut the cable. The task is done.")]


def test_coin_benchmark_samples(tmp_path):
    source = write_json(tmp_path / "COIN.json", COIN_JSON)
    bench = tmp_path / "out" / "coin_bench.jsonl"
    run(tmp_path, "coin", source, subset="train", benchmarks=str(bench))
    samples = {s["id"]: s for s in map(json.loads, bench.read_text().splitlines())}
    assert sorted(samples) == sorted(["yt1-task-0", "yt1-step-0", "yt1-step-1", "yt1-step-2", "yt1-next-0",
                                      "yt1-next-1", "yt1-procedure-0", "yt1-procedure-1", "yt1-procedure+-0",
                                      "yt1-procedure+-1"])
    assert samples["yt1-task-0"] | {"question": ""} == {
        "id": "yt1-task-0", "benchmark": "task", "video": "yt1.mp4", "fps": 2.0, "start_s": 2.0, "end_s": 20.0,
        "num_frames": 36, "question": "", "answer": "Replace battery on key.",
        "labels": ["replace battery on key"], "task": "replace battery on key", "subset": "training"}
    step = samples["yt1-step-1"]
    assert (step["start_s"], step["end_s"], step["num_frames"], step["answer"], step["labels"]) == (
        5.5, 9.5, 8, "Place the battery.", ["place the battery"])
    assert step["question"] == "What is the action in the video? Format your answer concisely. No extra text output."
    assert (samples["yt1-next-1"]["answer"], samples["yt1-next-1"]["start_s"]) == ("Close the cover.", 5.5)
    proc = samples["yt1-procedure-0"]
    assert proc["question"].startswith("What is the next 2 actions for the video? Format your answer concisely, "
                                       "listing each action on a new line")
    assert (proc["answer"], proc["labels"]) == ("1. Place the battery.\n2. Close the cover.",
                                                ["place the battery", "close the cover"])
    plus = samples["yt1-procedure+-1"]
    assert plus["question"] == ("To replace battery on key, what is the next action for the video? Format your "
                                "answer concisely. No extra text output.")
    assert plus["answer"] == "Close the cover."


def test_coin_task_names_keep_acronyms():
    assert coin.clean_task("ReplaceBatteryOnTVRemote") == "replace battery on TV remote"
    assert coin.clean_task("MakeRJ45Cable") == "make RJ45 cable"


def test_coin_bad_segment_names_the_video_and_step(tmp_path):
    bad = {"database": {"yt9": {"class": "A", "subset": "training", "duration": 5.0,
                                "annotation": [{"id": "1", "segment": [3.0, 1.0], "label": "x"}]}}}
    source = write_json(tmp_path / "COIN.json", bad)
    with pytest.raises(AnnotationError, match=re.escape(f"{source}: database.yt9.annotation[0]: segment: expected "
                                                        "[start, end] seconds with start <= end, got [3.0, 1.0]")):
        run(tmp_path, "coin", source)


# ---------------------------------------------------------------------------------------------------
# segments


def test_segments_jsonl_gives_one_narration_per_video(tmp_path, monkeypatch):
    source = write_jsonl(tmp_path / "captions.jsonl", [
        {"video": "v_b", "start": 0.2, "end": 3.0, "text": "a man opens the door.", "duration": 12.0},
        {"video": "v_a.mkv", "start": 4.0, "end": 6.0, "text": "She waves."},
        {"video": "v_b", "start": 6.1, "end": 9.0, "text": "He sits down."},
        {"video": "v_b", "start": 2.9, "end": 5.0, "text": "He walks in."}])
    monkeypatch.chdir(tmp_path)
    (tmp_path / "clips").mkdir()
    for name in ("v_b.mp4", "v_a.mkv"):
        (tmp_path / "clips" / name).write_bytes(b"")
    b, a = run(tmp_path, "segments", source, video_root="clips")
    assert (b.id, b.video, b.end_s, b.duration_s) == ("v_b", "../clips/v_b.mp4", 12.0, 12.0)
    assert turns(b)[0][2] in segments.NARRATION_PROMPTS and turns(b)[1][2] in segments.NARRATION_ACKS
    assert turns(b)[2:] == [("assistant", 0.5, "A man opens the door."), ("assistant", 3.0, "He walks in."),
                            ("assistant", 6.5, "He sits down.")]
    assert (a.id, a.video, a.end_s, a.duration_s) == ("v_a.mkv", "../clips/v_a.mkv", 6.0, None)
    assert turns(a)[2:] == [("assistant", 4.0, "She waves.")]


def test_segments_can_be_said_when_they_end(tmp_path):
    source = write_json(tmp_path / "captions.json", [{"video": "v", "start": 0.0, "end": 2.2, "text": "Hi."}])
    (d,) = run(tmp_path, "segments", source, segment_time="end")
    assert turns(d)[1:] == [("assistant", 0.0, turns(d)[1][2]), ("assistant", 2.0, "Hi.")]  # clamped: last frame
    assert d.end_s == 2.2


def test_segments_read_activitynet_captions(tmp_path):
    source = write_json(tmp_path / "train.json", {"v_QOlSCBRmfWY": {
        "duration": 82.73, "timestamps": [[0.83, 19.86], [17.37, 60.81]],
        "sentences": ["A young woman is seen standing in a room.", " She then begins dancing around."]}})
    (d,) = run(tmp_path, "segments", source)
    assert (d.video, d.duration_s) == ("v_QOlSCBRmfWY.mp4", 82.73)
    assert turns(d)[2:] == [("assistant", 1.0, "A young woman is seen standing in a room."),
                            ("assistant", 17.5, "She then begins dancing around.")]


def test_segments_read_youcook2(tmp_path):
    source = write_json(tmp_path / "youcookii_annotations.json", {"database": {"GLd3aX16zBg": {
        "duration": 241.62, "subset": "training", "recipe_type": "113",
        "annotations": [{"segment": [90, 102], "id": 0, "sentence": "spread margarine on two slices of bread"}]}}})
    (d,) = run(tmp_path, "segments", source)
    assert turns(d)[2:] == [("assistant", 90.0, "Spread margarine on two slices of bread")]


def test_segments_missing_field_names_the_record(tmp_path):
    source = write_jsonl(tmp_path / "s.jsonl", [{"video": "a", "start": 0, "end": 1, "text": "x"},
                                               {"video": "a", "start": 2, "text": "y"}])
    with pytest.raises(AnnotationError, match=re.escape(f"{source} line 2: end: missing; each record needs video")):
        run(tmp_path, "segments", source)


# ---------------------------------------------------------------------------------------------------
# shared errors and guarantees


def test_the_registry_lists_every_converter_and_rejects_unknown_names():
    assert list(CONVERTERS) == ["world", "world-scene", "world-changes", "world-reminders", "world-narration",
                                "world-questions", "ego4d-narration", "coin", "segments"]
    with pytest.raises(AnnotationError, match="unknown source format 'epic'; choose one with --from: world, "
                                              "world-scene, world-changes, world-reminders, world-narration, "
                                              "world-questions, ego4d-narration, coin, segments"):
        get_converter("epic")


@pytest.mark.parametrize("kind", list(CONVERTERS))
def test_an_empty_annotation_file_is_a_clear_error(tmp_path, kind):
    source = tmp_path / "empty.json"
    source.write_text("\n")
    with pytest.raises(AnnotationError, match=re.escape(f"{source} is empty: there is nothing to convert")):
        run(tmp_path, kind, source)


def test_a_malformed_jsonl_line_names_file_and_line(tmp_path):
    source = tmp_path / "annotations.jsonl"
    source.write_text('{"video": "a.mp4", "duration_s": 5, "events": []}\n{"video": "b.mp4", "dur\n')
    with pytest.raises(AnnotationError, match=re.escape(f"{source} line 2: not valid JSON (column 20: "
                                                        "Unterminated string starting at); each line must be")):
        run(tmp_path, "world", source)


def test_a_truncated_json_file_names_line_and_column(tmp_path):
    source = tmp_path / "COIN.json"
    source.write_text(json.dumps(COIN_JSON, indent=1)[:200])
    with pytest.raises(AnnotationError, match=re.escape(f"{source} line ") + r"\d+: not valid JSON .*truncated"):
        run(tmp_path, "coin", source)


def test_a_failed_conversion_keeps_the_previous_output(tmp_path):
    out = tmp_path / "out" / "dialogue.jsonl"
    run(tmp_path, "world", world_file(tmp_path))
    before = out.read_bytes()
    broken = write_jsonl(tmp_path / "broken.jsonl", [{"video": "v.mp4", "events": []}])
    with pytest.raises(AnnotationError, match="duration_s: missing; each line needs video, duration_s, events"):
        run(tmp_path, "world", broken)
    assert out.read_bytes() == before
    assert sorted(p.name for p in out.parent.iterdir()) == ["dialogue.jsonl"]


def test_the_output_may_not_overwrite_the_input(tmp_path):
    source = world_file(tmp_path)
    with pytest.raises(AnnotationError, match="would overwrite the annotations"):
        convert(ConvertOptions(input=str(source), output=str(source), kind="world"))


def test_stream_builder_orders_events_before_a_query_on_the_same_frame():
    from livevlm.data.converters.common import StreamBuilder

    builder = StreamBuilder(2.0, 0.0, 10.0)
    builder.ask(3.2, "What now?", "Nothing.")
    builder.say(2.9, "A circle appears.")
    builder.say(3.0, "It grows.")
    builder.say(11.0, "After the end.")
    assert builder.turns() == [Turn("assistant", 3.0, "A circle appears. It grows."), Turn("user", 3.0, "What now?"),
                               Turn("assistant", 3.0, "Nothing.")]
