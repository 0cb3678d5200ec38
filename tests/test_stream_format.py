"""The stream layout on a tiny in-process tokenizer: targets, errors, and the engine's step-wise inputs."""

import pytest

from livevlm.config import FormatConfig
from livevlm.stream_format import (
    IGNORE,
    Frames,
    Message,
    StreamFormat,
    StreamFormatError,
    count_frames,
    frame_index,
    register_placeholder,
    timeline_to_items,
)


@pytest.fixture
def fmt(tiny_tokenizer):
    register_placeholder(tiny_tokenizer)
    return StreamFormat(tiny_tokenizer, FormatConfig(), tokens_per_frame=2)


def frame_labels(rendered):
    return [lab for lab, is_frame_end in zip(rendered.labels, rendered.frame_target, strict=True) if is_frame_end]


def test_frame_targets_silence_then_speak(fmt):
    rendered = fmt.render([Frames(3), Message("assistant", "It stopped.")])
    assert frame_labels(rendered) == [fmt.separator_id, fmt.separator_id, fmt.speak_id]


def test_only_the_last_token_of_a_frame_is_a_frame_target(fmt):
    rendered = fmt.render([Frames(2)])
    v = fmt.placeholder_id
    positions = [i for i, t in enumerate(rendered.input_ids) if t == v]
    assert [rendered.labels[i] for i in positions] == [IGNORE, fmt.separator_id, IGNORE, fmt.separator_id]


def test_frame_before_user_query_is_unlabelled(fmt):
    rendered = fmt.render([Frames(2), Message("user", "What just happened?"), Message("assistant", "It stopped.")])
    last_frame_end = max(i for i, t in enumerate(rendered.input_ids) if t == fmt.placeholder_id)
    assert rendered.labels[last_frame_end] == IGNORE
    assert not rendered.frame_target[last_frame_end]
    assert frame_labels(rendered) == [fmt.separator_id]


def test_response_tokens_and_eos_are_learned_context_is_not(fmt, tiny_tokenizer):
    rendered = fmt.render([Frames(1), Message("assistant", "It stopped.")])
    learned = [lab for lab, is_frame in zip(rendered.labels, rendered.frame_target, strict=True)
               if lab != IGNORE and not is_frame]
    # "]" predicted at the frame; then "\n", "Assistant", ":", " It stopped." and eos are learned.
    expected_text = tiny_tokenizer.encode("]\nAssistant: It stopped.", add_special_tokens=False)[1:]
    assert learned == expected_text + [tiny_tokenizer.eos_token_id]


def test_render_matches_whole_string_tokenisation_of_the_official_template(fmt, tiny_tokenizer):
    rendered = fmt.render([Frames(1), Message("user", "Hi?"), Message("assistant", "Sure."), Frames(1)])
    text = (f"<s>{fmt.config.system_prompt}\n\n[<v><v>]\nUser: Hi?\nAssistant: Sure.</s>\n[<v><v>")
    assert rendered.input_ids == tiny_tokenizer.encode(text, add_special_tokens=False)


def test_v1_layout_without_separator_uses_eos_for_silence(tiny_tokenizer):
    register_placeholder(tiny_tokenizer)
    fmt = StreamFormat(tiny_tokenizer, FormatConfig(separator=""), tokens_per_frame=1)
    rendered = fmt.render([Frames(3), Message("assistant", "Go.")])
    v = fmt.placeholder_id
    start = rendered.input_ids.index(v)
    assert rendered.input_ids[start:start + 3] == [v, v, v]
    assert frame_labels(rendered) == [tiny_tokenizer.eos_token_id, tiny_tokenizer.eos_token_id, fmt.speak_id]


@pytest.fixture
def decision_fmt(tiny_tokenizer):
    register_placeholder(tiny_tokenizer)
    return StreamFormat(tiny_tokenizer, FormatConfig(decision="|"), tokens_per_frame=2)


def test_a_decision_token_follows_each_frame_and_holds_its_target(decision_fmt, tiny_tokenizer):
    rendered = decision_fmt.render([Frames(2), Message("assistant", "It stopped.")])
    (bar,) = tiny_tokenizer.encode("|", add_special_tokens=False)
    v, sep = decision_fmt.placeholder_id, decision_fmt.separator_id
    start = rendered.input_ids.index(v)
    assert rendered.input_ids[start:start + 7] == [v, v, bar, sep, v, v, bar]
    assert rendered.frame_ends == [start + 2, start + 6]  # the decision tokens, not the last placeholders
    assert [rendered.labels[i] for i in range(start, start + 7)] == [
        IGNORE, IGNORE, sep, IGNORE, IGNORE, IGNORE, decision_fmt.speak_id]


def test_engine_inputs_with_a_decision_token_concatenate_to_the_training_render(decision_fmt):
    steps = (decision_fmt.prompt_ids() + decision_fmt.frame_ids(True) + decision_fmt.frame_ids(False)
             + decision_fmt.speak_ids() + decision_fmt.response_ids("Go.") + [decision_fmt.eos_id]
             + decision_fmt.reopen_ids() + decision_fmt.frame_ids(True))
    rendered = decision_fmt.render([Frames(2), Message("assistant", "Go."), Frames(1)])
    assert steps == rendered.input_ids


@pytest.mark.parametrize("decision", [",", "]", "<v>", "EOS", " next frame"])
def test_a_decision_token_that_is_not_one_token_of_its_own_is_rejected(tiny_tokenizer, decision):
    register_placeholder(tiny_tokenizer)
    decision = tiny_tokenizer.eos_token if decision == "EOS" else decision
    with pytest.raises(StreamFormatError, match="format.decision"):
        StreamFormat(tiny_tokenizer, FormatConfig(decision=decision), tokens_per_frame=1)


@pytest.fixture
def note_fmt(tiny_tokenizer):
    register_placeholder(tiny_tokenizer)
    return StreamFormat(tiny_tokenizer, FormatConfig(note_role="Note"), tokens_per_frame=1)


def learned_after(rendered, tokenizer, text):
    """The targets from the first token of `text` (its last occurrence in the render) to the end: (token, label)
    pairs."""
    ids = tokenizer.encode(text, add_special_tokens=False)
    start = max(i for i in range(len(rendered.input_ids)) if rendered.input_ids[i:i + len(ids)] == ids)
    return list(zip(rendered.input_ids[start:], rendered.labels[start:], strict=True))


def test_a_note_then_frames_learns_to_go_on_watching(note_fmt, tiny_tokenizer):
    rendered = note_fmt.render([Frames(1), Message("note", "A cat."), Frames(1)])
    enc = lambda text: tiny_tokenizer.encode(text, add_special_tokens=False)  # noqa: E731
    assert frame_labels(rendered) == [note_fmt.speak_id, note_fmt.separator_id]
    v, eos = note_fmt.placeholder_id, tiny_tokenizer.eos_token_id
    # "]", "\n", "Note", ":", " A cat." and eos are learned as a response's are; then "\n[" too (the choice to go
    # on watching), and nothing from the frame on but its own silence target.
    tail = learned_after(rendered, tiny_tokenizer, "]\nNote: A cat.")
    ids = enc("]\nNote: A cat.") + [eos] + enc("\n[") + [v]
    assert [token for token, _ in tail] == ids
    assert [label for _, label in tail] == ids[1:-1] + [IGNORE, note_fmt.separator_id]  # "[" -> frame: not learned


def test_a_note_then_an_answer_learns_to_answer(note_fmt, tiny_tokenizer):
    rendered = note_fmt.render([Frames(1), Message("note", "A cat."), Message("assistant", "There it is.")])
    eos = tiny_tokenizer.eos_token_id
    tail = learned_after(rendered, tiny_tokenizer, "]\nNote: A cat.")
    ids = (tiny_tokenizer.encode("]\nNote: A cat.", add_special_tokens=False) + [eos]
           + tiny_tokenizer.encode("\nAssistant: There it is.", add_special_tokens=False) + [eos])
    assert [token for token, _ in tail] == ids
    assert [label for _, label in tail] == ids[1:] + [IGNORE]  # every token after the frame is learned


def test_a_response_is_followed_by_unlearned_frames_as_before(note_fmt, tiny_tokenizer):
    rendered = note_fmt.render([Frames(1), Message("assistant", "A cat."), Frames(1)])
    tail = learned_after(rendered, tiny_tokenizer, "\n[")
    assert [label for _, label in tail] == [IGNORE, IGNORE, note_fmt.separator_id]  # only the frame's silence


def test_engine_inputs_with_notes_concatenate_to_the_training_render(note_fmt):
    f = note_fmt
    steps = (f.prompt_ids() + f.frame_ids(True) + f.note_ids() + f.response_ids("A cat.") + [f.eos_id]
             + f.reopen_ids() + f.frame_ids(True) + f.note_ids() + f.response_ids("A dog.") + [f.eos_id]
             + f.answer_after_note_ids() + f.response_ids("There it is.") + [f.eos_id] + f.reopen_ids()
             + f.frame_ids(True))
    rendered = f.render([Frames(1), Message("note", "A cat."), Frames(1), Message("note", "A dog."),
                         Message("assistant", "There it is."), Frames(1)])
    assert steps == rendered.input_ids


def test_a_note_needs_a_format_with_notes(fmt):
    with pytest.raises(StreamFormatError, match="format.note_role"):
        fmt.render([Frames(1), Message("note", "A cat.")])


@pytest.mark.parametrize("before", [[Message("user", "Hi?"), Message("assistant", "Hello.")],
                                    [Message("note", "A dog.")]])
def test_a_note_must_follow_frames(note_fmt, before):
    with pytest.raises(StreamFormatError, match="must follow frames"):
        note_fmt.render([Frames(1), *before, Message("note", "A cat.")])


@pytest.mark.parametrize("role", ["User", "Assistant"])
def test_a_note_role_equal_to_another_role_is_rejected(role):
    from livevlm.config import ConfigError

    with pytest.raises(ConfigError, match="format.note_role"):
        FormatConfig(note_role=role)


def test_engine_inputs_concatenate_to_the_training_render(fmt):
    """The engine's step-wise ids (prompt, frames, speak + response, query, reopen) equal the render."""
    steps = (fmt.prompt_ids() + fmt.frame_ids(True) + fmt.frame_ids(False)
             + fmt.speak_ids() + fmt.response_ids("It stopped.") + [fmt.eos_id]
             + fmt.query_ids("What just happened?", run_open=False) + fmt.response_ids("A circle.") + [fmt.eos_id]
             + fmt.reopen_ids() + fmt.frame_ids(True)
             + fmt.query_ids("Where?", run_open=True) + fmt.response_ids("Left.") + [fmt.eos_id])
    rendered = fmt.render([Frames(2), Message("assistant", "It stopped."), Message("user", "What just happened?"),
                           Message("assistant", "A circle."), Frames(1), Message("user", "Where?"),
                           Message("assistant", "Left.")])
    assert steps == rendered.input_ids


def test_conversation_starting_with_assistant_is_rejected(fmt):
    with pytest.raises(StreamFormatError, match="must start with system, user or frames"):
        fmt.render([Message("assistant", "Hello.")])


def test_zero_frame_run_is_rejected(fmt):
    with pytest.raises(StreamFormatError, match="at least one frame"):
        fmt.render([Frames(0), Message("assistant", "Hello.")])


def test_system_message_must_come_first(fmt):
    with pytest.raises(StreamFormatError, match="system message may only come first"):
        fmt.render([Frames(1), Message("system", "Hi.")])


def test_separator_of_two_tokens_is_rejected(tiny_tokenizer):
    register_placeholder(tiny_tokenizer)
    with pytest.raises(StreamFormatError, match="exactly one token"):
        StreamFormat(tiny_tokenizer, FormatConfig(separator=", next"), tokens_per_frame=1)


def test_separator_equal_to_speak_token_is_rejected(tiny_tokenizer):
    register_placeholder(tiny_tokenizer)
    with pytest.raises(StreamFormatError, match="equals the speak token"):
        StreamFormat(tiny_tokenizer, FormatConfig(separator="]"), tokens_per_frame=1)


def test_unregistered_placeholder_is_rejected_naming_the_fix(tiny_tokenizer):
    with pytest.raises(StreamFormatError, match="register_placeholder"):
        StreamFormat(tiny_tokenizer, FormatConfig(), tokens_per_frame=1)


def test_timeline_places_turns_after_their_frame():
    turns = [("user", 0.0, "Narrate."), ("assistant", 0.0, "Sure."), ("assistant", 1.5, "A circle appears."),
             ("assistant", 9.0, "Cut off.")]
    items = timeline_to_items(turns, num_frames=5, fps=2.0)
    assert items == [Frames(1), Message("user", "Narrate."), Message("assistant", "Sure."), Frames(3),
                     Message("assistant", "A circle appears."), Frames(1)]


def test_a_clip_has_a_frame_for_every_started_frame_interval():
    # [10, 20) at 2 fps: frames at 10.0, 10.5, ..., 19.5; float noise in the end does not add a frame
    assert count_frames(10.0, 20.0, 2.0) == 20
    assert count_frames(0.0, 30.000000001, 2.0) == 60
    assert count_frames(0.0, 0.1, 2.0) == 1
    assert count_frames(5.0, 5.0, 2.0) == 0 == count_frames(5.0, 4.0, 2.0)
    # a turn at the clip's last instant follows its last frame
    assert frame_index(19.99, 2.0, start_s=10.0) == count_frames(10.0, 20.0, 2.0) - 1
