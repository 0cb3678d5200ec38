"""The interleaved stream layout: conversations of frames and turns → token ids and token-level labels.

The official VideoLLM-online v1+ layout (a plain-text template, not the LLM's chat template):

    <bos>{system}\\n
    \\n[<v>…<v>,<v>…<v>,…]\\nUser: {query}
    \\nAssistant: {response}<eos>
    \\n[<v>…<v>,…]\\nAssistant: {response}<eos>

How labels are built (nanochat's `render_conversation` idea): the stream is a list of *pieces*, each a
special token id (bos, `<v>`, eos) or a text, with a flag saying whether it is learned. Neighbouring
text pieces with the same flag are tokenised as one string, so the ids match a whole-string tokenisation
of the official template (Llama-3 merges "]\\n" and ".\\n\\n"); the flag changes only at "\\n" | "Assistant",
a pre-tokeniser boundary of every BPE tokenizer we know. Labels are *targets*: `labels[i]` is the token
position i must predict (already shifted), -100 where nothing is learned:

* the last token of every frame predicts the separator (stay silent) or the first token of the closing
  "]\\n" (speak: an assistant turn follows); this is the frame target, weighted by the stream-loss weight.
  With `format.decision` set, each frame's placeholders are followed by that text token, and it is the frame's
  last token: the decision is read at a text position rather than at a frame token;
* the frame just before a user query is NOT labelled (it cannot know a query is coming: a defect of the
  public code fixed here);
* response tokens — "Assistant", ":", the text and eos — are learned; everything else is context.

With `separator=""` frames are not separated (the one-token-per-frame v1 layout) and the silence target
is eos. The streaming engine builds its inputs from the same pieces (`StreamFormat.*_ids`), so inference
sees exactly the layout training saw.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

from livevlm.config import FormatConfig

IGNORE = -100
Role = Literal["system", "user", "assistant", "note"]


class StreamFormatError(ValueError):
    """A conversation or tokenizer cannot be rendered in the stream layout; the message says why."""


@dataclass(frozen=True)
class Frames:
    """A run of `count` consecutive video frames."""

    count: int


@dataclass(frozen=True)
class Message:
    role: Role
    text: str


Item = Frames | Message


@dataclass
class RenderedStream:
    """Token ids with targets. All lists have the same length L.

    labels[i]: the token position i must predict, or -100 (IGNORE).
    frame_target[i]: True where labels[i] is a frame's stay-silent / speak target.
    frame_ends: the position of every frame's last token, labelled or not (one per frame, in order).
    """

    input_ids: list[int]
    labels: list[int]
    frame_target: list[bool]
    num_frames: int
    frame_ends: list[int] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.input_ids)


@dataclass
class _Piece:
    text: str = ""
    token_id: int | None = None  # a special token instead of text
    learned: bool = False
    frame_end: bool = False  # only for placeholder pieces: the last token of a frame


@dataclass
class _Pieces:
    items: list[_Piece] = field(default_factory=list)

    def text(self, text: str, learned: bool = False) -> None:
        if text:
            self.items.append(_Piece(text=text, learned=learned))

    def special(self, token_id: int, learned: bool = False, frame_end: bool = False) -> None:
        self.items.append(_Piece(token_id=token_id, learned=learned, frame_end=frame_end))


def register_placeholder(tokenizer, placeholder: str = "<v>") -> int:
    """Register `placeholder` as a special token of `tokenizer` (in place) and return its id.

    A special token is never merged with its neighbours (SmolLM2's BPE would otherwise produce ">,").
    The id may lie outside the LLM's embedding table: LiveModel never looks it up.
    """
    from tokenizers import AddedToken

    if len(tokenizer.encode(placeholder, add_special_tokens=False)) != 1:
        tokenizer.add_tokens([AddedToken(placeholder, special=True, normalized=False)], special_tokens=True)
    return tokenizer.convert_tokens_to_ids(placeholder)


class StreamFormat:
    """Renders conversations in the stream layout for one tokenizer, and gives the engine its inputs.

    Args:
        tokenizer: any HF tokenizer with an eos token; the placeholder must already be registered as a
            special token (`register_placeholder`).
        config: the layout strings.
        tokens_per_frame: placeholder tokens per frame (the vision side's N).

    Raises:
        StreamFormatError: naming the tokenizer, when the placeholder is not one special token, the
            separator is not exactly one token, or the separator equals the speak token.
    """

    def __init__(self, tokenizer, config: FormatConfig, tokens_per_frame: int) -> None:
        if tokens_per_frame <= 0:
            raise StreamFormatError(f"tokens_per_frame must be positive, got {tokens_per_frame}")
        self.tokenizer = tokenizer
        self.config = config
        self.tokens_per_frame = tokens_per_frame
        name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
        placeholder_ids = self._encode(config.placeholder)
        # A registered special token encodes alone and never merges with the text around it (">,").
        probe = self._encode(f"{config.placeholder}{config.placeholder}>,{config.placeholder}")
        if len(placeholder_ids) != 1 or probe[:2] + probe[-1:] != placeholder_ids * 3:
            raise StreamFormatError(
                f"tokenizer {name!r}: the frame placeholder {config.placeholder!r} is not a registered special "
                f"token (it encodes to {placeholder_ids}); call livevlm.stream_format.register_placeholder("
                f"tokenizer, {config.placeholder!r}) first")
        self.placeholder_id: int = placeholder_ids[0]
        if tokenizer.eos_token_id is None:
            raise StreamFormatError(f"tokenizer {name!r} has no eos token; set tokenizer.eos_token")
        self.eos_id: int = tokenizer.eos_token_id
        self.bos_ids: list[int] = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
        close_ids = self._encode(config.frames_close)
        if not close_ids:
            raise StreamFormatError(f"tokenizer {name!r}: frames_close {config.frames_close!r} encodes to nothing")
        # The speak target is the FIRST token of the closing sequence: "]\n" is one token in Llama-3 (933)
        # but "]" then "\n" in SmolLM2's tokenizer (77, 198).
        self.speak_id: int = close_ids[0]
        if config.separator:
            sep_ids = self._encode(config.separator)
            if len(sep_ids) != 1:
                raise StreamFormatError(
                    f"tokenizer {name!r}: the separator {config.separator!r} must be exactly one token, "
                    f"got {sep_ids}; choose another format.separator")
            self.separator_id: int = sep_ids[0]
        else:  # one-token-per-frame v1 layout: silence is eos
            self.separator_id = self.eos_id
        self.decision_id: int | None = None
        if config.decision:
            decision_ids = self._encode(config.decision)
            taken = (self.separator_id, self.speak_id, self.placeholder_id, self.eos_id)
            if len(decision_ids) != 1 or decision_ids[0] in taken:
                raise StreamFormatError(
                    f"tokenizer {name!r}: format.decision {config.decision!r} must be exactly one token other than "
                    f"the separator, the speak token, the placeholder and eos, got {decision_ids}; choose another "
                    "one, e.g. '|'")
            self.decision_id = decision_ids[0]
        if config.note_role:
            # The engine reads each choice a note brings where its two continuations first differ (`fork`).
            heads = (self.speak_ids(), self.note_ids())
            tails = (self.answer_after_note_ids(), self.reopen_ids())
            if not 1 <= fork(*heads) < min(map(len, heads)) or fork(*tails) >= min(map(len, tails)):
                raise StreamFormatError(
                    f"tokenizer {name!r}: format.note_role {config.note_role!r}: the note header {heads[1]} must "
                    f"part from the assistant's {heads[0]} after the speak token, and the answer after a note "
                    f"{tails[0]} from the frames' reopening {tails[1]}; choose another note_role")
        if self.separator_id == self.speak_id:
            raise StreamFormatError(
                f"tokenizer {name!r}: the silence token {self.separator_id} equals the speak token (first "
                f"token of {config.frames_close!r}); choose another format.separator or frames_close")

    # ----------------------------------------------------------------------------------------------
    # tokenisation of pieces

    def _encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=False)) if text else []

    def _tokenize(self, pieces: _Pieces) -> tuple[list[int], list[bool], list[bool]]:
        """Pieces → (ids, learned per token, frame_end per token); same-flag texts tokenised together."""
        ids: list[int] = []
        learned: list[bool] = []
        frame_end: list[bool] = []
        pending: list[str] = []
        pending_learned = False

        def flush() -> None:
            token_ids = self._encode("".join(pending))
            ids.extend(token_ids)
            learned.extend([pending_learned] * len(token_ids))
            frame_end.extend([False] * len(token_ids))
            pending.clear()

        for piece in pieces.items:
            if piece.token_id is not None:
                flush()
                ids.append(piece.token_id)
                learned.append(piece.learned)
                frame_end.append(piece.frame_end)
            else:
                if pending and piece.learned != pending_learned:
                    flush()
                pending.append(piece.text)
                pending_learned = piece.learned
        flush()
        return ids, learned, frame_end

    def _ids(self, pieces: _Pieces) -> list[int]:
        return self._tokenize(pieces)[0]

    # ----------------------------------------------------------------------------------------------
    # pieces of the layout (shared by render and the engine)

    def _add_frames(self, pieces: _Pieces, count: int, run_open: bool, after_note: bool = False) -> None:
        if not run_open:  # after a note, "\n[" is the model's choice to go on watching: learned
            pieces.text(self.config.frames_open, learned=after_note)
        last = self.tokens_per_frame - 1 if self.decision_id is None else -1  # the placeholder ending a frame, if any
        for i in range(count):
            if (run_open or i > 0) and self.config.separator:
                pieces.text(self.config.separator)
            for j in range(self.tokens_per_frame):
                pieces.special(self.placeholder_id, frame_end=j == last)
            if self.decision_id is not None:
                pieces.special(self.decision_id, frame_end=True)

    def _add_turn_prefix(self, pieces: _Pieces, run_open: bool, learned: bool) -> None:
        # After frames the turn starts with the closing "]\n"; otherwise with a newline.
        pieces.text(self.config.frames_close if run_open else "\n", learned=learned)

    def _add_user(self, pieces: _Pieces, text: str, run_open: bool) -> None:
        self._add_turn_prefix(pieces, run_open, learned=False)
        pieces.text(f"{self.config.user_role}: {text}")

    def _add_assistant_header(self, pieces: _Pieces, run_open: bool, after_note: bool = False) -> None:
        # "]\n" after frames is the speak target (learned); the "\n" after a query or a response's eos is not, the
        # "\n" after a note's eos is (the model chooses to answer there, rather than to go on watching).
        self._add_turn_prefix(pieces, run_open, learned=run_open or after_note)
        pieces.text(f"{self.config.assistant_role}:", learned=True)

    def _add_note(self, pieces: _Pieces, text: str) -> None:
        # Only after frames: "]\n" is the speak target, then the note's header, words and eos, all learned.
        self._add_turn_prefix(pieces, run_open=True, learned=True)
        pieces.text(f"{self.config.note_role}: {text.strip()}", learned=True)
        pieces.special(self.eos_id, learned=True)

    # ----------------------------------------------------------------------------------------------
    # rendering

    def render(self, items: Sequence[Item], end_silent: bool = True) -> RenderedStream:
        """Render a conversation into ids and token-level targets.

        Args:
            items: `Message("system", …)` optionally first, then frames and user/assistant turns, and notes
                (`Message("note", …)`, with `config.note_role`) right after frames. A conversation without a
                system message uses `config.system_prompt`.
            end_silent: label the very last frame "stay silent" when the stream ends with frames (the
                video went on and nothing was said); False leaves it unlabelled.

        Raises:
            StreamFormatError: the conversation does not start with system/user/frames, a frame run has
                zero frames, a system message is not first, a role is unknown, a text is empty, or a note
                does not follow frames (or the format has no `note_role`).
        """
        items = list(items)
        if not items:
            raise StreamFormatError("empty conversation: give at least one frame run or turn")
        system = self.config.system_prompt
        if isinstance(items[0], Message) and items[0].role == "system":
            system = items[0].text
            items = items[1:]
        if items and isinstance(items[0], Message) and items[0].role == "assistant":
            raise StreamFormatError(
                "a conversation must start with system, user or frames; it starts with an assistant turn "
                f"({items[0].text[:40]!r}); put the frames it responds to before it")
        pieces = _Pieces()
        for token_id in self.bos_ids:
            pieces.special(token_id)
        pieces.text(system + "\n")
        run_open = False
        after_note = False  # the last item was a note: what follows it is the model's choice, learned
        num_frames = 0
        for index, item in enumerate(items):
            if isinstance(item, Frames):
                if item.count <= 0:
                    raise StreamFormatError(f"item {index}: a frame run must hold at least one frame, "
                                            f"got {item.count}")
                self._add_frames(pieces, item.count, run_open, after_note)
                run_open, after_note = True, False
                num_frames += item.count
                continue
            if not isinstance(item, Message):
                raise StreamFormatError(f"item {index}: expected Frames or Message, got {type(item).__name__}")
            if item.role == "system":
                raise StreamFormatError(f"item {index}: a system message may only come first")
            if not item.text.strip():
                raise StreamFormatError(f"item {index}: empty {item.role} text")
            if item.role == "user":
                self._add_user(pieces, item.text, run_open)
            elif item.role == "assistant":
                self._add_assistant_header(pieces, run_open, after_note)
                pieces.text(" " + item.text.strip(), learned=True)
                pieces.special(self.eos_id, learned=True)
            elif item.role == "note":
                if not self.config.note_role:
                    raise StreamFormatError(f"item {index}: a note turn needs a format with notes; set "
                                            "format.note_role (e.g. 'Note') or drop the dialogue's note turns")
                if not run_open:
                    raise StreamFormatError(f"item {index}: a note must follow frames directly (the model notes "
                                            "what it sees, then answers or goes on watching); move it to its "
                                            "own frame, before any other turn there")
                self._add_note(pieces, item.text)
            else:
                raise StreamFormatError(f"item {index}: unknown role {item.role!r}; use system, user, assistant "
                                        "or note")
            run_open, after_note = False, item.role == "note"
        ids, learned, frame_end = self._tokenize(pieces)
        return self._label(ids, learned, frame_end, num_frames, end_silent)

    def _label(self, ids: list[int], learned: list[bool], frame_end: list[bool], num_frames: int,
               end_silent: bool) -> RenderedStream:
        length = len(ids)
        labels = [ids[i + 1] if learned[i + 1] else IGNORE for i in range(length - 1)] + [IGNORE]
        frame_target = [False] * length
        for i in range(length):
            if not frame_end[i]:
                continue
            following = ids[i + 1] if i + 1 < length else None
            if following is None:
                target = self.separator_id if end_silent else IGNORE
            elif following == self.placeholder_id or (self.config.separator and following == self.separator_id
                                                       and not learned[i + 1]):
                target = self.separator_id  # another frame follows: stay silent
            elif learned[i + 1]:
                target = following  # the first token of "]\n" before an assistant turn: speak
            else:
                target = IGNORE  # a user query follows: the frame could not know it was coming
            labels[i] = target
            frame_target[i] = target != IGNORE
        frame_ends = [i for i in range(length) if frame_end[i]]
        return RenderedStream(ids, labels, frame_target, num_frames, frame_ends)

    # ----------------------------------------------------------------------------------------------
    # the engine's inputs: the same pieces, one step at a time

    def prompt_ids(self, system: str | None = None) -> list[int]:
        """Stream start up to the first frame: bos, system prompt, "\\n[" (a stream starts with a frame)."""
        pieces = _Pieces()
        for token_id in self.bos_ids:
            pieces.special(token_id)
        pieces.text((self.config.system_prompt if system is None else system) + "\n")
        pieces.text(self.config.frames_open)
        return self._ids(pieces)

    def frame_ids(self, first_in_run: bool) -> list[int]:
        """One frame: the separator (unless first in its run or the v1 layout), N placeholders, and the decision
        token where the format has one."""
        separator = [self.separator_id] if self.config.separator and not first_in_run else []
        decision = [self.decision_id] if self.decision_id is not None else []
        return separator + [self.placeholder_id] * self.tokens_per_frame + decision

    def reopen_ids(self) -> list[int]:
        """After a response or answer (eos): the "\\n[" that opens the next frame run."""
        return self._encode(self.config.frames_open)

    def speak_ids(self) -> list[int]:
        """Fed when the model decides to speak after a frame: "]\\nAssistant:"; then it generates."""
        pieces = _Pieces()
        self._add_assistant_header(pieces, run_open=True)
        return self._ids(pieces)

    def note_ids(self) -> list[int]:
        """Fed when the model chooses to write a note after a frame (`config.note_role`): "]\nNote:"."""
        pieces = _Pieces()
        self._add_turn_prefix(pieces, run_open=True, learned=True)
        pieces.text(f"{self.config.note_role}:", learned=True)
        return self._ids(pieces)

    def answer_after_note_ids(self) -> list[int]:
        """Fed when the model chooses, after a note's eos, to answer: "\nAssistant:" (learned, as training has it)."""
        pieces = _Pieces()
        self._add_assistant_header(pieces, run_open=False, after_note=True)
        return self._ids(pieces)

    def query_ids(self, text: str, run_open: bool) -> list[int]:
        """A user query and the assistant header of its immediate answer: "]\\nUser: q\\nAssistant:"."""
        if not text.strip():
            raise StreamFormatError("empty user query")
        pieces = _Pieces()
        self._add_user(pieces, text, run_open)
        self._add_assistant_header(pieces, run_open=False)
        return self._ids(pieces)

    def response_ids(self, text: str) -> list[int]:
        """The tokens of a response text as training sees them after "Assistant:" (without eos)."""
        return self._encode(" " + text.strip())

    def describe(self, rendered: RenderedStream) -> str:
        """Debug printer: one line per token with its target (the only way to *see* a labelling bug)."""
        lines = []
        for i, (tok, lab, is_frame) in enumerate(zip(rendered.input_ids, rendered.labels, rendered.frame_target,
                                                    strict=True)):
            shown = json.dumps(self.tokenizer.decode([tok]))
            target = "" if lab == IGNORE else f"-> {json.dumps(self.tokenizer.decode([lab]))} ({lab})"
            lines.append(f"{i:5d} {tok:7d} {shown:20s} {'F' if is_frame else ' '} {target}")
        return "\n".join(lines)


def fork(a: Sequence[int], b: Sequence[int]) -> int:
    """How many leading ids two continuations share: the choice between them is the prediction at the last shared
    one (at the position before them when 0)."""
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))


# --------------------------------------------------------------------------------------------------
# timed turns → items


FRAME_EPS = 1e-6  # tolerance of time -> frame mapping (times written on the grid stay on their frame)


def frame_index(time_s: float, fps: float, start_s: float = 0.0) -> int:
    """The frame a turn at `time_s` follows: frames 0..k are seen before it, k = floor((t - start_s)·fps + ε) >= 0.

    The one time → frame rule of livevlm: training layouts, dialogue validation and evaluation all use it.
    """
    return max(0, math.floor((time_s - start_s) * fps + FRAME_EPS))


def count_frames(start_s: float, end_s: float, fps: float) -> int:
    """Frames sampled from the clip [start_s, end_s) at `fps`: ceil((end_s - start_s)·fps - ε) >= 0.

    The one clip-length rule, beside `frame_index`: dialogues, converters and the feature cache agree on it.
    """
    return max(0, math.ceil((end_s - start_s) * fps - FRAME_EPS))


def timeline_to_items(turns: Sequence[tuple[str, float, str]], num_frames: int, fps: float,
                      start_s: float = 0.0) -> list[Item]:
    """Place timed turns `(role, time_s, text)` among `num_frames` frames sampled at `fps`.

    A turn at time t follows frame `frame_index(t)`; turns after the last frame are dropped (the stream
    was truncated there); a system turn becomes the system prompt.
    """
    if num_frames <= 0:
        raise StreamFormatError(f"a stream needs at least one frame, got num_frames={num_frames}")
    items: list[Item] = []
    shown = 0
    for role, time_s, text in turns:
        if role == "system":
            if items:
                raise StreamFormatError("a system turn may only come first")
            items.append(Message("system", text))
            continue
        k = frame_index(time_s, fps, start_s)
        if k >= num_frames:
            break
        if k + 1 > shown:
            items.append(Frames(k + 1 - shown))
            shown = k + 1
        items.append(Message(role, text))  # type: ignore[arg-type]
    if shown < num_frames:
        items.append(Frames(num_frames - shown))
    return items
