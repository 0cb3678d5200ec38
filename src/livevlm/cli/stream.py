"""`livevlm stream SOURCE`: watch a video, a camera or a network stream and speak when the model decides to.

Events go out as they happen, as a readable live view or as JSON lines (`--jsonl`):
    {"type": "frame", "time_s", "p_speak"}            every frame
    {"type": "query", "time_s", "text"}               a user query, when it enters the stream
    {"type": "response", "time_s", "text", "latency_s"}
    {"type": "note", "time_s", "text", "answered"}    with the frames: a model with notes (format.note_role)
    {"type": "summary", "frames", "fps", "max_lag_s", "threshold", "device"}  once, at the end (θ and
                                                      device + dtype as used, e.g. "cpu float32")
Queries come from `--query "…" [--at SEC]` (repeatable; the n-th --at goes with the n-th --query, no --at =
as soon as possible) and from lines typed on stdin while it runs. Ctrl-C prints what was said and exits 130.

Everything that can be checked is checked before the model loads (the source, θ, the queries), so a typo
costs a second, not a model load.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from livevlm.cli import CommandError, on_interrupt_raise
from livevlm.config import DecodeMode
from livevlm.devices import DtypeName


@dataclass
class StreamArgs:
    source: str = field(default="", metadata={
        "positional": True, "help": "video file, camera (0 or /dev/video0) or URL (rtsp/http/...); omit with --demo"})
    demo: bool = field(default=False, metadata={
        "help": "stream a synthetic-world video generated on the fly (its true events are printed at the end)"})
    demo_seed: int = field(default=7, metadata={"help": "seed of the --demo video"})
    demo_duration: float = field(default=30.0, metadata={"help": "seconds of the --demo video"})
    model: str = field(default="", metadata={
        "help": "checkpoint folder, the paper's released checkpoint (its folder or hub id, e.g. "
                "chenjoya/videollm-online-8b-v1plus); empty = the shipped default model"})
    llm: str = field(default="", metadata={
        "help": "base LLM folder or hub id, overriding the checkpoint's (official: "
                "meta-llama/Meta-Llama-3-8B-Instruct)"})
    vision: str = field(default="", metadata={
        "help": "vision tower folder or hub id, overriding the checkpoint's (official: "
                "google/siglip-large-patch16-384)"})
    query: list[str] = field(default_factory=list, metadata={"help": "a user query"})
    at: list[float] = field(default_factory=list, metadata={"help": "stream time (s) of the matching --query"})
    threshold: float | None = field(default=None, metadata={
        "help": "θ in [0, 1]: stay silent while P(separator) >= θ, i.e. speak when p(speak) > 1 - θ; default: the "
                "model's recommended θ (livevlm.yaml engine.threshold), else the paper's 0.725"})
    max_new_tokens: int = field(default=64, metadata={"help": "cap on a response's length in tokens"})
    realtime: bool = field(default=False, metadata={
        "help": "pace frames to the wall clock (default for cameras and URLs)"})
    fast: bool = field(default=False, metadata={"help": "as fast as possible (default for files)"})
    jsonl: bool = field(default=False, metadata={"help": "print one JSON object per event"})
    frames: bool = field(default=True, metadata={"help": "with --jsonl, also print every frame's p_speak"})
    plot: str = field(default="", metadata={"help": "save a timeline plot (PNG) of p(speak), responses, queries"})
    max_frames_per_forward: int = field(default=8, metadata={"help": "frames per LLM forward when catching up"})
    decode: DecodeMode = field(default="eager", metadata={
        "help": "how response tokens are decoded: eager (one forward each); compiled (a static-shape step under "
                "torch.compile, CUDA graphs on a GPU: for GPUs, where the eager loop is Python-bound); static "
                "(the same step uncompiled). The same responses (docs/engine.md)"})
    prompt_lookup: int | None = field(default=None, metadata={
        "help": "tokens a response guesses from what the stream said before and checks in one forward (the same "
                "responses in fewer forwards); default 6 with --decode eager; 0 = off"})
    open_timeout: float = field(default=10.0, metadata={"help": "seconds to wait for a camera or URL to open"})
    device: str = field(default="auto", metadata={"help": "where the encoder and the LLM run: auto (a GPU when "
                                                           "there is one), cpu, cuda, cuda:1, …"})
    dtype: DtypeName = field(default="auto", metadata={
        "help": "weight precision; auto = bfloat16 on a GPU, float32 on the CPU"})
    server: str = field(default="", metadata={
        "help": "run on a `livevlm serve` server at ws://HOST:PORT instead of loading a model here (the same "
                "output); the server's model, device and dtype are used"})
    api_key: str = field(default="", metadata={"help": "the server's API key; default: $LIVEVLM_API_KEY"})


def queries_of(args: StreamArgs) -> list[tuple[float, str]]:
    """The `--query`/`--at` pairs, checked (one --at per --query at most, times ≥ 0)."""
    if len(args.at) > len(args.query):
        raise CommandError(f"{len(args.at)} --at for {len(args.query)} --query: give one --at per --query")
    for at in args.at:
        if at < 0:
            raise CommandError(f"--at {at:g}: a query's stream time must be ≥ 0 s (0 = after the first frame)")
    return [(args.at[i] if i < len(args.at) else 0.0, q) for i, q in enumerate(args.query)]


class _View:
    """Prints events: JSON lines, or a readable transcript with a status line (FPS, lag) on stderr.

    On a terminal the transcript shows a response's words as they are decoded (`show_delta`, fed from the
    engine's TokenEvents through `tokenizer`, or with a server's text deltas); piped, and in JSON lines, it
    prints each finished response once, so what a program reads does not depend on decoding speed.
    """

    def __init__(self, jsonl: bool, frames: bool, tokenizer: Any = None) -> None:
        self.jsonl, self.frames = jsonl, frames
        self.said: list[tuple[float, str, str]] = []  # (time, role, text)
        self.timeline: list[tuple[float, float]] = []  # (time, p_speak)
        self.start = time.monotonic()
        self.status = sys.stderr.isatty() and not jsonl
        self.live_words = sys.stdout.isatty() and not jsonl
        self._deltas = None
        if tokenizer is not None:
            from livevlm.detokenize import TextDeltas

            self._deltas = TextDeltas(tokenizer)
        self._partial: str | None = None  # the words of the response being decoded, shown so far
        self._last_time = 0.0  # stream time of the last frame or query: where a response being decoded stands

    def show_delta(self, text: str, time_s: float | None = None) -> None:
        """Show the next words of the response being decoded (on a terminal; otherwise nothing)."""
        if not self.live_words or not text:
            return
        if self._partial is None:
            self.clear_status()
            when = self._last_time if time_s is None else time_s
            print(f"[{when:7.1f}s] Assistant: ", end="")
            self._partial = ""
        self._partial += text
        print(text, end="", flush=True)

    def __call__(self, event: Any) -> None:
        from livevlm.engine.session import FrameEvent, NoteEvent, QueryEvent, ResponseEvent, TokenEvent

        if isinstance(event, TokenEvent):
            if self._deltas is not None:
                self.show_delta(self._deltas.add(event.token_id), event.time_s)
            return
        if isinstance(event, (FrameEvent, QueryEvent)):
            self._last_time = event.time_s
        if isinstance(event, FrameEvent):
            self.timeline.append((event.time_s, event.p_speak))
            if self.jsonl and self.frames:
                self._emit({"type": "frame", "time_s": round(event.time_s, 3), "p_speak": round(event.p_speak, 4)})
            elif self.status:
                fps = len(self.timeline) / max(time.monotonic() - self.start, 1e-9)
                print(f"\r  {event.time_s:7.1f}s  p(speak) {event.p_speak:4.2f}  {fps:5.1f} fps", end="",
                      file=sys.stderr, flush=True)
        elif isinstance(event, NoteEvent):  # the model's note to itself: not said, shown only with the frames
            if self.jsonl and self.frames:
                self._emit({"type": "note", "time_s": round(event.time_s, 3), "text": event.text,
                            "answered": event.answered})
        elif isinstance(event, QueryEvent):
            self.said.append((event.time_s, "user", event.text))
            self._emit({"type": "query", "time_s": round(event.time_s, 3), "text": event.text},
                       f"[{event.time_s:7.1f}s] User: {event.text}")
        elif isinstance(event, ResponseEvent):
            self.said.append((event.time_s, "assistant", event.text))
            partial, self._partial = self._partial, None
            if self._deltas is not None:
                self._deltas.reset()
            if partial is not None and event.text.startswith(partial):  # its words are on screen: finish the line
                print(event.text[len(partial):], flush=True)
                return
            if partial is not None:
                print(flush=True)  # the words shown disagree with the final text: end that line, print it whole
            self._emit({"type": "response", "time_s": round(event.time_s, 3), "text": event.text,
                        "latency_s": round(event.latency_s, 3)},
                       f"[{event.time_s:7.1f}s] Assistant: {event.text}")

    def clear_status(self) -> None:
        if self.status:
            print("\r" + " " * 50 + "\r", end="", file=sys.stderr)

    def _emit(self, obj: dict[str, Any], line: str | None = None) -> None:
        if self.jsonl:
            print(json.dumps(obj), flush=True)
        elif line is not None:
            self.clear_status()
            print(line, flush=True)


def _read_stdin(stream) -> None:
    """Typed (or piped) queries: one per line, asked at the current stream time. No stdin: nothing."""
    try:
        for line in sys.stdin:
            if line.strip():
                stream.ask(line.strip())
    except (OSError, ValueError):  # stdin closed or not readable (e.g. under a test runner)
        return


def stream(args: StreamArgs) -> int:
    from livevlm.config import check_threshold
    from livevlm.default_model import is_default
    from livevlm.video import VideoError, _is_camera, _is_url, check_source

    if args.realtime and args.fast:
        raise CommandError("--realtime and --fast exclude each other")
    if args.demo and args.source:
        raise CommandError(f"--demo streams a generated video; drop it or the SOURCE ({args.source})")
    if not args.demo and not args.source:
        raise CommandError("give a SOURCE (video file, camera index or URL), or --demo")
    check_threshold(args.threshold, "--threshold")
    queries = queries_of(args)
    if args.server:
        _check_remote(args)
    annotation = None
    if args.demo:
        from livevlm.world import demo_video

        source, annotation = demo_video(args.demo_seed, args.demo_duration)
    else:
        try:
            source = check_source(args.source)  # before the model loads: a typo costs a second
        except VideoError as exc:
            raise CommandError(str(exc)) from None
    live = _is_camera(source) or _is_url(str(source))
    realtime = args.realtime or (live and not args.fast)
    if args.server:
        return _stream_remote(args, source, queries, realtime, annotation)
    if is_default(args.model) and not args.demo:
        print("note: the default model knows only livevlm's synthetic world (coloured shapes that appear, move "
              "and leave); on real footage it will narrate shapes, whatever the video shows", file=sys.stderr)
    model = _load(args)
    stream = model.stream(source, queries, threshold=args.threshold, realtime=realtime,
                          max_new_tokens=args.max_new_tokens, max_frames_per_forward=args.max_frames_per_forward,
                          open_timeout_s=args.open_timeout, decode=args.decode,
                          prompt_lookup=args.prompt_lookup)
    view = _View(args.jsonl, args.frames, tokenizer=model.fmt.tokenizer)
    threading.Thread(target=_read_stdin, args=(stream,), daemon=True, name="livevlm-stdin").start()
    on_interrupt_raise()  # from here Ctrl-C prints what was said (below) instead of leaving at once
    try:
        for event in stream:
            view(event)
    except KeyboardInterrupt:
        _print_said(view, interrupted=True)
        return 130
    return _finish(args, view, stream.summary, stream.threshold, model.runs_on, annotation)


def _finish(args: StreamArgs, view: _View, summary: Any, threshold: float, device: str, annotation: Any) -> int:
    """The summary (a StreamSummary, or a server's RemoteSummary: the same fields) and the plot."""
    view.clear_status()
    summary_obj = {"type": "summary", "frames": summary.frames, "fps": round(summary.fps, 2),
                   "max_lag_s": round(summary.max_lag_s, 3), "threshold": threshold, "device": device}
    if args.jsonl:
        print(json.dumps(summary_obj), flush=True)
    else:
        print(f"{summary.frames} frames at {summary.fps:.1f} fps on {device}, {summary.responses} responses, "
              f"max lag {summary.max_lag_s:.2f} s; it speaks when p(speak) > {1 - threshold:.3g} (θ = {threshold:g})")
        if annotation is not None:
            print("true events of the demo video:")
            for event in annotation["events"]:
                print(f"  [{event['time_s']:7.1f}s] {event['text']}")
    if args.plot:
        from livevlm.cli.plot import plot_timeline

        plot_timeline(view.timeline, view.said, args.plot, threshold)
    return 0


def _check_remote(args: StreamArgs) -> None:
    """With --server the server's model runs and decodes: the options that choose a local one, or how it
    decodes, are mistakes (silently ignored, they would look as if they had taken effect)."""
    local = [f"--{name.replace('_', '-')}" for name in ("model", "llm", "vision") if getattr(args, name, "")]
    local += [f"--{name}" for name in ("device", "dtype") if getattr(args, name) != "auto"]
    local += ["--decode"] * (args.decode != "eager") + ["--prompt-lookup"] * (args.prompt_lookup is not None)
    if local:
        raise CommandError(f"{', '.join(local)}: with --server the server's model runs, decoding as `livevlm serve` "
                           "set it up; drop them")
    from livevlm.remote import stream_url

    stream_url(args.server)  # a malformed address: ValueError, one line


def _stream_remote(args: StreamArgs, source: Any, queries: list[tuple[float, str]], realtime: bool,
                   annotation: Any) -> int:
    """`--server`: the same run on a `livevlm serve` server, printed exactly as a local run is."""
    import os

    from livevlm.remote import TextDelta, stream_to_server

    print(f"connecting to {args.server} …", file=sys.stderr, flush=True)
    stream = stream_to_server(args.server, source, queries, threshold=args.threshold,
                              max_new_tokens=args.max_new_tokens,
                              api_key=args.api_key or os.environ.get("LIVEVLM_API_KEY") or None, realtime=realtime,
                              open_timeout_s=args.open_timeout)
    print(f"session {stream.session} on {stream.url}; running on {stream.device}", file=sys.stderr, flush=True)
    view = _View(args.jsonl, args.frames)
    threading.Thread(target=_read_stdin, args=(stream,), daemon=True, name="livevlm-stdin").start()
    on_interrupt_raise()  # from here Ctrl-C prints what was said (below) instead of leaving at once
    try:
        for event in stream:
            if isinstance(event, TextDelta):
                view.show_delta(event.text)
            else:
                view(event)
    except KeyboardInterrupt:
        stream.close()
        _print_said(view, interrupted=True)
        return 130
    return _finish(args, view, stream.summary, stream.threshold, stream.summary.device, annotation)


def _load(args: StreamArgs):
    """The model, with a one-line status while it loads (the first run also converts the backbones)."""
    from livevlm import runtime

    print(f"loading {'the default model' if not args.model else args.model} …", file=sys.stderr, flush=True)
    started = time.monotonic()
    runtime.pin_mmap_threshold()  # flat memory over endless streams (see livevlm.runtime)
    runtime.use_all_cores()
    from transformers.utils import logging as hf_logging

    import livevlm

    hf_logging.disable_progress_bar()  # "Loading weights" bars are noise in a live transcript
    model = livevlm.load(args.model or "default", llm=args.llm or None, vision=args.vision or None,
                         device=args.device, dtype=args.dtype)
    print(f"loaded in {time.monotonic() - started:.1f} s; running on {model.runs_on}", file=sys.stderr, flush=True)
    return model


def _print_said(view: _View, interrupted: bool) -> None:
    print("\ninterrupted; said so far:" if interrupted else "said:", file=sys.stderr)
    for time_s, role, text in view.said:
        print(f"  [{time_s:7.1f}s] {role}: {text}", file=sys.stderr)
