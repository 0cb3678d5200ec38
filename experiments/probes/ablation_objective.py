"""The paper's objective ablation (Table 1a) in miniature: which training objective teaches *when* to speak.

Three models are trained from the same start on the same synthetic-world narration streams, with the same
recipe (`recipes/default.yaml`: LoRA, lr, steps per epoch) and the same number of epochs:

  live         LIVE streaming dialogue: LM loss on the responses + the per-frame "stay silent / speak" target
               on the last token of every frame (the paper's objective, livevlm's default)
  per_frame    per-frame dialogue: a turn after *every* frame; frames with nothing to say get the response
               "(silent)" (the per-frame baseline: the model must answer each frame, in words)
  interleaved  interleaved dialogue: the LIVE streams, LM loss on the responses only (no frame targets;
               `train.stream_loss_weight=0`), so nothing teaches the frame decision

Then, on held-out narration streams (another seed), it prints the paper's columns:

  LM-PPL, LM-Correctness   teacher-forced, over the real narrations (the "(silent)" turns are not counted)
  TimeDiff, Fluency        teacher-forced, from one speak/silent decision per frame: for live and
                           interleaved the engine's rule on P(separator) at the frame end (θ); for per_frame
                           whether its response would start "(silent)", read at the first token where a
                           silence and a narration differ (same rule, that token in place of the separator)
  FPS                      free-running inference with the streaming engine (`engine.StreamSession`, one
                           frame per forward, cached frame features: the LLM's cost only); per_frame
                           generates a response after every frame, the others only when they decide to speak

    python experiments/probes/ablation_objective.py                 # 120 training videos, 1 epoch each (~40 min)
    python experiments/probes/ablation_objective.py --videos 40     # a quicker, noisier run

The data: data/world-train and data/world-heldout, each with a feature cache in features/ (without
--mean-rgb). `experiments/README.md` says how to make them and which recipe reproduces the published tables
(today's recipes/default.yaml needs a --mean-rgb cache).
Trained models are kept under --out; a rerun reuses them (delete a folder to retrain it). The ordering
found is what it is: nothing here is tuned per variant.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import replace
from pathlib import Path

import torch

VARIANTS = ("live", "per_frame", "interleaved")
SILENCE = "(silent)"


def per_frame_dialogue(dialogue, num_frames: int, silence: str = SILENCE):
    """The same stream with a turn after every frame: the real ones, and `silence` where there was none."""
    from livevlm.data.schema import Turn

    spoken = {dialogue.frame_index(t.time_s) for t in dialogue.turns if t.role == "assistant"}
    keyed = [(dialogue.frame_index(t.time_s), 0, t) for t in dialogue.turns]
    keyed += [(k, 1, Turn("assistant", dialogue.frame_time(k), silence)) for k in range(num_frames)
              if k not in spoken]
    return replace(dialogue, id=f"{dialogue.id}-per-frame", turns=[t for _, _, t in sorted(keyed, key=lambda x: x[:2])])


def write_variant_data(source: Path, features: Path, out: Path, videos: int) -> dict[str, Path]:
    """Narration dialogues of the first `videos` videos, as LIVE streams and as per-frame streams."""
    from livevlm.data.features import feature_file, load_features
    from livevlm.data.schema import read_dialogues, write_dialogues

    narrations = [d for d in read_dialogues(source) if d.task == "narration"][:videos]
    if not narrations:
        raise SystemExit(f"{source} has no narration dialogues; make the data first (experiments/README.md)")
    frames = {d.id: load_features(feature_file(d, source.parent, features))[0].shape[0] for d in narrations}
    out.mkdir(parents=True, exist_ok=True)
    paths = {"live": out / "live.jsonl", "per_frame": out / "per_frame.jsonl"}
    write_dialogues(paths["live"], narrations)
    write_dialogues(paths["per_frame"], [per_frame_dialogue(d, frames[d.id]) for d in narrations])
    return paths


def train_variant(variant: str, data: Path, features: Path, out: Path, epochs: float, recipe_path: str) -> float:
    """Train one variant unless its model exists; → training wall time in seconds (recorded for reruns)."""
    from livevlm.config import load_recipe
    from livevlm.train import train

    timing = out / "train_time.json"
    if (out / "model").is_dir() and timing.is_file():
        return json.loads(timing.read_text())["seconds"]
    overrides = [f"train.data={data}", f"train.features={features}", f"train.output_dir={out}",
                 f"train.epochs={epochs}", "train.eval_data=", f"train.save_steps={10**6}"]
    if variant == "interleaved":
        overrides.append("train.stream_loss_weight=0")
    start = time.perf_counter()
    train(load_recipe(recipe_path, overrides), resume="never")
    seconds = time.perf_counter() - start
    timing.write_text(json.dumps({"seconds": seconds}))
    return seconds


def _label_runs(labels: list[int], turns) -> list[list[int]]:
    return [[labels[i] for i in turn.text_positions] for turn in turns]


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def per_frame_scores(model, live_sample, frame_sample, fmt, fps: float, threshold: float, silence_ids: list[int]):
    """Teacher-forced metrics of a per-frame model, on the LIVE stream's turns (see the module docstring).

    silence_ids: the labels of a "(silent)" turn (from "Assistant" to eos).
    """
    from livevlm.evaluation.metrics import split_turns, stream_scores
    from livevlm.model import silent_decisions

    with torch.no_grad():
        logits = model(frame_sample.input_ids[None].to(model.device), frame_sample.frame_tokens)[0][0].cpu()
    labels = frame_sample.labels.tolist()
    turns = split_turns(labels, frame_sample.frame_ends, fmt.eos_id)
    runs = _label_runs(labels, turns)
    real = [i for i, run in enumerate(runs) if run != silence_ids]
    diverge = min(_common_prefix(silence_ids, runs[i]) for i in real)
    if diverge >= len(silence_ids) or any(len(runs[i]) <= diverge for i in real):
        raise ValueError(f"a narration starts like {SILENCE!r}: cannot tell them apart by one token")
    frame_of = {position: k for k, position in enumerate(frame_sample.frame_ends)}
    silent = [False] * len(frame_sample.frame_ends)  # frame 0 is followed by the query: no decision there
    for turn in turns:
        k = frame_of[turn.frame_positions[-1]] if turn.frame_positions else 0  # none: a 2nd turn at a frame
        if k > 0:
            row = logits[turn.text_positions[diverge]][None]
            silent[k] = bool(silent_decisions(row, silence_ids[diverge], threshold)[0])
    # the real turns' logits, placed at the LIVE stream's positions of the same turns
    live_labels = live_sample.labels.tolist()
    live_turns = split_turns(live_labels, live_sample.frame_ends, fmt.eos_id)
    if _label_runs(live_labels, live_turns) != [runs[i] for i in real]:
        raise ValueError("the per-frame stream's responses differ from the LIVE stream's")
    placed = torch.zeros(len(live_labels), logits.shape[-1])
    for live_turn, i in zip(live_turns, real, strict=True):
        placed[live_turn.text_positions] = logits[turns[i].text_positions]
    return stream_scores(placed, live_labels, live_sample.frame_ends, fmt.separator_id, fmt.eos_id, fps, threshold,
                         silent=silent)


def teacher_forced(variant: str, loaded, fmt, heldout: dict[str, Path], features: Path, threshold: float) -> dict:
    from livevlm.data.dataset import StreamDataset
    from livevlm.evaluation.metrics import StreamScores
    from livevlm.evaluation.stream_eval import evaluate_stream_model, share_within

    live = StreamDataset(heldout["live"], fmt, cache_dir=features)
    if variant != "per_frame":  # the frame-end decision: exactly `livevlm evaluate`
        result = evaluate_stream_model(loaded, live, [threshold])
        return {key: value for key, value in result.items() if not isinstance(value, dict)}
    frames = StreamDataset(heldout["per_frame"], fmt, cache_dir=features)
    silence_ids = _silence_labels(frames, fmt)
    pooled = StreamScores()
    for index in range(len(live)):
        pooled.extend(per_frame_scores(loaded.model, live[index], frames[index], fmt, live.dialogues[index].fps,
                                       threshold, silence_ids))
    return pooled.summary(threshold) | {"within_1s": share_within(pooled.time_diff_s, 1.0)}


def _silence_labels(frames, fmt) -> list[int]:
    """The labels of a "(silent)" turn as rendered: the most common turn of a per-frame stream."""
    from collections import Counter

    from livevlm.evaluation.metrics import split_turns

    sample = frames[0]
    labels = sample.labels.tolist()
    runs = _label_runs(labels, split_turns(labels, sample.frame_ends, fmt.eos_id))
    return list(Counter(tuple(run) for run in runs).most_common(1)[0][0])


def inference_fps(variant: str, loaded, fmt, heldout_live: Path, features: Path, videos: int,
                  threshold: float) -> dict:
    """Free-running: frames per second of the LLM stage, and how many responses (silences) it gave."""
    from livevlm.config import EngineConfig
    from livevlm.data.dataset import StreamDataset
    from livevlm.engine.session import ResponseEvent, StreamSession

    dataset = StreamDataset(heldout_live, fmt, cache_dir=features)
    frames = responses = silences = 0
    elapsed = seconds_of_video = 0.0
    for index in range(min(videos, len(dataset))):
        dialogue = dataset.dialogues[index]
        tokens = dataset.frame_tokens(dialogue)  # [T, N, D]
        session = StreamSession(loaded.model, fmt, EngineConfig(threshold=threshold, max_frames_per_forward=1))
        query = next(t.text for t in dialogue.turns if t.role == "user")
        session.add_query(query, dialogue.frame_time(0))  # answered after the first frame, as in training
        start = time.perf_counter()
        for k in range(tokens.shape[0]):
            for event in session.step(tokens[k:k + 1], [dialogue.frame_time(k)]):
                if isinstance(event, ResponseEvent):
                    responses += 1
                    silences += event.text.strip() == SILENCE
        elapsed += time.perf_counter() - start
        frames += tokens.shape[0]
        seconds_of_video += tokens.shape[0] / dialogue.fps
    if not frames:
        return {"fps": math.nan, "responses_per_min": math.nan, "generated_turns": 0}
    return {"fps": frames / elapsed, "responses_per_min": 60 * (responses - silences) / seconds_of_video,
            "generated_turns": responses}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train", type=Path, default=Path("data/world-train"), help="world folder with features")
    parser.add_argument("--heldout", type=Path, default=Path("data/world-heldout"))
    parser.add_argument("--videos", type=int, default=120, help="training videos (one narration stream each)")
    parser.add_argument("--epochs", type=float, default=1.0)
    parser.add_argument("--recipe", default="recipes/default.yaml")
    parser.add_argument("--threshold", type=float, default=0.725, help="θ of the speak decision")
    parser.add_argument("--heldout-videos", type=int, default=0, help="evaluate on the first N (0 = all)")
    parser.add_argument("--fps-videos", type=int, default=2, help="held-out videos streamed for FPS (0: skip)")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--out", type=Path, default=Path("runs/ablation"))
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = all cores)")
    args = parser.parse_args()

    from livevlm import runtime
    from livevlm.checkpoint import load_checkpoint
    from livevlm.evaluation.stream_eval import json_ready
    from livevlm.stream_format import StreamFormat

    runtime.cap_onednn_isa()  # what the `livevlm` command sets (import livevlm no longer does)
    if args.threads:
        torch.set_num_threads(args.threads)
    train_features, heldout_features = args.train / "features", args.heldout / "features"
    train_data = write_variant_data(args.train / "dialogue.jsonl", train_features, args.out / "data-train",
                                    args.videos)
    heldout = write_variant_data(args.heldout / "dialogue.jsonl", heldout_features, args.out / "data-heldout",
                                 args.heldout_videos or 10**9)
    rows = []
    for variant in args.variants:
        data = train_data["per_frame" if variant == "per_frame" else "live"]
        seconds = train_variant(variant, data, train_features.resolve(), args.out / variant, args.epochs,
                                args.recipe)
        loaded = load_checkpoint(args.out / variant / "model")
        loaded.model.eval()
        fmt = StreamFormat(loaded.tokenizer, loaded.format_config, loaded.model_config.tokens_per_frame)
        row = {"variant": variant, "train_minutes": seconds / 60}
        row |= teacher_forced(variant, loaded, fmt, heldout, heldout_features, args.threshold)
        row |= inference_fps(variant, loaded, fmt, heldout["live"], heldout_features, args.fps_videos,
                             args.threshold)
        print(json.dumps(json_ready(row)), flush=True)
        rows.append(row)
    print(f"\n{args.videos} training videos x {args.epochs:g} epoch(s), held-out narration streams, θ = "
          f"{args.threshold}\n")
    print("| objective | LM-PPL ↓ | LM-Correctness ↑ | TimeDiff ↓ | within 1 s ↑ | Fluency ↑ | FPS ↑ | train time |")
    print("|---|---|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['variant']} | {row['lm_ppl']:.2f} | {100 * row['lm_correctness']:.1f} % | "
              f"{row['time_diff_s']:.2f} s | {100 * row['within_1s']:.1f} % | {100 * row['fluency']:.1f} % | "
              f"{row['fps']:.1f} | {row['train_minutes']:.0f} min |")
    if any(math.isnan(row["time_diff_s"]) for row in rows):
        print("(nan: no model-initiated turns in the held-out data)")


if __name__ == "__main__":
    main()
