"""Teacher-forced stream metrics of a model on a dialogue file (what `livevlm evaluate` prints).

One forward per dialogue over its ground-truth stream; the metrics of `evaluation.metrics` at each
threshold asked for, pooled over all turns, overall and per task (narration, reminder, …). Prints one
JSON object: the metrics at the main threshold at top level, the others under "by_threshold".

`--choose-threshold` calibrates a model: among the thresholds given, the one that times most turns within
1 s on the data (a validation split, never the test set; `choose_threshold` says why) is stored in the
checkpoint (`engine.threshold` in its livevlm.yaml), and `livevlm stream` / `evaluate` then use it
whenever no θ is named.
"""

from __future__ import annotations

import logging
import math

import torch

from livevlm.evaluation.metrics import StreamScores, stream_scores

log = logging.getLogger(__name__)


def evaluate_stream_model(loaded, dataset, thresholds: list[float], limit: int = 0) -> dict[str, object]:
    """Teacher-forced metrics of `loaded` (checkpoint.LoadedModel) over a StreamDataset, per threshold."""
    fmt = dataset.fmt
    pooled = {t: StreamScores() for t in thresholds}
    per_task: dict[str, dict[float, StreamScores]] = {}
    count = len(dataset) if not limit else min(limit, len(dataset))
    device = loaded.model.device
    width = loaded.model.frame_width  # D of the raw frame tokens the model takes (it derives frame_delta's)
    for index in range(count):
        sample = dataset[index]
        task = dataset.dialogues[index].task or "all"
        frame_tokens = sample.frame_tokens.to(device) if sample.frame_tokens is not None else None
        if frame_tokens is not None and frame_tokens.shape[-1] != width:
            raise ValueError(f"dialogue {sample.id!r}: its frame tokens are {frame_tokens.shape[-1]} wide, the model "
                             f"takes {width} (model.mean_rgb={loaded.model_config.mean_rgb}, hue_bins="
                             f"{loaded.model_config.hue_bins}, change_hues={loaded.model_config.change_hues}, "
                             f"frame_delta={loaded.model_config.frame_delta}); give "
                             "--features a "
                             "cache encoded as the model was trained, or leave it out to encode the videos")
        with torch.no_grad():
            logits, _, _ = loaded.model(sample.input_ids[None].to(device), frame_tokens)
        for threshold in thresholds:
            scores = stream_scores(logits[0].float().cpu(), sample.labels.tolist(), sample.frame_ends, fmt.separator_id,
                                   fmt.eos_id, dataset.dialogues[index].fps, threshold)
            pooled[threshold].extend(scores)
            per_task.setdefault(task, {t: StreamScores() for t in thresholds})[threshold].extend(scores)
    main = thresholds[0]
    result: dict[str, object] = dict(pooled[main].summary(main))
    result["within_1s"] = share_within(pooled[main].time_diff_s, 1.0)
    result["dialogues"] = count
    result["by_threshold"] = {str(t): pooled[t].summary(t) | {"within_1s": share_within(pooled[t].time_diff_s, 1.0)}
                              for t in thresholds}
    result["by_task"] = {task: scores[main].summary(main) | {"within_1s": share_within(scores[main].time_diff_s, 1.0)}
                         for task, scores in sorted(per_task.items())}
    return result


def choose_threshold(by_threshold: dict[str, dict[str, float]]) -> float:
    """The θ under which most timed turns are spoken within 1 s of their frame; ties go to the lower
    TimeDiff, then to the θ nearest the engine's default.

    Why the 1-s share first: it counts turns that are on time, which is what a viewer notices, and it is
    not swayed by a few very late turns (a reminder missed by 20 s), which dominate the mean TimeDiff and
    made it pick an over-talkative θ on the default model's validation split.
    """
    from livevlm.config import EngineConfig

    timed = {float(t): m for t, m in by_threshold.items() if not math.isnan(m["time_diff_s"])}
    if not timed:
        raise ValueError("no timed turns in --data: TimeDiff is undefined, so no threshold can be chosen")
    return min(timed, key=lambda t: (-round(timed[t]["within_1s"], 9), round(timed[t]["time_diff_s"], 9),
                                     abs(t - EngineConfig().threshold)))


def sweep_edge_warning(chosen: float, thresholds: list[float]) -> str | None:
    """What to say when the chosen θ is the highest or lowest of a sweep: a θ past it, not swept, may be
    better still (so widen the sweep); None when it lies inside."""
    if len(set(thresholds)) < 2 or min(thresholds) < chosen < max(thresholds):
        return None
    side = "highest" if chosen == max(thresholds) else "lowest"
    return (f"the chosen θ = {chosen} is the {side} of the swept values {sorted(set(thresholds))}: a θ beyond it "
            "may time the turns better still; sweep past it with more --threshold values")


def share_within(diffs: list[float], seconds: float) -> float:
    """The share of TimeDiffs of at most `seconds` (nan when there are none)."""
    return sum(d <= seconds + 1e-9 for d in diffs) / len(diffs) if diffs else math.nan


def json_ready(value: object) -> object:
    """`value` with every NaN or infinite float, at any depth, made None, for strict JSON: Python writes NaN,
    which `jq`, JavaScript and most JSON parsers reject. A metric is NaN where nothing was there to measure
    (a TimeDiff over a slice with no timed turns), so null says it as JSON does."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: json_ready(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_ready(item) for item in value]
    return value
