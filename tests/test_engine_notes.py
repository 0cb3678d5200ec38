"""Notes (`format.note_role`) in the engine: the training layout on every path, the model's own choices, rebuilds."""

import pytest
import torch

import test_engine as base  # the scripted bigram LLM and the frame helpers (a module: its tests stay its own)
from conftest import bias_separator
from livevlm.config import EngineConfig, FormatConfig
from livevlm.engine import NoteEvent, ResponseEvent, StreamSession, TokenEvent
from livevlm.model import LiveModel
from livevlm.stream_format import Frames, Message, StreamFormat, fork, register_placeholder

SCRIPT = base.SCRIPT


@pytest.fixture
def fmt(tiny_tokenizer):
    register_placeholder(tiny_tokenizer)
    return StreamFormat(tiny_tokenizer, FormatConfig(note_role="Note"), tokens_per_frame=base.N)


class ScriptedChoices(StreamSession):
    """A session whose two choices (note or respond; after a note, answer or watch) follow a script."""

    def __init__(self, *args, choices, **kwargs):
        super().__init__(*args, **kwargs)
        self.choices = iter(choices)

    def _prefers(self, logits, first, second):
        return next(self.choices)


def test_every_path_of_a_note_feeds_the_training_layout(fmt):
    # every frame speaks; frame 0 notes and watches, frame 1 notes and answers, frame 2 responds at once
    session = ScriptedChoices(base.scripted_model(fmt), fmt, EngineConfig(threshold=1.0), record_fed_ids=True,
                              choices=[True, False, True, True, False])
    tokens, times = base.frames(3)
    first = list(session.step_events(tokens[:1], times[:1]))
    session.add_query("Where?", time_s=0.2)
    rest = list(session.step_events(tokens[1:], times[1:]))
    script_ids = tuple(fmt.response_ids(SCRIPT))
    notes = [e for e in first + rest if isinstance(e, NoteEvent)]
    assert [(e.time_s, e.text, e.token_ids, e.answered) for e in notes] == [
        (0.0, SCRIPT, script_ids, False), (0.5, SCRIPT, script_ids, True)]
    assert base.responses(rest) == [(0.2, SCRIPT, True), (0.5, SCRIPT, False), (1.0, SCRIPT, False)]
    # a note is never shown: only the three responses' tokens come as TokenEvents
    assert sum(isinstance(e, TokenEvent) for e in first + rest) == 3 * len(script_ids)
    expected = fmt.render([Frames(1), Message("note", SCRIPT), Message("user", "Where?"),
                           Message("assistant", SCRIPT), Frames(1), Message("note", SCRIPT),
                           Message("assistant", SCRIPT), Frames(1), Message("assistant", SCRIPT)])
    assert session.fed_ids == expected.input_ids
    assert session.cache_ids == session.fed_ids[:-1] and session.cache_length == len(session.cache_ids)  # eos waits


def choices_in(fmt, ids):
    """(position, chosen id, the other id) of every choice a note brings in a fed stream: note or respond after a
    frame's "]\\n…", answer or watch after a note's eos (where the stream goes on after it)."""
    header, note = fmt.speak_ids(), fmt.note_ids()
    answer, reopen = fmt.answer_after_note_ids(), fmt.reopen_ids()
    heads, tails = fork(header, note), fork(answer, reopen)
    found = []
    for start in [i + 1 for i, token in enumerate(ids[:-1]) if token == fmt.placeholder_id
                  and ids[i + 1] != fmt.placeholder_id]:
        if ids[start:start + heads] != header[:heads] or start + heads >= len(ids):
            continue  # a separator: the frame stayed silent
        chosen = ids[start + heads]
        other = header[heads] if chosen == note[heads] else note[heads]
        found.append((start + heads - 1, chosen, other))
        if chosen == note[heads]:
            eos = ids.index(fmt.eos_id, start + len(note))
            if eos + 1 + tails < len(ids):
                chosen = ids[eos + 1 + tails]
                found.append((eos + tails, chosen, reopen[tails] if chosen == answer[tails] else answer[tails]))
    return found


def run_and_score(model, fmt, tokens, times):
    """Stream the frames; → (the session's events, (chosen − other logit) at each choice in one teacher-forced
    forward of everything the session fed)."""
    session = StreamSession(model, fmt, EngineConfig(threshold=1.0, max_new_tokens=3), record_fed_ids=True)
    events = session.step(tokens, times)
    with torch.no_grad():
        logits, _, _ = model(torch.tensor([session.fed_ids]), tokens)
    margins = [(logits[0, p, chosen] - logits[0, p, other]).item() for p, chosen, other in
               choices_in(fmt, session.fed_ids)]
    return events, margins


# A random model's margins at the two forks drift a little from frame to frame (~0.005); biases found by a sweep put
# each fork's flip mid-stream, so a choice read at any other position would disagree with the reference there.
@pytest.mark.parametrize(("note_bias", "answer_bias", "answered"), [
    (-0.07, -0.09, [False] * 6 + [True] * 4),  # always a note; goes on watching, then answers
    (-0.07, 0.0, [True] * 5),  # a note and its answer, then responses without a note
])
def test_the_choices_are_the_models_predictions_where_the_continuations_part(fmt, tiny_llm, note_bias, answer_bias,
                                                                            answered):
    torch.manual_seed(3)
    model = bias_separator(LiveModel(tiny_llm, base.D, fmt.placeholder_id).eval(), fmt.separator_id, 0.0)
    header, note = fmt.speak_ids(), fmt.note_ids()
    answer, reopen = fmt.answer_after_note_ids(), fmt.reopen_ids()
    with torch.no_grad():
        model.connector.fc2.weight.mul_(10)  # frames that move the choices from one frame to the next
        model.llm.lm_head.bias[note[fork(header, note)]] = note_bias
        model.llm.lm_head.bias[answer[fork(answer, reopen)]] = answer_bias
    events, margins = run_and_score(model, fmt, *base.frames(10))
    assert min(margins) > 1e-4  # each choice the engine made is the likelier continuation, by more than rounding
    assert [e.answered for e in events if isinstance(e, NoteEvent)] == answered
    assert sum(isinstance(e, ResponseEvent) for e in events) == 10 - answered.count(False)


def test_a_rebuilt_cache_with_notes_is_the_render_of_the_kept_conversation(fmt):
    session = ScriptedChoices(base.scripted_model(fmt), fmt, EngineConfig(threshold=1.0, window_frames=6),
                              choices=[True, False] * 20)  # every frame: a note, then go on watching
    tokens, times = base.frames(20)
    session.add_query("Narrate.", time_s=0.0)
    session.step(tokens, times)
    kept = session.cache_ids.count(fmt.placeholder_id) // base.N
    assert session.windowed and 1 <= kept <= 6
    items = [Message("user", "Narrate."), Message("assistant", SCRIPT)]
    for _ in range(kept):
        items += [Frames(1), Message("note", SCRIPT)]
    assert session.cache_ids == fmt.render(items).input_ids[:-1]  # the last note's eos waits for the next frame
    assert session.cache_length == len(session.cache_ids)
