"""The text side of `livevlm data synthesize`: what one video gives the LLM, the prompts, and how answers are
parsed back and filtered.

- `Step` / `Item`: one video's step timeline and narrations, whatever the annotation source.
- Filters: `response_problem` (empty, "...", too long, leaks a timestamp), raised as `Malformed(reason)`, the
  drop categories of the synthesis report.
- refine-narration: the few-shot prompt, `parse_numbered`, `refine_texts` and the rule-based fallback
  `rule_rewrite`.
- dialogue: `build_skeleton` (step lines + templated queries on the frame grid), `dialogue_messages` (a worked
  example, then the timeline and the skeleton), `fill_skeleton` (the answer parsed back and checked).

No I/O and no backend here: `synthesize` plans the requests, runs them and writes the dialogue.
"""

from __future__ import annotations

import json
import random
import re
from collections import Counter
from dataclasses import dataclass
from importlib import resources

from livevlm.data.converters.common import ceil_frame, count_frames, sentence
from livevlm.data.schema import FRAME_EPS, Turn

TENSES = ("past", "current", "next", "off-topic")
PLACEHOLDER = "..."
OFF_TOPIC_SHARE = 0.15  # chance that a query is off-topic


# ---------------------------------------------------------------------------------------------------
# items: one video with its step timeline and narrations


@dataclass(frozen=True)
class Step:
    start_s: float
    end_s: float
    text: str


@dataclass
class Item:
    """One video to synthesise for: `key` (unique, stable across restarts), `video` relative to OUT's folder."""

    key: str
    video: str
    duration_s: float
    steps: list[Step]
    narrations: list[tuple[float, str]]



# ---------------------------------------------------------------------------------------------------
# filters


class Malformed(ValueError):
    """An LLM answer that cannot become a conversation; `reason` is the drop category of the report."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


_LEAK = re.compile(r"\b(?:seconds?|secs?|minutes?|mins?)\b|\b\d+(?:\.\d+)?\s?s\b|\b\d{1,2}:\d{2}\b", re.IGNORECASE)
_UNFILLED = re.compile(r"[.\s…]*|\[?\s*(?:\.\.\.|…)\s*\]?")


def timestamp_leak(text: str) -> str | None:
    """The first piece of `text` that gives away a time ("second", "12s", "3:05"), or None."""
    match = _LEAK.search(text)
    return match.group(0) if match else None


def response_problem(text: str, max_words: int) -> str | None:
    """Why a response may not be trained on (a drop reason), or None when it is fine."""
    if not text.strip():
        return "empty response"
    if _UNFILLED.fullmatch(text.strip()):
        return "unfilled placeholder"
    if timestamp_leak(text):
        return "timestamp leak"
    if len(text.split()) > max_words:
        return "over-long response"
    return None


def clean_response(text: str) -> str:
    """Whitespace collapsed, wrapping quotes and markdown emphasis removed."""
    text = " ".join(text.replace("**", "").split())
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "\"'":
        text = text[1:-1].strip()
    return text


# ---------------------------------------------------------------------------------------------------
# refine-narration


FEW_SHOT = [  # (terse narration, rewrite) in the style of Ego4D's narrations
    ("#C C picks a cup from the table", "You pick up a cup from the table."),
    ("#C C opens the fridge with his left hand", "You open the fridge with your left hand."),
    ("#O A man walks past C", "A man walks past you."),
    ("#C C washes the knife", "You wash the knife."),
]
REFINE_SYSTEM = ("You rewrite short video narrations into clear, natural sentences spoken to the person "
                 "wearing the camera.")
REFINE_INSTRUCTION = ("Rewrite each narration as one short sentence. Call the camera wearer (\"C\") \"you\". Keep "
                      "the meaning, add nothing, never mention times. Answer with the numbered list only, one "
                      "line per narration, in the same order.")
REFINE_PREFILL = "1."
_NUMBERED = re.compile(r"^\s*(\d+)\s*[.)]\s*(.*?)\s*$")
_IRREGULAR = {"is": "are", "has": "have", "does": "do", "goes": "go", "was": "were"}
_POSSESSIVE = re.compile(r"\b(?:his|her|C's)\b")


def _base_verb(word: str) -> str:
    """Third person → base form: "picks" → "pick", "washes" → "wash", "carries" → "carry"."""
    lower = word.lower()
    if lower in _IRREGULAR:
        return _IRREGULAR[lower]
    if lower.endswith("ies") and len(lower) > 4:
        return word[:-3] + "y"
    if re.search(r"(?:ss|sh|ch|x|z|o)es$", lower):
        return word[:-2]
    if lower.endswith("s") and not lower.endswith("ss"):
        return word[:-1]
    return word


def rule_rewrite(narration: str) -> str:
    """The rule-based rewrite: "#C C picks a cup" → "You pick a cup.", "#O man X walks" → "Man X walks.".

    Tags (#C, #O, #unsure) are dropped; a narration about the camera wearer ("C ...") becomes second
    person (verb in base form, his/her → your); anything else is kept and made a sentence ending in ".".
    """
    text = re.sub(r"#\w+", " ", narration)
    words = text.split()
    if len(words) >= 2 and words[0] in ("C", "c"):
        rest = " ".join(words[2:])
        rest = _POSSESSIVE.sub("your", rest)
        text = f"you {_base_verb(words[1])} {rest}"
    text = re.sub(r"\bC\b", "you", text)
    text = sentence(text).rstrip(" .")
    return text + "." if text else ""


def refine_prompt(narrations: list[str]) -> list[dict[str, str]]:
    examples_in = "\n".join(f"{i + 1}. {src}" for i, (src, _) in enumerate(FEW_SHOT))
    examples_out = "\n".join(f"{i + 1}. {dst}" for i, (_, dst) in enumerate(FEW_SHOT))
    listing = "\n".join(f"{i + 1}. {' '.join(n.split())}" for i, n in enumerate(narrations))
    user = (f"{REFINE_INSTRUCTION}\n\nNarrations:\n{examples_in}\nRewritten:\n{examples_out}\n\n"
            f"Narrations:\n{listing}\nRewritten:")
    return [{"role": "system", "content": REFINE_SYSTEM}, {"role": "user", "content": user}]


def parse_numbered(text: str, count: int) -> dict[int, str]:
    """The first "{i}. text" line of each i in 1..count."""
    found: dict[int, str] = {}
    for line in text.splitlines():
        match = _NUMBERED.match(line)
        if match and 1 <= int(match.group(1)) <= count and int(match.group(1)) not in found:
            found[int(match.group(1))] = clean_response(match.group(2))
    return found


_STOP_WORDS = frozenset("the and you your his her its with from into onto for that this then".split())


def _content(text: str) -> set[str]:
    """Word stems (first 4 letters) of the words of 3+ letters that are not stop words."""
    return {w[:4] for w in re.findall(r"[a-z]{3,}", text.lower()) if w not in _STOP_WORDS}


def unrelated(narration: str, rewrite: str) -> bool:
    """Whether a rewrite shares no content word with its narration (the model answered something else)."""
    source = _content(re.sub(r"#\w+", " ", narration))
    return bool(source) and not source & _content(rewrite)


def refine_texts(narrations: list[str], answer: str, max_words: int) -> tuple[list[str], Counter[str]]:
    """The rewritten narrations from an LLM answer, each missing, bad or unrelated line replaced by
    `rule_rewrite`.

    Returns:
        (texts in order, fallbacks counted by reason).
    """
    found = parse_numbered(answer, len(narrations))
    texts, fallbacks = [], Counter[str]()
    for i, narration in enumerate(narrations, start=1):
        text = found.get(i)
        problem = "missing line" if text is None else response_problem(text, max_words)
        if problem is None and text and unrelated(narration, text):
            problem = "unrelated rewrite"
        if problem is None and text:
            texts.append(sentence(text))
        else:
            fallbacks[problem or "missing line"] += 1
            texts.append(rule_rewrite(narration))
    return texts, fallbacks


def is_numbered_start(text: str) -> bool:
    return re.match(r"\d+\s*[.)]", text) is not None


# ---------------------------------------------------------------------------------------------------
# dialogue: skeleton, prompt, parsing and validation


@dataclass
class SkeletonLine:
    """One line of the skeleton: a user query (text set) or an assistant slot (text = PLACEHOLDER).

    `rule` is the `rules` backend's response for an assistant slot; `why` says what the slot is for
    (step start / end, or the query's tense) for readers of the data.
    """

    time_s: float
    role: str
    text: str
    rule: str = ""
    why: str = ""


_SKELETON_LINE = re.compile(r"^[\s\-*•>]*(\d+(?:\.\d+)?)\s?s\s*[:\-]?\s+\**(user|assistant)\**\s*:\s*(.*?)\s*$",
                            re.IGNORECASE)


def format_time(time_s: float) -> str:
    """Seconds on the grid, short: 0 → "0s", 1.5 → "1.5s"."""
    return f"{round(time_s, 3):g}s"


def render_lines(lines: list[SkeletonLine], fill: bool = False) -> str:
    """The skeleton as text; with `fill`, assistant slots hold their rule responses."""
    return "\n".join(f"{format_time(line.time_s)} {line.role.capitalize()}: "
                     f"{line.rule if fill and line.role == 'assistant' else line.text}" for line in lines)


def load_query_templates() -> dict[str, list[str]]:
    """The query library shipped with the package: {"past" | "current" | "next" | "off-topic": [query, ...]}."""
    text = resources.files("livevlm.data").joinpath("templates/queries.json").read_text(encoding="utf-8")
    templates = json.loads(text)
    missing = [t for t in TENSES if not templates.get(t)]
    if missing:
        raise ValueError(f"query templates: no {missing[0]!r} queries in templates/queries.json")
    return templates


def _lower_first(text: str) -> str:
    """"A cup" → "a cup", "The star" → "the star"; an acronym ("TV remote") is kept."""
    first = text.split(" ", 1)[0]
    return text if len(first) > 1 and first.isupper() else text[:1].lower() + text[1:]


def _clause(steps: list[Step]) -> str:
    return "; ".join(_lower_first(s.text.strip().rstrip(".")) for s in steps)


@dataclass
class _Timeline:
    """Steps on the frame grid: start frame and event frame of the end (None: still going at the end)."""

    item: Item
    fps: float
    num_frames: int
    starts: list[tuple[int, Step]]
    ends: list[tuple[int, Step]]

    @classmethod
    def build(cls, item: Item, fps: float) -> _Timeline:
        n = count_frames(0.0, item.duration_s, fps)
        starts, ends = [], []
        for step in item.steps:
            if step.start_s >= item.duration_s - FRAME_EPS:
                continue
            starts.append((min(ceil_frame(step.start_s, fps), n - 1), step))
            if step.end_s < item.duration_s - FRAME_EPS:  # an end at the video's end is no event
                ends.append((min(ceil_frame(step.end_s, fps), n - 1), step))
        return cls(item, fps, n, starts, ends)

    def options(self, frame: int) -> dict[str, str]:
        """Rule answers of each tense askable at `frame` (the past: ended by then; next: not started)."""
        ended = [s for f, s in self.ends if f <= frame]
        ending = {id(s) for f, s in self.ends if f <= frame}
        active = [s for f, s in self.starts if f <= frame and id(s) not in ending]
        upcoming = [s for f, s in self.starts if f > frame]
        options = {}
        if ended:
            options["past"] = f"Last finished: {_clause([max(ended, key=lambda s: s.end_s)])}."
        if active:
            options["current"] = f"Right now: {_clause(active)}."
        if upcoming:
            first = min(s.start_s for s in upcoming)
            options["next"] = f"Next: {_clause([s for s in upcoming if s.start_s == first])}."
        return options


OFF_TOPIC_REPLIES = ("Sorry, I can only help with what happens in the video.",
                     "I am here to follow the video with you; let us stay on it.")


def build_skeleton(item: Item, fps: float, queries: int, rng: random.Random,
                   templates: dict[str, list[str]]) -> list[SkeletonLine]:
    """The skeleton of one conversation (see the module docstring), in stream order.

    On one frame: the step line first (starts and ends merged), then each query and its answer slot.
    Queries are at min(queries, frames) distinct frames, the first at frame 0.
    """
    timeline = _Timeline.build(item, fps)
    n = timeline.num_frames
    events: dict[int, list[str]] = {}
    for frame, step in timeline.starts:
        events.setdefault(frame, []).append(sentence(step.text.rstrip(".")) + ".")
    for frame, step in timeline.ends:
        events.setdefault(frame, []).append(f"Finished: {_clause([step])}.")
    count = min(queries, n)
    asked = sorted([0, *rng.sample(range(1, n), count - 1)]) if count else []
    lines: list[SkeletonLine] = []
    for frame in sorted(set(events) | set(asked)):
        time_s = frame / fps
        if frame in events:
            lines.append(SkeletonLine(time_s, "assistant", PLACEHOLDER, " ".join(events[frame]), "step"))
        if frame in asked:
            options = timeline.options(frame)
            tense = ("off-topic" if not options or rng.random() < OFF_TOPIC_SHARE
                     else rng.choice(sorted(options)))
            answer = options.get(tense) or rng.choice(OFF_TOPIC_REPLIES)
            lines.append(SkeletonLine(time_s, "user", rng.choice(templates[tense]), why=tense))
            lines.append(SkeletonLine(time_s, "assistant", PLACEHOLDER, answer, tense))
    return lines


DIALOGUE_SYSTEM = ("You write training data for a video assistant that watches a live video together with the "
                   "user and speaks at the right moments.")
DIALOGUE_INSTRUCTION = (
    "Below is a conversation between the user and the assistant while the video plays. Each line starts with "
    f"the time when it is said. Replace every \"{PLACEHOLDER}\" with what the assistant says at that moment: when "
    "a step starts or ends, say what is happening; when the user asks, answer from what has happened so far "
    "(and what comes next, if asked). One or two short sentences each. Never mention times, seconds or "
    "timestamps in what the assistant says. Write out every line, with its time unchanged, and nothing else.")
# A worked example, given as an earlier exchange: small models follow a demonstration far better than rules.
EXAMPLE_ITEM = Item("example", "example.mp4", 12.0, [Step(0.0, 5.0, "Wash the tomato."),
                                                    Step(5.5, 11.0, "Slice the tomato.")], [])
EXAMPLE_LINES = [
    SkeletonLine(0.0, "assistant", PLACEHOLDER, "You start washing the tomato."),
    SkeletonLine(0.0, "user", "What am I doing now?"),
    SkeletonLine(0.0, "assistant", PLACEHOLDER, "You are washing the tomato."),
    SkeletonLine(5.0, "assistant", PLACEHOLDER, "The tomato is washed."),
    SkeletonLine(5.5, "assistant", PLACEHOLDER, "Now you slice the tomato."),
    SkeletonLine(8.0, "user", "What did I just do?"),
    SkeletonLine(8.0, "assistant", PLACEHOLDER, "You washed the tomato; now you are slicing it."),
    SkeletonLine(11.0, "assistant", PLACEHOLDER, "You have finished slicing the tomato."),
]


def _dialogue_task(item: Item, lines: list[SkeletonLine]) -> str:
    timeline = "\n".join(f"- {format_time(s.start_s)} to {format_time(s.end_s)}: {s.text}" for s in item.steps)
    return (f"Timeline of a video ({format_time(item.duration_s)} long), from its annotations:\n"
            f"{timeline or '- (no steps annotated)'}\n\n{DIALOGUE_INSTRUCTION}\n\n{render_lines(lines)}")


def dialogue_messages(item: Item, lines: list[SkeletonLine]) -> list[dict[str, str]]:
    """The prompt: a worked example, then the item's step timeline and the skeleton to fill."""
    return [{"role": "system", "content": DIALOGUE_SYSTEM},
            {"role": "user", "content": _dialogue_task(EXAMPLE_ITEM, EXAMPLE_LINES)},
            {"role": "assistant", "content": render_lines(EXAMPLE_LINES, fill=True)},
            {"role": "user", "content": _dialogue_task(item, lines)}]


def skeleton_prefill(lines: list[SkeletonLine]) -> str:
    """The answer's start: the skeleton up to and including the first "Assistant:"."""
    head = []
    for line in lines:
        if line.role == "assistant":
            head.append(f"{format_time(line.time_s)} Assistant:")
            break
        head.append(f"{format_time(line.time_s)} User: {line.text}")
    return "\n".join(head)


def is_skeleton_start(text: str) -> bool:
    """Whether `text` begins with a skeleton line (a whole answer, not a continuation of the prefill)."""
    first = text.split("\n", 1)[0]
    return _SKELETON_LINE.match(first) is not None


def parse_dialogue_lines(text: str) -> list[tuple[float, str, str]]:
    """(time_s, role, text) of every "{t}s User|Assistant: text" line; other lines are ignored."""
    parsed = []
    for raw in text.splitlines():
        match = _SKELETON_LINE.match(raw)
        if match:
            parsed.append((float(match.group(1)), match.group(2).lower(), clean_response(match.group(3))))
    return parsed


def fill_skeleton(lines: list[SkeletonLine], written: str, max_words: int, prefill: str = "") -> list[Turn]:
    """The conversation's turns: the skeleton with its assistant slots filled from the model's answer.

    Assistant lines of the answer are matched to the slots in order, by time; user lines are ignored
    (the queries are the skeleton's); lines after the last slot is filled are ignored.
    Args:
        written: what the model wrote: a continuation of `prefill`, or (from a server that ignored the
            prefill) a whole answer starting with a skeleton line.
    Raises:
        Malformed: "garbage" (what the model wrote holds no skeleton line, where more than the prefilled
            slot was due), "changed times", "missing lines", or a response's filter reason
            (see `response_problem`).
    """
    slots = [i for i, line in enumerate(lines) if line.role == "assistant"]
    continued = bool(prefill) and not is_skeleton_start(written.lstrip())
    answer = prefill + written if continued else written
    if not parse_dialogue_lines(written) and (not continued or len(slots) > 1):
        raise Malformed("garbage", f"no '{{t}}s Assistant: ...' line in the answer: {written[:80]!r}")
    parsed = parse_dialogue_lines(answer)
    times = {round(lines[i].time_s, 3) for i in slots}
    filled: dict[int, str] = {}
    for time_s, role, text in parsed:
        if role != "assistant" or len(filled) == len(slots):
            continue
        want = lines[slots[len(filled)]].time_s
        if abs(time_s - want) < 1e-3:
            filled[slots[len(filled)]] = text
        elif round(time_s, 3) not in times:
            raise Malformed("changed times", f"an assistant line at {format_time(time_s)}, which is not in the "
                                             "skeleton")
        elif time_s > want:
            raise Malformed("missing lines", f"no assistant line at {format_time(want)}")
    if len(filled) < len(slots):
        missing = [format_time(lines[i].time_s) for i in slots if i not in filled]
        raise Malformed("missing lines", f"no assistant line at {', '.join(missing)}")
    turns = []
    for i, line in enumerate(lines):
        text = filled.get(i, line.text)
        if line.role == "assistant":
            problem = response_problem(text, max_words)
            if problem:
                raise Malformed(problem, f"{format_time(line.time_s)} Assistant: {text[:80]!r}")
        turns.append(Turn(line.role, line.time_s, text))
    return turns
