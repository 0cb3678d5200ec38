"""Ego4D long-term action anticipation (LTA): from the video of 8 actions, the next Z = 20 (verb, noun) actions,
scored by edit distance (ED@20, the Ego4D LTA challenge's metric) for verbs, nouns and actions.

Input: Ego4D's `fho_lta_{train,val}.json`, `{"clips": [{"clip_uid", "video_uid", "action_idx", "verb", "noun",
"verb_label", "noun_label", "clip_parent_start_sec", "action_clip_start_sec", "action_clip_end_sec", …}, …]}`,
one record per action (the fields read are these; `verb` / `noun` only without a taxonomy), and the taxonomy
`fho_lta_taxonomy.json`, `{"verbs": [...], "nouns": [...]}`, indexed by label.

Protocol (the paper's public code, `data/ego4d/lta.py`): the actions of each clip in `action_idx` order; clips
with fewer than 8 + 20 actions are left out; every window of 8 consecutive actions (stride 1) is a question: the
frames from the first action's start to the eighth's end (rounded to the fps grid), after the question "After
{T} video frames, anticipate the next 20 actions. …". A full Ego4D video `{video_uid}.mp4` is read at the parent
times (`clip_parent_start_sec` + `action_clip_*_sec`, as the paper); where only the clip `{clip_uid}.mp4` is
there, at the clip's own times. The answer's lines ("1. Take knife.") are the actions: each is mapped to a
verb and a noun of the taxonomy (the taxonomy row's first name, "take_(pick,_grab,_get)" → "take"), exactly by
name when "{verb} {noun}" is one, otherwise by the split of its words into a verb part (the first 1–2 words)
and a noun part whose summed Levenshtein distances to the nearest verb and noun are least. Fewer than 20 actions
are padded with the last; an answer with none scores as all wrong.

ED@Z: for each question, the Levenshtein distance between the predicted and true sequences of the next Z labels,
over Z, the least over the K candidate sequences; averaged over questions. The challenge takes K = 5 (the
paper's code decodes 5 beams); greedy decoding gives one candidate (K = 1), so the figures are an upper bound
of what K = 5 would score (lower is better). Actions compare as (verb, noun) pairs.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from livevlm.evaluation.offline import ClipQuestion, NearestName, find_video, keep_last, levenshtein

if TYPE_CHECKING:
    from livevlm.model import LiveModel
    from livevlm.stream_format import StreamFormat
    from livevlm.vision import FrameEncoder

INPUT_ACTIONS = 8
FUTURE_ACTIONS = 20  # Z
MAX_NEW_TOKENS = 256  # twenty "N. Verb noun." lines take ~150 Llama-3 tokens
NO_ACTION = (-1, -1)  # what an answer with no action predicts: never a label
# Taxonomy rows whose first name would collide with another's (the public code's names for them).
_RENAMED = {"pot_(planter)": "flowerpot", "bat_(sports)": "sport bat", "bat_(tool)": "bat", "nut_(food)": "nuts",
            "nut_(tool)": "nut", "chip_(food)": "snack", "chip_(wood'_metal),": "chips",
            "chip_(wood,_metal)": "chip"}
_NUMBER = re.compile(r"^\s*(?:\S+\s+)?\d+\s*[.)]\s*")  # "1. ", "Step 3) "

Action = tuple[int, int]  # (verb label, noun label)


def lta_name(row: str) -> str:
    """A taxonomy row's name in answers: "take_(pick,_grab,_get)" → "take", "turn_off_(turn_off,_switch_off)" →
    "turn off"; the rows that would collide are renamed ("nut_(food)" → "nuts")."""
    if row in _RENAMED:
        return _RENAMED[row]
    return row.split("(")[0].rstrip("_").replace("_", " ").strip()


@dataclass
class LtaVocabulary:
    """Verb and noun names by label, and the matcher of an answer's action to a (verb, noun) label pair."""

    verbs: dict[int, str]
    nouns: dict[int, str]
    source: str = "taxonomy"  # "taxonomy" (the file) or "annotations" (the names seen in the data file)
    _verb_labels: list[int] = field(init=False, repr=False)
    _noun_labels: list[int] = field(init=False, repr=False)
    _verb: NearestName = field(init=False, repr=False)
    _noun: NearestName = field(init=False, repr=False)
    _exact: dict[str, Action] = field(init=False, repr=False)  # "take knife" → its labels
    _verb_words: int = field(init=False, repr=False)  # the most words a verb name has ("turn off": 2)

    def __post_init__(self) -> None:
        if not self.verbs or not self.nouns:
            raise ValueError("an LTA vocabulary needs at least one verb and one noun")
        self._verb_labels, self._noun_labels = sorted(self.verbs), sorted(self.nouns)
        self._verb = NearestName([self.verbs[v] for v in self._verb_labels])
        self._noun = NearestName([self.nouns[n] for n in self._noun_labels])
        self._exact = {}
        for v in self._verb_labels:
            for n in self._noun_labels:
                self._exact.setdefault(f"{self.verbs[v]} {self.nouns[n]}".lower(), (v, n))
        self._verb_words = max(len(name.split()) for name in self.verbs.values())

    def action(self, text: str) -> Action:
        """The (verb, noun) labels of an action's text ("Take knife." → the labels of take and knife); see the
        module docstring for the matching."""
        text = " ".join(text.lower().split()).removesuffix(".").strip()
        if text in self._exact:
            return self._exact[text]
        words = text.split()
        best: tuple[int, Action] | None = None
        for k in range(1, max(1, min(self._verb_words, len(words) - 1)) + 1):
            verb, verb_distance = self._verb.search(" ".join(words[:k]))
            noun, noun_distance = self._noun.search(" ".join(words[k:]))
            if best is None or verb_distance + noun_distance < best[0]:
                best = (verb_distance + noun_distance, (self._verb_labels[verb], self._noun_labels[noun]))
        assert best is not None  # the loop runs at least once
        return best[1]

    def text(self, action: Action) -> str:
        """How the public code writes an action in an answer: "Take knife"."""
        return f"{self.verbs[action[0]].capitalize()} {self.nouns[action[1]]}"


@dataclass(frozen=True)
class LtaQuestion:
    """One window: its clip and question, and the true next Z actions."""

    clip: ClipQuestion
    clip_uid: str
    last_visible_action_idx: int
    future: tuple[Action, ...]


@dataclass
class LtaBenchmark:
    """The questions of an LTA annotation file, ready to run: what `build_lta_questions` returns."""

    questions: list[LtaQuestion]
    vocabulary: LtaVocabulary
    clips: int  # clips with enough actions
    videos: int
    skipped: list[str] = field(default_factory=list)  # clip_uids left out because their video is missing
    max_frames: int = 0


@dataclass(frozen=True)
class LtaScores:
    """Mean ED@Z over `questions` for verbs, nouns and (verb, noun) actions (lower is better), with K candidates."""

    questions: int
    verb_ed: float
    noun_ed: float
    action_ed: float
    z: int = FUTURE_ACTIONS
    candidates: int = 1

    def as_dict(self) -> dict[str, Any]:
        return {"verb_ed": self.verb_ed, "noun_ed": self.noun_ed, "action_ed": self.action_ed,
                "questions": self.questions, "z": self.z, "candidates": self.candidates}


# ---------------------------------------------------------------------------------------------------
# scoring fixed predictions


def edit_distance_at_z(candidates: Sequence[Sequence[Any]], truth: Sequence[Any], z: int = FUTURE_ACTIONS) -> float:
    """min over candidates of Levenshtein(candidate[:z], truth[:z]) / z: the ED@Z of one question."""
    if not candidates:
        raise ValueError("ED@Z needs at least one candidate sequence")
    if len(truth) < z:
        raise ValueError(f"ED@{z} needs {z} true actions, got {len(truth)}")
    return min(levenshtein(list(c[:z]), list(truth[:z])) for c in candidates) / z


def answer_actions(answer: str, vocabulary: LtaVocabulary, z: int = FUTURE_ACTIONS) -> list[Action]:
    """The Z actions an answer predicts: its non-empty lines (a leading "1." dropped) mapped to labels, cut to Z,
    padded with the last; `NO_ACTION` × Z when it names none."""
    lines = [_NUMBER.sub("", line).strip() for line in answer.splitlines()]
    actions = [vocabulary.action(line) for line in lines if line][:z]
    if not actions:
        return [NO_ACTION] * z
    return actions + [actions[-1]] * (z - len(actions))


def score_lta(predictions: Sequence[Sequence[Sequence[Action]]], truths: Sequence[Sequence[Action]],
              z: int = FUTURE_ACTIONS) -> LtaScores:
    """Mean ED@Z of verbs, nouns and actions.

    Args:
        predictions: per question, its K candidate sequences of (verb, noun) labels (K = 1 with greedy decoding).
        truths: per question, the true sequence (at least Z).
    """
    if len(predictions) != len(truths):
        raise ValueError(f"{len(truths)} questions but {len(predictions)} predictions")
    if not truths:
        nan = float("nan")
        return LtaScores(0, nan, nan, nan, z, 0)
    verb = noun = action = 0.0
    for candidates, truth in zip(predictions, truths, strict=True):
        verb += edit_distance_at_z([[a[0] for a in c] for c in candidates], [a[0] for a in truth], z)
        noun += edit_distance_at_z([[a[1] for a in c] for c in candidates], [a[1] for a in truth], z)
        action += edit_distance_at_z([list(c) for c in candidates], list(truth), z)
    n = len(truths)
    return LtaScores(n, verb / n, noun / n, action / n, z, max(len(c) for c in predictions))


# ---------------------------------------------------------------------------------------------------
# the questions of an annotation file


@dataclass(frozen=True)
class _Record:
    index: int  # position in "clips"
    clip_uid: str
    video_uid: str
    action_idx: int
    start: float  # action_clip_start_sec: in the clip
    end: float
    parent_start: float | None  # clip_parent_start_sec: where the clip starts in its video
    action: Action


def read_vocabulary(taxonomy: str | Path | None, records: list[_Record], raw: list[Any],
                    source: Path) -> LtaVocabulary:
    """The taxonomy file's verbs and nouns; without one, the `verb` / `noun` names the records give their labels."""
    from livevlm.data.converters.common import read_json, require

    if taxonomy is not None:
        path = Path(taxonomy)
        data = read_json(path)
        lists = [require(data, key, str(path), list, 'expected fho_lta_taxonomy.json: {"verbs": [...], "nouns": '
                         '[...]}') for key in ("verbs", "nouns")]
        for key, rows in zip(("verbs", "nouns"), lists, strict=True):
            bad = next((i for i, row in enumerate(rows) if not isinstance(row, str)), None)
            if bad is not None:
                raise _error(f"{path}: {key}[{bad}]: expected a string, got {rows[bad]!r}")
        vocabulary = LtaVocabulary({i: lta_name(r) for i, r in enumerate(lists[0])},
                                   {i: lta_name(r) for i, r in enumerate(lists[1])}, "taxonomy")
    else:
        verbs, nouns = {}, {}
        for record in records:
            where = f"{source}: clips[{record.index}]"
            hint = "or give the taxonomy (fho_lta_taxonomy.json)"
            verbs.setdefault(record.action[0], lta_name(require(raw[record.index], "verb", where, str, hint)))
            nouns.setdefault(record.action[1], lta_name(require(raw[record.index], "noun", where, str, hint)))
        vocabulary = LtaVocabulary(verbs, nouns, "annotations")
    for record in records:
        for kind, label, names in (("verb", record.action[0], vocabulary.verbs),
                                   ("noun", record.action[1], vocabulary.nouns)):
            if label not in names:
                raise _error(f"{source}: clips[{record.index}]: {kind}_label: {label} is not in the taxonomy "
                             f"({len(names)} {kind}s); give the taxonomy of this annotation file")
    return vocabulary


def _error(message: str) -> ValueError:
    from livevlm.data.converters.common import AnnotationError

    return AnnotationError(message)


def parse_lta(data: Any, source: Path) -> list[_Record]:
    """The action records of an LTA annotation file's value, checked field by field.

    Raises:
        AnnotationError: naming the file, the record (`clips[i]`) and the field that is missing or wrong.
    """
    from livevlm.data.converters.common import NUMBER, require

    clips = require(data, "clips", str(source), list, 'expected fho_lta_{train,val}.json: {"clips": [...]}')
    records = []
    for i, raw in enumerate(clips):
        where = f"{source}: clips[{i}]"
        labels = []
        for key in ("verb_label", "noun_label"):
            label = require(raw, key, where, int, "the benchmark needs labelled actions (the val split, not "
                                                  "test_unannotated)")
            if isinstance(label, bool) or label < 0:
                raise _error(f"{where}: {key}: expected a label >= 0, got {label!r}")
            labels.append(label)
        start = float(require(raw, "action_clip_start_sec", where, NUMBER))
        end = float(require(raw, "action_clip_end_sec", where, NUMBER))
        if end < start:
            raise _error(f"{where}: action_clip_end_sec {end:g} is before action_clip_start_sec {start:g}")
        parent = raw.get("clip_parent_start_sec")
        if parent is not None:
            parent = float(require(raw, "clip_parent_start_sec", where, NUMBER))
        action_idx = require(raw, "action_idx", where, int)
        records.append(_Record(i, require(raw, "clip_uid", where, str), require(raw, "video_uid", where, str),
                               action_idx, start, end, parent, (labels[0], labels[1])))
    return records


def build_lta_questions(data: str | Path, video_dir: str | Path, *, taxonomy: str | Path | None = None,
                        fps: float = 2.0, max_frames: int = 0, limit: int = 0,
                        skip_missing: bool = False) -> LtaBenchmark:
    """The questions of an LTA annotation file (see the module docstring for the protocol).

    Args:
        taxonomy: `fho_lta_taxonomy.json`; None = the one next to `data` if there is one, else the names the
            records give (`verb`, `noun`).
        video_dir: the folder of `{video_uid}.mp4` (full videos) or `{clip_uid}.mp4` (clips).
        max_frames: a clip longer than this keeps its last `max_frames` frames (0 = no cap).
        limit: only the first `limit` questions (0 = all).
        skip_missing: leave out the clips whose video is missing (listed in `skipped`) instead of failing.
    Raises:
        FileNotFoundError / AnnotationError: a missing or malformed file, naming the record and field.
        FileNotFoundError: a clip's video is missing (naming the clip and both paths looked for).
    """
    from livevlm.data.converters.common import read_json

    source, folder = Path(data), Path(video_dir)
    raw = read_json(source)
    records = parse_lta(raw, source)
    if taxonomy is None and (source.parent / "fho_lta_taxonomy.json").is_file():
        taxonomy = source.parent / "fho_lta_taxonomy.json"
    vocabulary = read_vocabulary(taxonomy, records, raw["clips"], source)
    by_clip: dict[str, list[_Record]] = {}
    for record in records:
        by_clip.setdefault(record.clip_uid, []).append(record)
    clips = {uid: sorted(actions, key=lambda r: r.action_idx) for uid, actions in by_clip.items()
             if len(actions) >= INPUT_ACTIONS + FUTURE_ACTIONS}
    questions: list[LtaQuestion] = []
    skipped: list[str] = []
    for uid, actions in clips.items():
        if limit and len(questions) >= limit:
            break
        located = _locate(actions[0], folder, source, skip_missing)
        if located is None:
            skipped.append(uid)
            continue
        video, full = located
        for i in range(len(actions) - INPUT_ACTIONS - FUTURE_ACTIONS + 1):
            questions.append(_question(actions, i, video, full, fps, max_frames, source))
    if limit:
        questions = questions[:limit]
    return LtaBenchmark(questions, vocabulary, len(clips), len({q.clip.video for q in questions}), skipped,
                        max_frames)


def _locate(first: _Record, folder: Path, source: Path, skip_missing: bool) -> tuple[Path, bool] | None:
    """(video, is the full video) of a clip, or None when missing and skipping."""
    full = find_video(folder, first.video_uid)
    if full is not None:
        return full, True
    clip = find_video(folder, first.clip_uid)
    if clip is not None:
        return clip, False
    if skip_missing:
        return None
    raise FileNotFoundError(f"{source}: clips[{first.index}] (clip_uid {first.clip_uid}): neither the video "
                            f"{folder / first.video_uid}.mp4 nor the clip {folder / first.clip_uid}.mp4 exists; "
                            "download them, point --video-dir at their folder, or pass --skip-missing to leave "
                            "such clips out")


def _question(actions: list[_Record], i: int, video: Path, full: bool, fps: float, max_frames: int,
              source: Path) -> LtaQuestion:
    seen, future = actions[i:i + INPUT_ACTIONS], actions[i + INPUT_ACTIONS:i + INPUT_ACTIONS + FUTURE_ACTIONS]
    offset = 0.0
    if full:
        if seen[0].parent_start is None:
            raise _error(f"{source}: clips[{seen[0].index}]: clip_parent_start_sec: missing; it places the clip in "
                         f"its video {video.name} (or give the clip itself, {seen[0].clip_uid}.mp4)")
        offset = seen[0].parent_start
    first = max(0, round((offset + seen[0].start) * fps))
    last = max(first, round((offset + seen[-1].end) * fps))
    first, count = keep_last(first, last - first + 1, max_frames)
    question = (f"After {count} video frames, anticipate the next {FUTURE_ACTIONS} actions. Format your answer "
                "concisely, listing each action on a new line with a number prefix. No extra text output.")
    uid, last_idx = seen[0].clip_uid, seen[-1].action_idx
    return LtaQuestion(ClipQuestion(f"{uid}_{last_idx}", video, first, count, question), uid, last_idx,
                       tuple(r.action for r in future))


# ---------------------------------------------------------------------------------------------------
# running a model


def run_lta(model: LiveModel, fmt: StreamFormat, encoder: FrameEncoder, benchmark: LtaBenchmark, fps: float, *,
            max_new_tokens: int = MAX_NEW_TOKENS, results: str | Path | None = None,
            progress: bool = False) -> dict[str, Any]:
    """Answer every question greedily and score ED@20 of verbs, nouns and actions.

    results: a JSONL file keeping each answer as it is made; a rerun with the same settings answers only the
        questions not in it (one written with other settings is refused).
    Returns:
        verb_ed, noun_ed, action_ed, questions, z, candidates; clips, videos, skipped_clips, vocabulary.
    """
    from livevlm.evaluation.offline import answer_resumably

    settings = {"benchmark": "ego4d-lta", "fps": fps, "max_new_tokens": max_new_tokens,
                "max_frames": benchmark.max_frames}
    answers = answer_resumably(model, fmt, encoder, [q.clip for q in benchmark.questions], fps, max_new_tokens,
                               settings, results, progress, desc="LTA")
    return lta_result(benchmark, answers)


def lta_result(benchmark: LtaBenchmark, answers: dict[str, str]) -> dict[str, Any]:
    """The scores of `answers` (question id → text) on `benchmark`, as `run_lta` returns them."""
    predictions = [[answer_actions(answers[q.clip.id], benchmark.vocabulary)] for q in benchmark.questions]
    scores = score_lta(predictions, [q.future for q in benchmark.questions])
    return scores.as_dict() | {"clips": benchmark.clips, "videos": benchmark.videos,
                               "skipped_clips": benchmark.skipped, "vocabulary": benchmark.vocabulary.source}
