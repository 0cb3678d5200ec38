"""What the offline benchmarks (COIN, Ego4D LTA) share: a question about a span of a video answered greedily, the
edit distance that scores the answers, and the answers file a long run resumes from.

The layout is the one of the paper's offline benchmarks (its public code's COIN and LTA datasets): the question
first, then the clip's frames, then the assistant's header, and the model decodes greedily until eos:

    <bos>{system}\\n\\nUser: {question}\\n[<v>…,<v>…,…]\\nAssistant: {answer}<eos>

Each video is decoded once for all the questions about it, and only the frames they need are encoded.
"""

from __future__ import annotations

import glob
import json
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from livevlm.model import LiveModel
    from livevlm.stream_format import StreamFormat
    from livevlm.vision import FrameEncoder


@dataclass(frozen=True)
class ClipQuestion:
    """One question about a span of a video: frames `first_frame … first_frame + num_frames - 1` of the video
    read at the model's fps (frame i is the picture shown at i / fps), then `question`."""

    id: str
    video: Path
    first_frame: int
    num_frames: int
    question: str

    def __post_init__(self) -> None:
        if self.first_frame < 0 or self.num_frames < 1:
            raise ValueError(f"question {self.id!r}: a clip needs first_frame >= 0 and num_frames >= 1, got "
                             f"{self.first_frame} and {self.num_frames}")


def keep_last(first: int, count: int, max_frames: int) -> tuple[int, int]:
    """The span `(first, count)` cut to its last `max_frames` frames (0 = no cap).

    The end of a clip is what the questions are about (the step just shown, what comes next); the paper's code
    instead drops every frame of a clip longer than its cap, which leaves the model answering blind.
    """
    if max_frames <= 0 or count <= max_frames:
        return first, count
    return first + count - max_frames, max_frames


def find_video(folder: Path, name: str) -> Path | None:
    """`folder/name.mp4`, else the first `folder/name.*` (YouTube downloads are often .webm or .mkv); None if
    there is none."""
    mp4 = folder / f"{name}.mp4"
    if mp4.is_file():
        return mp4
    found = sorted(p for p in glob.glob(glob.escape(str(folder / name)) + ".*") if Path(p).is_file())
    return Path(found[0]) if found else None


# ---------------------------------------------------------------------------------------------------
# scoring: edit distance


def levenshtein(a: Sequence[Any], b: Sequence[Any], bound: int | None = None) -> int:
    """The Levenshtein distance of two sequences (strings, or lists of labels): the fewest insertions, deletions and
    substitutions that turn one into the other.

    bound: when given, any value above `bound` is returned as soon as the distance is known to exceed it (the
        caller only needs to know that); the result is exact whenever it is <= bound.
    """
    if len(a) < len(b):
        a, b = b, a
    if bound is not None and len(a) - len(b) > bound:
        return bound + 1
    previous = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        current = [i]
        for j, y in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (x != y)))
        if bound is not None and min(current) > bound:
            return bound + 1
        previous = current
    return previous[-1]


class NearestName:
    """Maps a text to the index of the nearest of a list of names by Levenshtein distance over characters (ties go
    to the earlier name), as the paper's code maps a generated answer to a category.

    Texts and names are compared lower-cased, with a trailing full stop dropped and whitespace collapsed; an exact
    name is found by a dictionary, and the search over the others stops early on a distance past the best so far,
    so a model that answers with the category's words costs nothing. Results are memoised (answers repeat).
    """

    def __init__(self, names: Sequence[str]) -> None:
        if not names:
            raise ValueError("no names to match against")
        self.names = list(names)
        self._normal = [normalize_name(name) for name in self.names]
        self._exact: dict[str, int] = {}
        for index, name in enumerate(self._normal):
            self._exact.setdefault(name, index)
        self._memo: dict[str, tuple[int, int]] = {}

    def __call__(self, text: str) -> int:
        """The index of the name nearest to `text`."""
        return self.search(text)[0]

    def search(self, text: str) -> tuple[int, int]:
        """(index of the nearest name, its distance to `text`), both compared normalised."""
        text = normalize_name(text)
        if text in self._exact:
            return self._exact[text], 0
        if text not in self._memo:
            best, best_distance = 0, levenshtein(text, self._normal[0])
            for index, name in enumerate(self._normal[1:], 1):
                if best_distance == 0:
                    break
                distance = levenshtein(text, name, bound=best_distance - 1)
                if distance < best_distance:
                    best, best_distance = index, distance
            self._memo[text] = (best, best_distance)
        return self._memo[text]


def normalize_name(text: str) -> str:
    """Lower case, whitespace collapsed, one trailing full stop dropped: "Place the battery." → "place the battery"."""
    return " ".join(text.lower().split()).removesuffix(".").strip()


# ---------------------------------------------------------------------------------------------------
# running a model


def prompt_ids(fmt: StreamFormat, question: str, num_frames: int) -> list[int]:
    """The ids of the system prompt, the question, `num_frames` frames and the assistant's header (see the module
    docstring): training's layout of this conversation, up to where the answer starts."""
    from livevlm.stream_format import Frames, Message

    rendered = fmt.render([Message("user", question), Frames(num_frames)], end_silent=False)
    return rendered.input_ids + fmt.speak_ids()


def greedy_answer(model: LiveModel, fmt: StreamFormat, frame_tokens: torch.Tensor, question: str,
                  max_new_tokens: int) -> str:
    """The model's greedy answer to `question` about a clip, decoded until eos or `max_new_tokens`.

    Args:
        frame_tokens: `[T, N, D]` the clip's raw frame tokens (any device; moved to the model's).
    Returns:
        the answer's text, special tokens dropped, stripped.
    """
    import torch

    from livevlm.model import CACHE_KWARG, output_cache

    device = model.device
    with torch.no_grad():
        ids = torch.tensor([prompt_ids(fmt, question, len(frame_tokens))], device=device)  # [1, L]
        out = model.llm(inputs_embeds=model.embed(ids, frame_tokens.to(device)), use_cache=True, logits_to_keep=1)
        generated: list[int] = []
        while True:
            scores = out.logits[0, -1].float()  # [V]
            if fmt.placeholder_id < scores.shape[-1]:
                scores[fmt.placeholder_id] = -float("inf")  # the frame placeholder has no embedding to feed back
            token = int(scores.argmax())
            if token == fmt.eos_id:
                break
            generated.append(token)
            if len(generated) >= max_new_tokens:
                break
            step = model.embed_inputs(torch.tensor([[token]], device=device), None)  # [1, 1, H]
            out = model.llm(inputs_embeds=step, use_cache=True, logits_to_keep=1, **{CACHE_KWARG: output_cache(out)})
    return fmt.tokenizer.decode(generated, skip_special_tokens=True).strip()


def encode_frames(encoder: FrameEncoder, video: Path, fps: float, needed: set[int]) -> dict[int, torch.Tensor]:
    """The frame tokens `[N, D]` of the frames `needed` (indices on the fps grid) of one video, decoding it once
    and only up to the last one needed; frames past the video's end are absent from the result.

    Raises:
        VideoError: the video cannot be opened.
    """
    from livevlm.video import read_frames

    last = max(needed)
    kept: list[int] = []
    source = read_frames(str(video), fps=fps, size=encoder.image_size, resample=encoder.resample)

    def frames() -> Iterator:
        with source:
            for time_s, frame in source:
                index = round(time_s * fps)
                if index > last:
                    return
                if index in needed:
                    kept.append(index)
                    yield frame

    tokens = encoder.encode(frames())  # [K, N, D]
    return dict(zip(kept, tokens, strict=True))


def answer_questions(model: LiveModel, fmt: StreamFormat, encoder: FrameEncoder, questions: Sequence[ClipQuestion],
                     fps: float, max_new_tokens: int, progress: bool = False,
                     desc: str = "questions") -> Iterator[tuple[ClipQuestion, str]]:
    """Answer every question, video after video (in the order videos first appear), yielding `(question, answer)`
    as each is done.

    Raises:
        VideoError: a video cannot be opened (the message names it and the questions about it).
        ValueError: a video has no frame in a question's span (it is shorter than its annotation says).
    """
    import torch
    from tqdm import tqdm

    by_video: dict[Path, list[ClipQuestion]] = {}
    for question in questions:
        by_video.setdefault(question.video, []).append(question)
    with tqdm(total=len(questions), desc=desc, unit="question", disable=not progress) as bar:
        for video, group in by_video.items():
            needed = {i for q in group for i in range(q.first_frame, q.first_frame + q.num_frames)}
            try:
                tokens = encode_frames(encoder, video, fps, needed)
            except (OSError, ValueError) as error:  # VideoError: name the questions it was for
                raise type(error)(f"question {group[0].id!r}: {error}") from None
            for question in group:
                rows = [tokens[i] for i in range(question.first_frame, question.first_frame + question.num_frames)
                        if i in tokens]
                if not rows:
                    raise ValueError(f"question {question.id!r}: {video} has no frame from "
                                     f"{question.first_frame / fps:g} s on; it is shorter than the annotation says: "
                                     "check that it is the right video")
                yield question, greedy_answer(model, fmt, torch.stack(rows), question.question, max_new_tokens)
                bar.update()


# ---------------------------------------------------------------------------------------------------
# the answers file: a long run resumes where it stopped


def read_answers(path: Path | None, settings: Mapping[str, Any]) -> dict[str, str]:
    """The answers already in `path` (a JSONL of `{"id", "answer", "settings"}`), by question id.

    Raises:
        ValueError: a line was written with other settings (naming the file, line, and both settings), or is not
            JSON.
    """
    if path is None or not path.is_file():
        return {}
    answers = {}
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            raise ValueError(f"{path}:{number} is not JSON; give another results file or delete the line") from None
        if record.get("settings") != dict(settings):
            raise ValueError(f"{path}:{number} was written with {record.get('settings')}, this run uses "
                             f"{dict(settings)}; give another results file, or the same settings to resume")
        answers[record["id"]] = record["answer"]
    return answers


def append_answer(path: Path, question_id: str, answer: str, settings: Mapping[str, Any]) -> None:
    """Add one answer to the answers file (one JSON line, flushed: a killed run loses at most the line it wrote)."""
    with open(path, "a", encoding="utf-8") as out:
        out.write(json.dumps({"id": question_id, "answer": answer, "settings": dict(settings)}) + "\n")


def answer_resumably(model: LiveModel, fmt: StreamFormat, encoder: FrameEncoder, questions: Sequence[ClipQuestion],
                     fps: float, max_new_tokens: int, settings: Mapping[str, Any], results: str | Path | None = None,
                     progress: bool = False, desc: str = "answers") -> dict[str, str]:
    """Every question's answer (id → text): those already in `results` (written with the same `settings`) are
    read back, the others generated (`answer_questions`) and appended there one by one, so a killed run
    resumes where it stopped."""
    path = Path(results) if results is not None else None
    answers = read_answers(path, settings)
    todo = [question for question in questions if question.id not in answers]
    for clip, answer in answer_questions(model, fmt, encoder, todo, fps, max_new_tokens, progress, desc=desc):
        answers[clip.id] = answer
        if path is not None:
            append_answer(path, clip.id, answer, settings)
    return answers
