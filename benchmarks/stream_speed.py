"""Streaming speed: the sequential per-frame loop vs the async pipeline vs the pipeline with multi-frame forwards.

Prints a table (never asserts a time). Each configuration runs in its own process so that peak memory
(max RSS) is its own. Default: the shipped default model on synthetic-world videos of 1 and 10 minutes.

    python benchmarks/stream_speed.py                       # 1 and 10 minutes, every mode
    python benchmarks/stream_speed.py --minutes 1 10 30     # how FPS changes with stream length
    python benchmarks/stream_speed.py --model runs/x/model  # another checkpoint

Modes:
  sequential   the public code's design: decode a frame, encode it, one LLM forward, repeat (no overlap)
  pipeline     decode / encode / LLM on separate threads, one frame per LLM forward
  multiframe   the pipeline, with every waiting frame in one LLM forward (up to 8)
All run "as fast as possible" with a narration query at 0 s; response latency is the wall time from the
decision to the end of the response.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

MODES = ("sequential", "pipeline", "multiframe")


def video_for(minutes: float, folder: Path) -> Path:
    from livevlm.world import WorldSpec, render_video

    path = folder / f"world-{minutes:g}min.mp4"
    if not path.is_file():
        render_video(WorldSpec(seed=11, index=0, duration=minutes * 60), path)
    return path


def run_mode(mode: str, model, fmt, encoder, video: str, fps: float, threads: int, encoder_threads: int,
             threshold: float = 0.725, queries: list[tuple[float, str]] | None = None,
             max_new_tokens: int = 64) -> dict:
    """Stream `video` through one mode and return its figures (any device: inputs follow the model)."""
    import torch

    from livevlm.config import EngineConfig
    from livevlm.engine.pipeline import StreamPipeline, query_is_due
    from livevlm.engine.session import ResponseEvent, StreamSession
    from livevlm.video import read_frames

    queries = queries if queries is not None else [(0.0, "Please narrate the video in real time.")]
    config = EngineConfig(max_frames_per_forward=8 if mode == "multiframe" else 1, threshold=threshold,
                          max_new_tokens=max_new_tokens)
    session = StreamSession(model, fmt, config)
    frames = read_frames(video, fps=fps, size=encoder.image_size, resample=encoder.resample)
    latencies: list[float] = []
    tokens = 0

    def record(events) -> None:
        nonlocal tokens
        for event in events:
            if isinstance(event, ResponseEvent):
                latencies.append(event.latency_s)
                tokens += len(event.token_ids)

    start = time.perf_counter()
    count = 0
    if mode == "sequential":
        pending = sorted(queries)
        for time_s, frame in frames:
            while pending and query_is_due(pending[0][0], time_s):  # the pipeline's rule
                when, text = pending.pop(0)
                session.add_query(text, when)
            record(session.step(encoder.encode(frame[None]), [time_s]))
            count += 1
        for when, text in pending:  # asked after the last frame
            session.add_query(text, when)
        record(session.flush())
    else:
        pipeline = StreamPipeline(session, encoder, frames, queries=queries, num_threads=threads,
                                  encoder_threads=encoder_threads or None)
        record(pipeline.events())
        count = pipeline.summary.frames
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    return {"mode": mode, "frames": count, "fps": count / elapsed, "elapsed_s": elapsed,
            "responses": len(latencies), "response_tokens": tokens,
            "mean_latency_s": sum(latencies) / max(len(latencies), 1),
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def worker(mode: str, video: str, model: str, threads: int, encoder_threads: int) -> dict:
    from livevlm import runtime

    # What the `livevlm` command applies to its process (the library never does): the oneDNN cap before torch
    # loads, and the pinned mmap threshold that keeps long streams flat (the published figures include it).
    runtime.cap_onednn_isa()
    runtime.pin_mmap_threshold()
    import torch

    import livevlm

    loaded = livevlm.load(model or "default")
    torch.set_num_threads(threads)
    return run_mode(mode, loaded.model, loaded.fmt, loaded.encoder, video, loaded.fps, threads, encoder_threads)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, nargs="+", default=[1.0, 10.0])
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    parser.add_argument("--model", default="", help="checkpoint folder; empty = the default model")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads")
    parser.add_argument("--encoder-threads", type=int, default=0,
                        help="the pipeline encoder's threads (0 = as --threads)")
    parser.add_argument("--videos", default="data/bench", help="where the synthetic videos are cached")
    parser.add_argument("--worker", nargs=2, metavar=("MODE", "VIDEO"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker[0], args.worker[1], args.model, args.threads,
                                args.encoder_threads)))
        return
    folder = Path(args.videos)
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for minutes in args.minutes:
        video = video_for(minutes, folder)
        for mode in args.modes:
            cmd = [sys.executable, __file__, "--worker", mode, str(video), "--model", args.model,
                   "--threads", str(args.threads), "--encoder-threads", str(args.encoder_threads)]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
            row = json.loads(out) | {"minutes": minutes}
            rows.append(row)
            print(f"{minutes:g} min {mode:11s} {row['fps']:6.2f} fps  {row['responses']:4d} responses  "
                  f"latency {row['mean_latency_s']:.2f} s  peak {row['peak_rss_mb']:.0f} MB", flush=True)
    print("\n| stream | mode | FPS | × sequential | responses | mean response latency | peak RSS |")
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        base = next(r for r in rows if r["minutes"] == row["minutes"] and r["mode"] == "sequential")["fps"] \
            if "sequential" in args.modes else row["fps"]
        print(f"| {row['minutes']:g} min | {row['mode']} | {row['fps']:.2f} | {row['fps'] / base:.2f}× | "
              f"{row['responses']} | {row['mean_latency_s']:.2f} s | {row['peak_rss_mb']:.0f} MB |")


if __name__ == "__main__":
    main()
