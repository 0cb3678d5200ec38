"""Free-running evaluation: run the real engine on a video and compare *when* it spoke with the annotation.

Teacher-forced metrics feed the ground-truth stream; here the model's own responses go back into its
context, as in use. Each annotated event (events on the same 2 fps frame count once, as the converters
merge them) is matched to at most one spontaneous response within ±tolerance seconds, greedily in time
order; precision = matched responses / responses, recall = matched events / events. A matched response
also counts as "right" when it names the event's object (its colour and shape words), which checks the
words without asking for the exact sentence. `coverage` is the looser reading, "events with a response
within ±tolerance" (one response may cover two close events): it is at least the recall.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from dataclasses import dataclass


@dataclass
class TimingScores:
    events: int
    responses: int
    matched: int
    named: int  # matched responses that name the event's colour and shape
    mean_abs_offset_s: float
    covered: int  # events with any response within the tolerance, shared or not

    @property
    def coverage(self) -> float:
        return self.covered / self.events if self.events else math.nan

    @property
    def recall(self) -> float:
        return self.matched / self.events if self.events else math.nan

    @property
    def precision(self) -> float:
        return self.matched / self.responses if self.responses else math.nan

    @property
    def f1(self) -> float:
        p, r = self.precision, self.recall
        return 2 * p * r / (p + r) if p + r > 0 else 0.0

    def __add__(self, other: TimingScores) -> TimingScores:
        """The scores of both sets of videos pooled: counts summed, the mean offset weighted by matches."""
        matched = self.matched + other.matched
        offsets = sum(s.mean_abs_offset_s * s.matched for s in (self, other) if s.matched)
        return TimingScores(self.events + other.events, self.responses + other.responses, matched,
                            self.named + other.named, offsets / matched if matched else math.nan,
                            self.covered + other.covered)

    def as_dict(self) -> dict[str, float | int]:
        return {"events": self.events, "responses": self.responses, "matched": self.matched,
                "recall": self.recall, "precision": self.precision, "f1": self.f1, "coverage": self.coverage,
                "named_share": self.named / self.matched if self.matched else math.nan,
                "mean_abs_offset_s": self.mean_abs_offset_s}


def event_frames(events: list[dict], fps: float, duration_s: float) -> list[tuple[float, list[dict]]]:
    """Events grouped by the frame they are narrated at (the first frame at or after them)."""
    grouped: dict[float, list[dict]] = {}
    last = math.ceil(duration_s * fps - 1e-6) - 1
    for event in events:
        frame = min(math.ceil(event["time_s"] * fps - 1e-6), last)
        grouped.setdefault(frame / fps, []).append(event)
    return sorted(grouped.items())


def _names(response: str, events: list[dict]) -> bool:
    text = response.lower()
    for event in events:
        obj = event.get("object", {})
        if obj.get("shape", "").lower() in text and (obj.get("color", "").lower() in text
                                                     or str(event.get("new_color", "")).lower() in text):
            return True
    return False


def match_timing(events: list[tuple[float, list[dict]]], responses: list[tuple[float, str]],
                 tolerance_s: float = 1.0) -> TimingScores:
    """Greedy one-to-one matching of event times to response times within ±tolerance_s."""
    used = [False] * len(responses)
    matched = named = 0
    offsets = []
    for time_s, group in events:
        best = None
        for j, (response_time, _) in enumerate(responses):
            if used[j] or abs(response_time - time_s) > tolerance_s + 1e-9:
                continue
            if best is None or abs(response_time - time_s) < abs(responses[best][0] - time_s):
                best = j
        if best is not None:
            used[best] = True
            matched += 1
            offsets.append(abs(responses[best][0] - time_s))
            named += _names(responses[best][1], group)
    mean = sum(offsets) / len(offsets) if offsets else math.nan
    covered = sum(any(abs(r - t) <= tolerance_s + 1e-9 for r, _ in responses) for t, _ in events)
    return TimingScores(len(events), len(responses), matched, named, mean, covered)


# ---------------------------------------------------------------------------------------------------
# reminders: "tell me when X happens", asked at some time, answered once by the model at X


REMINDER_OUTCOMES = ("on_time", "early", "late", "never")


@dataclass
class ReminderOutcome:
    """What the model did with one reminder, judged by its first spontaneous response after the request.

    The first response decides, as it would for a user: a reminder given 3 s early is a false alarm even if
    the model speaks again at the event. `offset_s` is that response's time minus the event's (None when it
    never spoke); `extra` counts the spontaneous responses after it (a reminder should be said once).
    """

    kind: str  # one of REMINDER_OUTCOMES
    offset_s: float | None
    extra: int

    def __post_init__(self) -> None:
        if self.kind not in REMINDER_OUTCOMES:
            raise ValueError(f"reminder outcome {self.kind!r} is not one of {REMINDER_OUTCOMES}")


def reminder_outcome(event_time_s: float, responses: list[float], tolerance_s: float = 1.0) -> ReminderOutcome:
    """Classify a reminder from the times of the model's spontaneous responses after its acknowledgement."""
    if not responses:
        return ReminderOutcome("never", None, 0)
    first = min(responses)
    offset = first - event_time_s
    kind = "on_time" if abs(offset) <= tolerance_s + 1e-9 else ("early" if offset < 0 else "late")
    return ReminderOutcome(kind, offset, len(responses) - 1)


# ---------------------------------------------------------------------------------------------------
# dialogue turns: when the model spoke against when the ground truth speaks (the field's trigger scores)


@dataclass(frozen=True)
class TriggerScores:
    """Spontaneous responses against ground-truth assistant turns, matched one to one within a tolerance.

    turns: ground-truth turns; responses: the model's spontaneous responses; matched: pairs; duplicates:
    unmatched responses within the tolerance of a turn that is already matched (a second reply to something
    already said, as MMDuet2 counts them); offset_sum_s: Σ |response time − turn time| over the pairs.
    """

    turns: int
    responses: int
    matched: int
    duplicates: int
    offset_sum_s: float

    @property
    def precision(self) -> float:
        return self.matched / self.responses if self.responses else math.nan

    @property
    def recall(self) -> float:
        return self.matched / self.turns if self.turns else math.nan

    @property
    def f1(self) -> float:
        p, r = self.precision, self.recall
        if math.isnan(p) or math.isnan(r):
            return math.nan
        return 2 * p * r / (p + r) if p + r > 0 else 0.0

    @property
    def time_diff_s(self) -> float:
        """Mean |offset| of the matched responses (the paper's TimeDiff, free-running)."""
        return self.offset_sum_s / self.matched if self.matched else math.nan

    @property
    def duplicate_ratio(self) -> float:
        return self.duplicates / self.responses if self.responses else math.nan

    def __add__(self, other: TriggerScores) -> TriggerScores:
        return TriggerScores(self.turns + other.turns, self.responses + other.responses,
                             self.matched + other.matched, self.duplicates + other.duplicates,
                             self.offset_sum_s + other.offset_sum_s)


def match_one_to_one(turn_times: list[float], response_times: list[float],
                     tolerance_s: float = 1.0) -> list[tuple[int, int]]:
    """The best one-to-one matching of turns to responses within ±tolerance_s: the most pairs, and among
    those the smallest total |offset|. Returns (turn index, response index) pairs in time order.

    Exact by dynamic programming over sorted times: on a line, crossing pairs can always be uncrossed
    without losing feasibility or adding offset, so an optimal matching is monotone (O(turns × responses)).
    A greedy "nearest response" matching is not optimal: a turn at 5.0 taking the response at 5.0 can
    leave a turn at 5.9 unmatched when 4.2 was free.
    """
    turns = sorted(range(len(turn_times)), key=lambda i: turn_times[i])
    responses = sorted(range(len(response_times)), key=lambda j: response_times[j])
    n, m = len(turns), len(responses)
    # best[i][j]: (pairs, -offset) for turns[i:] and responses[j:]; filled from the end
    best = [[(0, 0.0)] * (m + 1) for _ in range(n + 1)]
    for i in range(n - 1, -1, -1):
        t = turn_times[turns[i]]
        for j in range(m - 1, -1, -1):
            offset = abs(response_times[responses[j]] - t)
            options = [best[i + 1][j], best[i][j + 1]]
            if offset <= tolerance_s + 1e-9:
                pairs, cost = best[i + 1][j + 1]
                options.append((pairs + 1, cost - offset))
            best[i][j] = max(options)
    pairs: list[tuple[int, int]] = []
    i = j = 0
    while i < n and j < m:
        offset = abs(response_times[responses[j]] - turn_times[turns[i]])
        if offset <= tolerance_s + 1e-9:
            pairs_after, cost_after = best[i + 1][j + 1]
            if best[i][j] == (pairs_after + 1, cost_after - offset):
                pairs.append((turns[i], responses[j]))
                i, j = i + 1, j + 1
                continue
        if best[i][j] == best[i + 1][j]:
            i += 1
        else:
            j += 1
    return pairs


def trigger_scores(turn_times: list[float], response_times: list[float], tolerance_s: float = 1.0) -> TriggerScores:
    """Match (`match_one_to_one`) and count: precision, recall, F1, TimeDiff and duplicates of one stream."""
    pairs = match_one_to_one(turn_times, response_times, tolerance_s)
    matched_turns = [turn_times[i] for i, _ in pairs]
    used = {j for _, j in pairs}
    duplicates = sum(1 for j, r in enumerate(response_times) if j not in used
                     and any(abs(r - t) <= tolerance_s + 1e-9 for t in matched_turns))
    offsets = sum(abs(response_times[j] - turn_times[i]) for i, j in pairs)
    return TriggerScores(len(turn_times), len(response_times), len(pairs), duplicates, offsets)


def words(text: str) -> list[str]:
    """Lower-case words without punctuation (SQuAD's normalisation, minus its English article removal)."""
    return re.findall(r"\w+", text.lower())


def word_f1(prediction: str, reference: str) -> float:
    """Token F1 of words: the harmonic mean of the shared-word share of each side (bags of words)."""
    predicted, expected = Counter(words(prediction)), Counter(words(reference))
    shared = sum((predicted & expected).values())
    if not predicted or not expected:
        return float(predicted == expected)
    if shared == 0:
        return 0.0
    precision, recall = shared / sum(predicted.values()), shared / sum(expected.values())
    return 2 * precision * recall / (precision + recall)


# ---------------------------------------------------------------------------------------------------
# a dialogue file through the real engine: `livevlm evaluate --free-running`


def ground_truth_turns(dialogue) -> tuple[list[tuple[float, str]], list[tuple[float, str]], list[tuple[float, str]]]:
    """A dialogue's (queries, spontaneous turns, answers) as (time_s, text) lists.

    An assistant turn right after a user turn (the schema puts it on the query's frame) answers it; every
    other assistant turn is spontaneous: the model has to decide by itself to say it. Only spontaneous
    turns are matched for timing (an answer is always given at its query: its timing says nothing).
    """
    queries, spontaneous, answers = [], [], []
    previous = None
    for turn in dialogue.turns:
        if turn.role == "user":
            queries.append((turn.time_s, turn.text))
        elif turn.role == "assistant":
            (answers if previous == "user" else spontaneous).append((turn.time_s, turn.text))
        previous = turn.role
    return queries, spontaneous, answers


def stream_dialogue(session, frame_tokens, dialogue) -> list:
    """Run one dialogue's clip through a fresh engine session, its queries injected at their times, as
    `livevlm stream` would (a query at t goes in before the first frame later than t); returns the events.

    Frames go in as many at a time as the session's `max_frames_per_forward` allows (the engine's
    multi-frame forwards give the events of one frame at a time), cut before each query.
    """
    from livevlm.engine.pipeline import query_is_due

    queries, _, _ = ground_truth_turns(dialogue)
    times = [dialogue.start_s + i / dialogue.fps for i in range(len(frame_tokens))]
    limit = session.config.max_frames_per_forward
    events: list = []
    i = 0
    while i < len(times):
        while queries and query_is_due(queries[0][0], times[i]):
            when, text = queries.pop(0)
            session.add_query(text, time_s=when)
        end = i + 1
        while end < len(times) and end - i < limit and not (queries and query_is_due(queries[0][0], times[end])):
            end += 1
        events += session.step(frame_tokens[i:end], times[i:end])
        i = end
    for when, text in queries:  # asked after the last frame
        session.add_query(text, time_s=when)
    return events + session.flush()


def score_dialogue(dialogue, events, tolerance_s: float, names=None) -> dict:
    """One dialogue's counts (summable over dialogues) and what the model said.

    names: optional `(response, turn) -> bool | None`, whether a matched response names what its turn names
        (None: the turn names nothing to check); counted as `named` of `namable` pairs.
    """
    from livevlm.engine.session import ResponseEvent

    _, spontaneous, answers = ground_truth_turns(dialogue)
    said = [(e.time_s, e.text) for e in events if isinstance(e, ResponseEvent) and not e.answer_to_query]
    replies = [(e.time_s, e.text) for e in events if isinstance(e, ResponseEvent) and e.answer_to_query]
    pairs = match_one_to_one([t for t, _ in spontaneous], [t for t, _ in said], tolerance_s)
    scores = trigger_scores([t for t, _ in spontaneous], [t for t, _ in said], tolerance_s)
    record = {"id": dialogue.id, "task": dialogue.task or "all", "turns": scores.turns, "responses": scores.responses,
            "matched": scores.matched, "duplicates": scores.duplicates, "offset_sum_s": scores.offset_sum_s,
            "word_f1_sum": sum(word_f1(said[j][1], spontaneous[i][1]) for i, j in pairs),
            "namable": 0, "named": 0,
            "answers": len(answers),
            # one reply per query, in order (zip stops short only for a clip with no frame to answer after)
            "answer_word_f1_sum": sum(word_f1(reply, truth)
                                      for (_, reply), (_, truth) in zip(replies, answers, strict=False)),
            "said": [{"time_s": round(t, 3), "text": text} for t, text in said],
            "replies": [{"time_s": round(t, 3), "text": text} for t, text in replies]}
    if names is not None:
        verdicts = [names(said[j][1], spontaneous[i][1]) for i, j in pairs]
        record["namable"] = sum(v is not None for v in verdicts)
        record["named"] = sum(v is True for v in verdicts)
    return record


JUDGED_KEYS = ("judge", "judged", "judge_score_sum", "pauc_sums")  # what `judge_record` adds


def judge_record(record: dict, dialogue, judge, tolerance_s: float) -> dict:
    """`record` (`score_dialogue`'s, with the stream's `end_s`) with the judge's scores added.

    judge_score: each matched response (matched again as `trigger_scores` does) against its turn, summed
    as `judge_score_sum` over `judged` pairs. PAUC (`livevlm.evaluation.pauc`): each spontaneous turn's span
    runs to the next later turn (or `end_s`); the k-th response inside it is scored with the first k joined
    (the paper judges the replies given so far); summed per ω over the turns as `pauc_sums`. Every item goes
    to the judge in one `score` call, each distinct one once. Reads only the record's `said`, so a record
    streamed earlier is judged without streaming again.

    Raises:
        JudgeError: from the judge.
    """
    from livevlm.evaluation.judge import JudgeItem
    from livevlm.evaluation.pauc import OMEGAS, normalise, omega_key, replies_in_span, turn_pauc, turn_spans

    queries, spontaneous, _ = ground_truth_turns(dialogue)
    said = [(r["time_s"], r["text"]) for r in record["said"]]
    turn_times, said_times = [t for t, _ in spontaneous], [t for t, _ in said]

    def asked(time_s: float) -> str:  # the user's latest request at a turn's time, which the turn answers
        return next((text for when, text in reversed(queries) if when <= time_s + 1e-9), "")

    pairs = match_one_to_one(turn_times, said_times, tolerance_s)
    matched = [JudgeItem(said[j][1], spontaneous[i][1], asked(spontaneous[i][0])) for i, j in pairs]
    spans = turn_spans(turn_times, record.get("end_s", dialogue.stop_s or max(turn_times + said_times, default=0)))
    curves = []  # per turn: (time, item) of each response in its span, the responses so far joined
    for (time_s, text), span in zip(spontaneous, spans, strict=True):
        inside = replies_in_span(span, said_times)
        curves.append([(said[j][0], JudgeItem(" ".join(said[k][1] for k in inside[: n + 1]), text, asked(time_s)))
                       for n, j in enumerate(inside)])
    items = list(dict.fromkeys(matched + [item for curve in curves for _, item in curve]))
    scores = dict(zip(items, judge.score(items), strict=True))
    return record | {
        "judge": judge.identity, "judged": len(matched), "judge_score_sum": sum(scores[item] for item in matched),
        "pauc_sums": {omega_key(w): sum(turn_pauc(span, [(t, normalise(scores[item])) for t, item in curve], w)
                                        for span, curve in zip(spans, curves, strict=True)) for w in OMEGAS}}


def summarise(records: list[dict]) -> dict:
    """The free-running scores of a set of scored dialogues (`score_dialogue`), pooled by counts."""
    scores = TriggerScores(0, 0, 0, 0, 0.0)
    for record in records:
        scores = scores + TriggerScores(record["turns"], record["responses"], record["matched"],
                                        record["duplicates"], record["offset_sum_s"])
    word_sum = sum(record["word_f1_sum"] for record in records)
    answers = sum(record["answers"] for record in records)
    return {"trigger_precision": scores.precision, "trigger_recall": scores.recall, "trigger_f1": scores.f1,
            "time_diff_s": scores.time_diff_s, "duplicate_ratio": scores.duplicate_ratio,
            "responses": scores.responses, "turns": scores.turns, "matched": scores.matched,
            "word_f1": word_sum / scores.matched if scores.matched else math.nan,
            "answers": answers,
            "answer_word_f1": sum(r["answer_word_f1_sum"] for r in records) / answers if answers else math.nan,
            "object_named": (sum(r.get("named", 0) for r in records) / namable
                             if (namable := sum(r.get("namable", 0) for r in records)) else math.nan),
            "dialogues": len(records)} | judged_summary(records)


def choose_free_running_threshold(by_threshold: dict[float, dict]) -> float:
    """The θ whose own free-running responses best match the turns one to one: among the θs whose trigger F1
    over the spontaneous turns is within one turn of the best (1 / turns), the fewest duplicates, then the
    higher F1, then the θ nearest the engine's default.

    Why free-running: the teacher-forced choice (`stream_eval.choose_threshold`) scores each turn's first
    response on a context that holds the true dialogue, so it cannot see a model that keeps talking after it
    answered. It chose θ 0.9 for a two-stage default-model candidate that, free-running at 0.9, repeated itself
    in a third of its narration responses; at 0.7 it repeated 3 % (docs/experiments.md, 2026-12-04).
    Why within one turn: an F1 that differs by less than one matched turn is noise on a validation split, while
    a repeated response is what a viewer hears; the plain best F1 took θ 0.8 at 0.835 over 0.725 at 0.833 with
    twice the duplicates (5.3 % against 2.8 %; docs/experiments.md, 2026-12-05).

    Args:
        by_threshold: θ → `summarise`'s scores of one free-running run at that θ.
    Raises:
        ValueError: no run had a turn to match (the F1 is undefined).
    """
    from livevlm.config import EngineConfig

    def nan_to_zero(value: float) -> float:  # a θ under which the model never spoke: F1 0, no duplicates
        return 0.0 if math.isnan(value) else round(value, 9)

    scored = {t: m for t, m in by_threshold.items() if m["turns"]}
    if not scored:
        raise ValueError("no spontaneous turns in --data: the free-running F1 is undefined, so no θ can be chosen")
    best = max(nan_to_zero(m["trigger_f1"]) for m in scored.values())
    near = {t: m for t, m in scored.items() if nan_to_zero(m["trigger_f1"]) > best - 1 / m["turns"] + 1e-9}
    return min(near, key=lambda t: (nan_to_zero(near[t]["duplicate_ratio"]), -nan_to_zero(near[t]["trigger_f1"]),
                                    abs(t - EngineConfig().threshold)))


def judged_summary(records: list[dict]) -> dict:
    """`judge_score` (mean 1–5 over matched responses) and `pauc` (mean over turns, per ω) of judged records
    (`judge_record`); empty when none is judged."""
    judged = [record for record in records if "judge" in record]
    if not judged:
        return {}
    from livevlm.evaluation.pauc import OMEGAS, omega_key

    matched, turns = sum(r["judged"] for r in judged), sum(r["turns"] for r in judged)
    return {"judge": judged[0]["judge"],
            "judge_score": sum(r["judge_score_sum"] for r in judged) / matched if matched else math.nan,
            "pauc": {omega_key(w): sum(r["pauc_sums"][omega_key(w)] for r in judged) / turns if turns else math.nan
                     for w in OMEGAS}}


def evaluate_free_running(model, fmt, dataset, config, tolerance_s: float = 1.0, limit: int = 0,
                          results_path=None, progress: bool = False, names=None, judge=None) -> dict:
    """Free-running scores of `model` (a LiveModel) over a StreamDataset: each dialogue streamed through a
    fresh `StreamSession(model, fmt, config)` with its own system prompt, its queries at their times.

    Resumable: with `results_path`, each dialogue's scores are appended there as one JSON line when it is
    done, and dialogues already there are not streamed again (a file written with another θ or tolerance
    is refused, naming both; of two lines of one dialogue the later counts). `names`: see `score_dialogue`
    (the world benchmark's `names_object`). `judge` (`livevlm.evaluation.judge.Judge`): adds `judge_score`
    and `pauc` (`judge_record`); a dialogue already streamed but not judged by this judge is judged without
    streaming again. Returns the scores overall and under "by_task".

    Raises:
        JudgeError: the judge failed (after its retries); the dialogues finished so far, and the one just
            streamed, are in `results_path`, so that the same call resumes.
    """
    import json
    from pathlib import Path

    from tqdm import tqdm

    from livevlm.engine.session import StreamSession
    from livevlm.evaluation.judge import JudgeError

    settings = {"threshold": config.threshold, "tolerance_s": tolerance_s, "max_new_tokens": config.max_new_tokens}
    done: dict[str, dict] = {}
    if results_path is not None and Path(results_path).is_file():
        for number, line in enumerate(Path(results_path).read_text().splitlines(), 1):
            if not line.strip():
                continue
            record = json.loads(line)
            if record.get("settings") != settings:
                raise ValueError(f"{results_path}:{number} was written with {record.get('settings')}, this run uses "
                                 f"{settings}; give another results file, or the same settings to resume")
            done[record["id"]] = record
    count = len(dataset) if not limit else min(limit, len(dataset))
    records: list[dict] = []

    def keep(record: dict) -> None:
        if results_path is not None:
            with open(results_path, "a") as out:
                out.write(json.dumps(record) + "\n")

    def kept() -> str:  # the dialogue being judged is in the file too, streamed
        if results_path is None:
            return "nothing was kept: give a results file (--results) to resume a run"
        return (f"the {len(records) + 1} dialogue(s) streamed so far are kept in {results_path}: run the same "
                "command again to resume (they are judged, not streamed again)")

    for index in tqdm(range(count), desc="free-running", unit="dialogue", disable=not progress):
        dialogue = dataset.dialogues[index]
        record, unsaved = done.get(dialogue.id), dialogue.id not in done
        if record is None:
            system = next((turn.text for turn in dialogue.turns if turn.role == "system"), None)
            session = StreamSession(model, fmt, config, system_prompt=system)
            try:
                tokens = dataset.frame_tokens(dialogue)
            except (OSError, ValueError) as error:  # VideoError, a missing feature file: name the record
                raise type(error)(f"{dataset.path}: record {dialogue.id!r} (record {index + 1}): {error}") from None
            record = score_dialogue(dialogue, stream_dialogue(session, tokens, dialogue), tolerance_s, names)
            record["settings"] = settings
            record["end_s"] = dialogue.start_s + len(tokens) / dialogue.fps  # where the stream stopped
        if judge is None:  # scores of an earlier judged run do not mix into an unjudged one
            record = {key: value for key, value in record.items() if key not in JUDGED_KEYS}
        elif record.get("judge") != judge.identity:
            try:
                record = judge_record(record, dialogue, judge, tolerance_s)
            except JudgeError as error:
                if unsaved:
                    keep(record)  # the streaming is the slow part: a rerun only judges it
                raise JudgeError(f"{error}; {kept()}") from None
            unsaved = True
        if unsaved:
            keep(record)
        records.append(record)
    result = summarise(records)
    tasks = sorted({record["task"] for record in records})
    result["by_task"] = {task: summarise([r for r in records if r["task"] == task]) for task in tasks}
    result["threshold"] = config.threshold
    result["tolerance_s"] = tolerance_s
    return result
