"""Streaming speed: the sequential per-frame loop against livevlm's pipelines and `livevlm stream --fast`.

Prints a table, and with --json one JSON object per run (never asserts a time). Each run has its own process,
so that peak memory (max RSS) is its own. Default: the shipped default model on synthetic-world videos of 1
and 10 minutes, narration asked at 0 s, as fast as possible.

    python benchmarks/stream_speed.py                                  # 1 and 10 minutes, every mode
    python benchmarks/stream_speed.py --minutes 1 --modes sequential fast sequential fast --json
    python benchmarks/stream_speed.py --model runs/x/model             # another checkpoint
    python benchmarks/stream_speed.py --workload frames                # no query: frames only

Modes (the first three share the PyTorch frame encoder, as the paper's code has it):
  sequential   the public code's design: decode a frame, encode it, one LLM forward, repeat (no overlap);
               it also reports the encoder's and the LLM's milliseconds per frame
  pipeline     decode / encode / LLM on separate threads, one frame per LLM forward
  multiframe   the pipeline, with every waiting frame in one LLM forward (up to 8)
  fast         what `livevlm stream --fast` runs: `LiveVLM.stream` with its own encoder (ONNX Runtime for the
               default DINOv2 on a CPU) and thread sizing, responses with prompt lookup (docs/engine.md)
  fast-no-lookup  fast with `--prompt-lookup 0` (one forward per response token), to see what lookup gives
Every run reports what was said (`said`: [time, text] pairs), and the table says whether it equals the first
sequential run's on the same video: the exactness the speed must keep. Response latency is the wall time
from the decision to the end of the response. This machine's speed drifts by tens of percent within an hour, so
a ratio of two runs minutes apart says little: `--rounds N` runs the modes N times in turn (sequential fast
sequential fast …), takes each run's ratio to the sequential run of its own round, and prints each mode's
median ratio over the rounds.

    python benchmarks/stream_speed.py --minutes 1 10 --modes sequential fast --threads 1 --rounds 3
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

import numpy as np

MODES = ("sequential", "pipeline", "multiframe")  # the engine modes (official_speed.py times these)
ALL_MODES = (*MODES, "fast")
NARRATE = "Please narrate the video in real time."


def video_for(minutes: float, folder: Path) -> Path:
    from livevlm.world import WorldSpec, render_video

    path = folder / f"world-{minutes:g}min.mp4"
    if not path.is_file():
        render_video(WorldSpec(seed=11, index=0, duration=minutes * 60), path)
    return path


def run_mode(mode: str, model, fmt, encoder, video: str, fps: float, threads: int, encoder_threads: int,
             threshold: float = 0.725, queries: list[tuple[float, str]] | None = None,
             max_new_tokens: int = 64, decode: str = "eager") -> dict:
    """Stream `video` through one engine mode (`MODES`) and return its figures (any device: inputs follow the
    model). The sequential mode also times its two stages: `encoder_ms` and `llm_ms` per frame. `decode` is
    `EngineConfig.decode` (how response tokens are decoded)."""
    import torch

    from livevlm.config import EngineConfig
    from livevlm.engine.pipeline import StreamPipeline, query_is_due
    from livevlm.engine.session import ResponseEvent, StreamSession
    from livevlm.video import read_frames

    queries = queries if queries is not None else [(0.0, NARRATE)]
    config = EngineConfig(max_frames_per_forward=8 if mode == "multiframe" else 1, threshold=threshold,
                          max_new_tokens=max_new_tokens, decode=decode)
    session = StreamSession(model, fmt, config)
    frames = read_frames(video, fps=fps, size=encoder.image_size, resample=encoder.resample)
    said: list[ResponseEvent] = []
    stages = {"encoder": 0.0, "llm": 0.0}

    def record(events) -> None:
        said.extend(event for event in events if isinstance(event, ResponseEvent))

    start = time.perf_counter()
    count = 0
    if mode == "sequential":
        pending = sorted(queries)
        previous = None  # the frame before, for a model with change_hues
        for time_s, frame in frames:
            while pending and query_is_due(pending[0][0], time_s):  # the pipeline's rule
                when, text = pending.pop(0)
                session.add_query(text, when)
            began = time.perf_counter()
            tokens = encoder.encode(frame[None], previous=previous)
            previous = frame
            encoded = time.perf_counter()
            record(session.step(tokens, [time_s]))
            stages["encoder"] += encoded - began
            stages["llm"] += time.perf_counter() - encoded
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
    row = figures(mode, count, time.perf_counter() - start, said)
    if mode == "sequential":
        row |= {f"{stage}_ms": 1000 * seconds / max(count, 1) for stage, seconds in stages.items()}
    return row


def figures(mode: str, frames: int, elapsed: float, said: list) -> dict:
    latencies = [event.latency_s for event in said]
    return {"mode": mode, "frames": frames, "fps": frames / elapsed, "elapsed_s": elapsed,
            "responses": len(said), "response_tokens": sum(len(event.token_ids) for event in said),
            "mean_latency_s": sum(latencies) / max(len(latencies), 1),
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "said": [[round(event.time_s, 3), event.text] for event in said]}


def run_fast(loaded, video: str, queries: list[tuple[float, str]], mode: str = "fast") -> dict:
    """`livevlm stream --fast` without the printing: `LiveVLM.stream` as it comes ("fast"), or with
    `prompt_lookup=0` ("fast-no-lookup")."""
    from livevlm.engine.session import ResponseEvent

    loaded.encoder  # noqa: B018  (built before the clock, as the engine modes build theirs)
    start = time.perf_counter()
    stream = loaded.stream(video, queries, prompt_lookup=0 if mode == "fast-no-lookup" else None)
    said = [event for event in stream if isinstance(event, ResponseEvent)]
    row = figures(mode, stream.summary.frames, time.perf_counter() - start, said)
    encoder = loaded.encoder
    return row | {"encoder_backend": "onnxruntime" if encoder.onnx_tower is not None else "torch"}


def stage_costs(loaded, video: str) -> dict:
    """Milliseconds per frame of each stage alone (one thread as the worker has it), against its FLOPs: the
    encoder on one frame and on batches of 8 (PyTorch, and ONNX Runtime where it applies), the LLM on a silent
    frame's 1-frame and 8-frame forwards. Frames of `video`; at θ 0 a frame speaks only where a word beats the
    separator outright."""
    import torch

    from livevlm.config import EngineConfig
    from livevlm.engine.session import StreamSession
    from livevlm.video import read_frames
    from livevlm.vision import model_frame_encoder

    def median_ms(work, repeats: int = 5) -> float:
        work()
        times = []
        for _ in range(repeats):
            began = time.perf_counter()
            work()
            times.append(time.perf_counter() - began)
        return 1000 * sorted(times)[len(times) // 2]

    torch_encoder = model_frame_encoder(loaded.loaded.model_config, backend="torch")
    pixels = [frame for _, frame in read_frames(video, fps=loaded.fps, size=torch_encoder.image_size,
                                                   resample=torch_encoder.resample)][:16]
    batch = np.stack(pixels[:8])
    costs = {"encoder_torch_ms": median_ms(lambda: torch_encoder.encode(batch[:1])),
             "encoder_torch_batch8_ms": median_ms(lambda: torch_encoder.encode(batch)) / 8}
    if loaded.encoder.onnx_tower is not None:  # with as many threads as PyTorch has here
        onnx_encoder = model_frame_encoder(loaded.loaded.model_config, backend="onnx", threads=torch.get_num_threads())
        costs |= {"encoder_onnx_ms": median_ms(lambda: onnx_encoder.encode(batch[:1])),
                  "encoder_onnx_batch8_ms": median_ms(lambda: onnx_encoder.encode(batch)) / 8}
    tokens = torch_encoder.encode(np.stack(pixels))  # [16, N, D]
    session = StreamSession(loaded.model, loaded.fmt, EngineConfig(threshold=0.0, max_frames_per_forward=8))
    clock = iter(range(10**6))

    def feed(count: int) -> None:
        session.step(tokens[:count], [next(clock) / loaded.fps for _ in range(count)])

    costs |= {"llm_1frame_ms": median_ms(lambda: feed(1)), "llm_8frames_ms": median_ms(lambda: feed(8)) / 8}
    tower = torch_encoder.tower
    patches = (torch_encoder.image_size // torch_encoder.patch_size) ** 2 + 1 + torch_encoder.num_registers
    linear = sum(m.weight.numel() for m in tower.modules() if isinstance(m, torch.nn.Linear))
    layers, width = tower.config.num_hidden_layers, tower.config.hidden_size
    llm = loaded.model.llm
    llm_linear = sum(m.weight.numel() for name, m in llm.named_modules()
                     if isinstance(m, torch.nn.Linear) and not name.endswith("lm_head"))
    per_frame = len(loaded.fmt.frame_ids(False))
    costs |= {"encoder_gflop": (2 * linear * patches + 4 * layers * patches * patches * width) / 1e9,
              "llm_gflop": (2 * llm_linear * per_frame + 2 * llm.lm_head.weight.numel()) / 1e9,
              "cache_tokens_at_llm_timing": session.cache_length}
    return costs


def worker(mode: str, video: str, model: str, threads: int, encoder_threads: int, workload: str) -> dict:
    from livevlm import runtime

    # What the `livevlm` command applies to its process (the library never does): the oneDNN cap before torch
    # loads, and the pinned mmap threshold that keeps long streams flat (the published figures include it).
    runtime.cap_onednn_isa()
    runtime.pin_mmap_threshold()
    import torch

    import livevlm
    from livevlm.vision import model_frame_encoder

    loaded = livevlm.load(model or "default")
    queries = [(0.0, NARRATE)] if workload == "narration" else []
    if mode in ("fast", "fast-no-lookup"):  # the command's own thread sizing: nothing set here
        return run_fast(loaded, video, queries, mode) | {"threads": runtime.usable_cores()}
    torch.set_num_threads(threads)
    if mode == "stages":
        return {"mode": "stages", "threads": threads} | stage_costs(loaded, video)
    encoder = model_frame_encoder(loaded.loaded.model_config, backend="torch")  # as the paper's code: PyTorch
    return run_mode(mode, loaded.model, loaded.fmt, encoder, video, loaded.fps, threads, encoder_threads,
                    threshold=loaded.threshold, queries=queries) | {"threads": threads}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, nargs="+", default=[1.0, 10.0])
    parser.add_argument("--modes", nargs="+", default=list(ALL_MODES), choices=(*ALL_MODES, "fast-no-lookup", "stages"),
                        help="run in this order (repeat one to interleave, e.g. sequential fast sequential fast); "
                             "`stages` times each stage alone")
    parser.add_argument("--workload", choices=("narration", "frames"), default="narration",
                        help="narration: asked at 0 s; frames: no query (the model may still speak)")
    parser.add_argument("--model", default="", help="checkpoint folder; empty = the default model")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                        help="torch threads of the engine modes and stages; fast sizes its own")
    parser.add_argument("--encoder-threads", type=int, default=0,
                        help="the pipeline encoder's threads (0 = as --threads)")
    parser.add_argument("--videos", default="data/bench", help="where the synthetic videos are cached")
    parser.add_argument("--rounds", type=int, default=1,
                        help="run --modes this many times in turn; ratios are to each round's own sequential run")
    parser.add_argument("--json", action="store_true", help="print one JSON object per run as it ends")
    parser.add_argument("--worker", nargs=2, metavar=("MODE", "VIDEO"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rounds < 1:
        parser.error(f"--rounds {args.rounds}: must be at least 1")
    if args.worker:
        print(json.dumps(worker(args.worker[0], args.worker[1], args.model, args.threads, args.encoder_threads,
                                args.workload)))
        return
    folder = Path(args.videos)
    folder.mkdir(parents=True, exist_ok=True)
    print(f"load before: {os.getloadavg()[0]:.2f} (1-min average) on {os.cpu_count()} cores", flush=True)
    rows = []
    for minutes in args.minutes:
        video = video_for(minutes, folder)
        for round_index, mode in ((r, mode) for r in range(args.rounds) for mode in args.modes):
            cmd = [sys.executable, __file__, "--worker", mode, str(video), "--model", args.model,
                   "--threads", str(args.threads), "--encoder-threads", str(args.encoder_threads),
                   "--workload", args.workload]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
            row = json.loads(out) | {"minutes": minutes, "workload": args.workload, "round": round_index,
                                     "load_1min": round(os.getloadavg()[0], 2)}
            rows.append(row)
            if args.json:
                print(json.dumps(row), flush=True)
            elif mode == "stages":
                print(f"{minutes:g} min stages: " + ", ".join(f"{k} {v:.1f}" for k, v in row.items()
                                                              if isinstance(v, float)), flush=True)
            else:
                print(f"{minutes:g} min {mode:11s} {row['fps']:6.2f} fps  {row['responses']:4d} responses  "
                      f"latency {row['mean_latency_s']:.2f} s  peak {row['peak_rss_mb']:.0f} MB", flush=True)
    print_table(rows)


def sequential_ratios(runs: list[dict]) -> list[float | None]:
    """Each run's FPS over its sequential baseline: the mean of the sequential runs of its own round on the same
    video, else of every round's (None without any). Within a round the runs are minutes apart, so the machine's
    drift cancels better than against a mean over the whole benchmark."""
    ratios = []
    for row in runs:
        same_video = [r for r in runs if r["minutes"] == row["minutes"] and r["mode"] == "sequential"]
        same_round = [r for r in same_video if r.get("round") == row.get("round")] or same_video
        ratios.append(row["fps"] / (sum(r["fps"] for r in same_round) / len(same_round)) if same_round else None)
    return ratios


def print_table(rows: list[dict]) -> None:
    runs = [row for row in rows if row["mode"] != "stages"]
    if not runs:
        return
    ratios = sequential_ratios(runs)
    print("\n| stream | round | mode | threads | FPS | × sequential | responses | same as sequential "
          "| mean response latency | peak RSS |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for row, ratio in zip(runs, ratios, strict=True):
        same_video = [r for r in runs if r["minutes"] == row["minutes"] and r["mode"] == "sequential"]
        same = "–" if not same_video else ("yes" if row["said"] == same_video[0]["said"] else "NO")
        shown = "–" if ratio is None else f"{ratio:.2f}×"
        print(f"| {row['minutes']:g} min | {row.get('round', 0) + 1} | {row['mode']} | {row['threads']} | "
              f"{row['fps']:.2f} | {shown} | {row['responses']} | {same} | {row['mean_latency_s']:.2f} s | "
              f"{row['peak_rss_mb']:.0f} MB |")
    groups: dict[tuple[float, str], list[float]] = {}
    for row, ratio in zip(runs, ratios, strict=True):
        if ratio is not None and row["mode"] != "sequential":
            groups.setdefault((row["minutes"], row["mode"]), []).append(ratio)
    for (minutes, mode), values in groups.items():
        print(f"{minutes:g} min {mode}: median {float(np.median(values)):.2f}× sequential over {len(values)} "
              f"run(s) (min {min(values):.2f}×, max {max(values):.2f}×)")


if __name__ == "__main__":
    main()
