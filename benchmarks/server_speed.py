"""Server speed: one session through `livevlm serve` against `livevlm stream` on the same video.

Prints both FPS and their ratio (never asserts a time). Each side runs as the user runs it, in processes of
its own: `livevlm stream VIDEO --jsonl`, then `livevlm serve` and `livevlm stream VIDEO --server ws://…`
on the same machine (the client reads and sends the video while the server computes, as a local run
decodes while it computes). Both FPS are the commands' own summaries: frames / seconds from the first
frame to the end, model loading excluded. Default: the shipped default model on a 1-minute synthetic-world
video, a narration query at 0 s, as fast as possible.

    python benchmarks/server_speed.py                        # default model, 1 minute
    python benchmarks/server_speed.py --model runs/x/model --minutes 2 --repeat 3

With `--sessions K`: K clients at once, each streaming the video, against `livevlm serve` and `livevlm serve
--batch-sessions` (alternating, `--repeat` rounds). Prints the aggregate FPS (all frames / the longest
session's seconds) and whether each client heard the same responses from both servers.

    python benchmarks/server_speed.py --sessions 4 --repeat 2
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

QUERY = "Please narrate the video in real time."


def video_for(minutes: float, folder: Path) -> Path:
    from livevlm.world import WorldSpec, render_video

    path = folder / f"world-{minutes:g}min.mp4"
    if not path.is_file():
        render_video(WorldSpec(seed=11, index=0, duration=minutes * 60), path)
    return path


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "livevlm.cli", *args]


def summary_of(command: list[str]) -> dict:
    """Run a `livevlm stream … --jsonl` command; its summary line."""
    return summaries_of([command])[0]


def summaries_of(commands: list[list[str]]) -> list[dict]:
    """Run `livevlm stream … --jsonl` commands at once; their summary lines, each with its responses' texts."""
    procs = [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
                              text=True) for command in commands]
    summaries = []
    for command, proc in zip(commands, procs, strict=True):
        out, err = proc.communicate(timeout=3600)
        if proc.returncode != 0:
            raise SystemExit(f"{' '.join(command)} failed:\n{err}")
        lines = [json.loads(line) for line in out.splitlines()]
        summary = lines[-1]
        summary["texts"] = [(line["time_s"], line["text"]) for line in lines if line["type"] == "response"]
        summary["responses"] = len(summary["texts"])
        summaries.append(summary)
    return summaries


def start_server(model_args: list[str], queue_frames: int, *extra: str) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen(cli("serve", "--port", "0", "--max-fps", "1000", "--queue-frames", str(queue_frames),
                                "--max-sessions", "16", *extra, *model_args), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True,
                            env=dict(os.environ, PYTHONUNBUFFERED="1"))
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        if not line:
            break
        found = re.search(r"(ws://\S+/v1/stream)", line)
        if found:
            return proc, found.group(1)
    proc.kill()
    raise SystemExit("livevlm serve did not start")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="", help="checkpoint folder (default: the shipped default model)")
    parser.add_argument("--minutes", type=float, default=1.0, help="length of the synthetic-world video")
    parser.add_argument("--repeat", type=int, default=1, help="runs of each side (alternating)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--queue-frames", type=int, default=16,
                        help="the server's queue_frames, which is also the client's window of unanswered frames")
    parser.add_argument("--sessions", type=int, default=0,
                        help="K clients at once against the server with and without --batch-sessions")
    args = parser.parse_args()
    model_args = (["--model", args.model] if args.model else []) + ["--device", args.device]
    common = ["--jsonl", "--no-frames", "--query", QUERY, "--at", "0"]
    with tempfile.TemporaryDirectory() as tmp:
        video = str(video_for(args.minutes, Path(tmp)))
        if args.sessions:
            concurrent(args, model_args, common, video)
            return
        server, url = start_server(model_args, args.queue_frames)
        try:
            local, remote = [], []
            for _ in range(args.repeat):
                local.append(summary_of(cli("stream", video, *model_args, *common)))
                remote.append(summary_of(cli("stream", video, "--server", url, *common)))
        finally:
            server.terminate()
            server.wait(timeout=60)
    print(f"{args.minutes:g}-minute synthetic-world video, {local[0]['frames']} frames, model "
          f"{args.model or 'default'} on {local[0]['device']}, {os.cpu_count()} CPU cores, server queue_frames "
          f"{args.queue_frames}")
    print("| run | livevlm stream FPS | through livevlm serve FPS | ratio | responses (local / server) |")
    print("|---|---|---|---|---|")
    for k, (a, b) in enumerate(zip(local, remote, strict=True), 1):
        print(f"| {k} | {a['fps']:.2f} | {b['fps']:.2f} | {b['fps'] / a['fps']:.2f} | "
              f"{a['responses']} / {b['responses']} |")
    mean_a = sum(a["fps"] for a in local) / len(local)
    mean_b = sum(b["fps"] for b in remote) / len(remote)
    print(f"mean: livevlm stream {mean_a:.2f} FPS, through the server {mean_b:.2f} FPS, ratio {mean_b / mean_a:.2f}")


def concurrent(args: argparse.Namespace, model_args: list[str], common: list[str], video: str) -> None:
    """K clients at once, against the server alone-stepping its sessions and batching them, alternating."""
    rows = []
    for _ in range(args.repeat):
        for mode, extra in (("one at a time", ()), ("--batch-sessions", ("--batch-sessions",))):
            server, url = start_server(model_args, args.queue_frames, *extra)
            try:
                runs = summaries_of([cli("stream", video, "--server", url, *common)] * args.sessions)
            finally:
                server.terminate()
                server.wait(timeout=60)
            frames = sum(run["frames"] for run in runs)
            seconds = max(run["frames"] / run["fps"] for run in runs)  # the longest session's
            rows.append((mode, frames / seconds, runs))
    first = {mode: runs for mode, _, runs in reversed(rows)}
    same = all(a["texts"] == b["texts"] for a, b in zip(first["one at a time"], first["--batch-sessions"], strict=True))
    print(f"{args.sessions} clients at once, each a {args.minutes:g}-minute synthetic-world video "
          f"({rows[0][2][0]['frames']} frames), model {args.model or 'default'} on {rows[0][2][0]['device']}, "
          f"{os.cpu_count()} CPU cores")
    print("| server | aggregate FPS | per-session FPS | responses per session |")
    print("|---|---|---|---|")
    for mode, fps, runs in rows:
        per_session = ", ".join(f"{run['fps']:.2f}" for run in runs)
        print(f"| {mode} | {fps:.2f} | {per_session} | {', '.join(str(run['responses']) for run in runs)} |")
    print(f"each client heard the same responses (times and texts) from both servers: {'yes' if same else 'NO'}")


if __name__ == "__main__":
    main()
