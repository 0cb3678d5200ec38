"""`livevlm stream SOURCE`: watch a video, a camera or a network stream and speak when the model decides to.

Events go out as they happen, as a readable live view or as JSON lines (`--jsonl`):
    {"type": "frame", "time_s", "p_speak"}            every frame
    {"type": "query", "time_s", "text"}               a user query, when it enters the stream
    {"type": "response", "time_s", "text", "latency_s"}
    {"type": "summary", "frames", "fps", "max_lag_s", "threshold", "device"}  once, at the end (θ and
                                                      device + dtype as used, e.g. "cpu float32")
Queries come from `--query "…" [--at SEC]` (repeatable; the n-th --at goes with the n-th --query, no --at =
as soon as possible) and from lines typed on stdin while it runs. Ctrl-C prints what was said and exits 130.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from livevlm.app.cli import CommandError
from livevlm.devices import DtypeName

log = logging.getLogger(__name__)


@dataclass
class StreamArgs:
    source: str = field(default="", metadata={
        "positional": True, "help": "video file, camera (0 or /dev/video0) or URL (rtsp/http/...); omit with --demo"})
    demo: bool = field(default=False, metadata={
        "help": "stream a synthetic-world video generated on the fly (its true events are printed at the end)"})
    demo_seed: int = field(default=7, metadata={"help": "seed of the --demo video"})
    demo_duration: float = field(default=30.0, metadata={"help": "seconds of the --demo video"})
    model: str = field(default="", metadata={"help": "checkpoint folder; empty = the shipped default model"})
    query: list[str] = field(default_factory=list, metadata={"help": "a user query"})
    at: list[float] = field(default_factory=list, metadata={"help": "stream time (s) of the matching --query"})
    threshold: float | None = field(default=None, metadata={
        "help": "stay silent while P(separator) >= threshold; default: the model's recommended θ "
                "(livevlm.yaml engine.threshold), else the engine's 0.725"})
    max_new_tokens: int = field(default=64, metadata={"help": "cap on a response's length in tokens"})
    realtime: bool = field(default=False, metadata={
        "help": "pace frames to the wall clock (default for cameras and URLs)"})
    fast: bool = field(default=False, metadata={"help": "as fast as possible (default for files)"})
    jsonl: bool = field(default=False, metadata={"help": "print one JSON object per event"})
    frames: bool = field(default=True, metadata={"help": "with --jsonl, also print every frame's p_speak"})
    plot: str = field(default="", metadata={"help": "save a timeline plot (PNG) of p(speak), responses, queries"})
    max_frames_per_forward: int = field(default=8, metadata={"help": "frames per LLM forward when catching up"})
    device: str = field(default="auto", metadata={"help": "where the encoder and the LLM run: auto (a GPU when "
                                                           "there is one), cpu, cuda, cuda:1, …"})
    dtype: DtypeName = field(default="auto", metadata={
        "help": "weight precision; auto = bfloat16 on a GPU, float32 on the CPU"})


def _load(args: StreamArgs):
    """Model, stream format and frame encoder, as the checkpoint describes them."""
    import torch
    from transformers.utils import logging as hf_logging

    from livevlm.checkpoint import load_checkpoint
    from livevlm.default_model import default_model_path
    from livevlm.devices import resolve_device, resolve_dtype
    from livevlm.stream_format import StreamFormat
    from livevlm.vision import model_frame_encoder

    hf_logging.disable_progress_bar()  # "Loading weights" bars are noise in a live transcript
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    loaded = load_checkpoint(args.model or default_model_path(), device=device, dtype=dtype)
    mc = loaded.model_config
    fmt = StreamFormat(loaded.tokenizer, loaded.format_config, mc.tokens_per_frame)
    encoder = model_frame_encoder(mc, device=device, dtype=dtype)
    return loaded, fmt, encoder


def demo_video(seed: int, duration: float) -> tuple[Path, dict[str, Any]]:
    """A synthetic-world video (cached) and its annotation."""
    from livevlm.backbones import default_cache_dir
    from livevlm.world import WorldSpec, render_video

    folder = default_cache_dir() / "demo"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"world-seed{seed}-{duration:g}s.mp4"
    spec = WorldSpec(seed=seed, index=0, duration=duration)
    annotation_file = path.with_suffix(".json")
    if path.is_file() and annotation_file.is_file():
        return path, json.loads(annotation_file.read_text())
    with tempfile.TemporaryDirectory(dir=folder) as tmp:
        annotation = render_video(spec, Path(tmp) / path.name)
        os.replace(Path(tmp) / path.name, path)
    annotation_file.write_text(json.dumps(annotation))
    return path, annotation


def _queries(args: StreamArgs) -> list[tuple[float, str]]:
    if len(args.at) > len(args.query):
        raise CommandError(f"{len(args.at)} --at for {len(args.query)} --query: give one --at per --query")
    return [(args.at[i] if i < len(args.at) else 0.0, q) for i, q in enumerate(args.query)]


class _View:
    """Prints events: JSON lines, or a readable transcript with a status line (FPS, lag) on stderr."""

    def __init__(self, jsonl: bool, frames: bool) -> None:
        self.jsonl, self.frames = jsonl, frames
        self.said: list[tuple[float, str, str]] = []  # (time, role, text)
        self.timeline: list[tuple[float, float]] = []  # (time, p_speak)
        self.start = time.monotonic()
        self.status = sys.stderr.isatty() and not jsonl

    def __call__(self, event: Any) -> None:
        from livevlm.engine.session import FrameEvent, QueryEvent, ResponseEvent

        if isinstance(event, FrameEvent):
            self.timeline.append((event.time_s, event.p_speak))
            if self.jsonl and self.frames:
                self._emit({"type": "frame", "time_s": round(event.time_s, 3), "p_speak": round(event.p_speak, 4)})
            elif self.status:
                fps = len(self.timeline) / max(time.monotonic() - self.start, 1e-9)
                print(f"\r  {event.time_s:7.1f}s  p(speak) {event.p_speak:4.2f}  {fps:5.1f} fps", end="",
                      file=sys.stderr, flush=True)
        elif isinstance(event, QueryEvent):
            self.said.append((event.time_s, "user", event.text))
            self._emit({"type": "query", "time_s": round(event.time_s, 3), "text": event.text},
                       f"[{event.time_s:7.1f}s] User: {event.text}")
        elif isinstance(event, ResponseEvent):
            self.said.append((event.time_s, "assistant", event.text))
            self._emit({"type": "response", "time_s": round(event.time_s, 3), "text": event.text,
                        "latency_s": round(event.latency_s, 3)},
                       f"[{event.time_s:7.1f}s] Assistant: {event.text}")

    def _emit(self, obj: dict[str, Any], line: str | None = None) -> None:
        if self.jsonl:
            print(json.dumps(obj), flush=True)
        elif line is not None:
            if self.status:
                print("\r" + " " * 50 + "\r", end="", file=sys.stderr)
            print(line, flush=True)


def _read_stdin(pipeline) -> None:
    """Typed (or piped) queries: one per line, asked at the current stream time. No stdin: nothing."""
    try:
        for line in sys.stdin:
            if line.strip():
                pipeline.ask(line.strip())
    except (OSError, ValueError):  # stdin closed or not readable (e.g. under a test runner)
        return


def stream_command(args: StreamArgs) -> int:
    from livevlm.checkpoint import resolve_threshold
    from livevlm.config import EngineConfig
    from livevlm.engine.pipeline import StreamPipeline
    from livevlm.engine.session import StreamSession
    from livevlm.video import _is_camera, _is_url, read_frames

    annotation = None
    source: str | int = args.source
    if args.demo:
        source, annotation = demo_video(args.demo_seed, args.demo_duration)
    elif not args.source:
        raise CommandError("give a SOURCE (video file, camera index or URL), or --demo")
    if args.realtime and args.fast:
        raise CommandError("--realtime and --fast exclude each other")
    live = _is_camera(source) or _is_url(str(source))
    realtime = args.realtime or (live and not args.fast)
    queries = _queries(args)
    loaded, fmt, encoder = _load(args)
    frames = read_frames(source, fps=loaded.format_config.fps, size=encoder.image_size, realtime=False)
    threshold = resolve_threshold(args.threshold, loaded)
    config = EngineConfig(threshold=threshold, max_new_tokens=args.max_new_tokens,
                          max_frames_per_forward=args.max_frames_per_forward, realtime=realtime)
    session = StreamSession(loaded.model, fmt, config)
    view = _View(args.jsonl, args.frames)
    pipeline = StreamPipeline(session, encoder, frames, realtime=realtime, queries=queries, on_event=view)
    threading.Thread(target=_read_stdin, args=(pipeline,), daemon=True, name="livevlm-stdin").start()
    try:
        summary = pipeline.run()
    except KeyboardInterrupt:
        _print_said(view, interrupted=True)
        return 130
    if view.status:
        print("\r" + " " * 50 + "\r", end="", file=sys.stderr)
    ran_on = f"{loaded.model.device.type} {str(next(loaded.model.parameters()).dtype).removeprefix('torch.')}"
    summary_obj = {"type": "summary", "frames": summary.frames, "fps": round(summary.fps, 2),
                   "max_lag_s": round(summary.max_lag_s, 3), "threshold": threshold, "device": ran_on}
    if args.jsonl:
        print(json.dumps(summary_obj), flush=True)
    else:
        print(f"{summary.frames} frames at {summary.fps:.1f} fps on {ran_on}, {summary.responses} responses, "
              f"max lag {summary.max_lag_s:.2f} s, speak threshold θ = {threshold:g}")
        if annotation is not None:
            print("true events of the demo video:")
            for event in annotation["events"]:
                print(f"  [{event['time_s']:7.1f}s] {event['text']}")
    if args.plot:
        plot_timeline(view, args.plot, threshold)
    return 0


def _print_said(view: _View, interrupted: bool) -> None:
    print("\ninterrupted; said so far:" if interrupted else "said:", file=sys.stderr)
    for time_s, role, text in view.said:
        print(f"  [{time_s:7.1f}s] {role}: {text}", file=sys.stderr)


def plot_timeline(view: _View, path: str, threshold: float) -> None:
    """p(speak) over time, the speak threshold, responses (green) and queries (blue) marked with their text."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(12, 4))
    if view.timeline:
        times, probs = zip(*view.timeline, strict=True)
        ax.plot(times, probs, color="black", linewidth=1, label="p(speak)")
    ax.axhline(1 - threshold, color="grey", linestyle="--", linewidth=0.8, label=f"speak above {1 - threshold:.3f}")
    for k, (time_s, role, text) in enumerate(view.said):
        color = "tab:green" if role == "assistant" else "tab:blue"
        ax.axvline(time_s, color=color, alpha=0.6)
        label = "".join(c for c in text[:40] if c.isprintable())  # a model may emit control characters
        ax.text(time_s, 1.02 + 0.08 * (k % 3), label, rotation=0, fontsize=7, color=color,
                transform=ax.get_xaxis_transform(), clip_on=False, parse_math=False)  # "$5 … $6" is not TeX
    ax.set_xlabel("stream time (s)")
    ax.set_ylabel("p(speak)")
    ax.set_ylim(0, 1)
    ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
