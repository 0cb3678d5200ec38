"""The Python API: load a model once, then stream sources through it or evaluate it.

    import livevlm

    model = livevlm.load("default")                    # or a checkpoint folder, or the paper's model
    stream = model.stream("video.mp4", queries=[(0.0, "Please narrate the video in real time.")])
    for event in stream:                               # Frame/Query/Token/Response/NoteEvent, in stream order
        if isinstance(event, livevlm.ResponseEvent):
            show(event.time_s, event.text)        # your own display
    summary = stream.summary                          # frames, fps, lag, responses

The `livevlm` command is built on these calls. They print nothing, change no process-wide setting
(`livevlm.runtime` has those, for programs that want them) and raise typed errors that name the bad input:
`VideoError` (a source), `CheckpointError` / `DefaultModelError` (a model), `ConfigError` (an option),
`DialogueError` (a data file).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from livevlm.checkpoint import LoadedModel, load_checkpoint, resolve_threshold
from livevlm.config import DecodeMode, EngineConfig, Query, check_queries, check_threshold
from livevlm.devices import resolve_device, resolve_dtype
from livevlm.engine.pipeline import StreamPipeline, StreamSummary
from livevlm.engine.session import Event, StreamSession
from livevlm.official import resolve_model_ref
from livevlm.stream_format import StreamFormat

if TYPE_CHECKING:
    from livevlm.evaluation.judge import Judge
    from livevlm.vision import FrameEncoder

# Tokens a greedy eager response guesses from the stream and checks in one forward (EngineConfig.prompt_lookup):
# the default model's narration reuses its sentences: on 3 held-out videos (248 response tokens) guesses of 3,
# 6 and 10 took 233, 226 and 223 LLM forwards in all (frames included) against 311 token by token, the same
# responses; a longer guess costs more per forward.
PROMPT_LOOKUP = 6


class Stream:
    """One run of a source through a model. Iterate it for the events, once; `ask` adds a query from any
    thread while it runs; `summary` is set when the iteration ends.

    The pipeline behind it overlaps decoding, frame encoding and the LLM on threads with bounded queues
    that block (a file is never dropped from); breaking out of the loop or `close()` stops every thread.
    """

    def __init__(self, pipeline: StreamPipeline, threshold: float) -> None:
        self._pipeline = pipeline
        self.threshold = threshold  # the θ this stream runs with

    def __iter__(self) -> Iterator[Event]:
        return self._pipeline.events()

    def ask(self, text: str, time_s: float | None = None) -> None:
        """Queue a user query (None = now); it enters before the next frame and is answered at once."""
        self._pipeline.ask(text, time_s)

    def close(self) -> None:
        self._pipeline.close()

    @property
    def summary(self) -> StreamSummary | None:
        """Frames, FPS, lag and responses of the finished run (None while it runs)."""
        return self._pipeline.summary


@dataclass
class LiveVLM:
    """A loaded model with all a stream needs: the LiveModel, its tokenizer's stream format, its frame
    encoder, and the θ it recommends (chosen on a validation split when it was trained)."""

    loaded: LoadedModel
    fmt: StreamFormat
    _encoder: FrameEncoder | None = None

    @property
    def model(self):
        return self.loaded.model

    @property
    def encoder(self) -> FrameEncoder:
        """The frame encoder the model was trained with, loaded on first use (evaluating on cached features
        never needs it)."""
        if self._encoder is None:
            from livevlm.runtime import stage_threads
            from livevlm.vision import model_frame_encoder

            # ONNX Runtime's pool (the default encoder on a CPU) is sized for a stream, where two threads encode
            # at once (the pipeline's encoder thread and its LLM stage when idle): half the cores each
            self._encoder = model_frame_encoder(self.loaded.model_config, device=self.model.device,
                                                dtype=next(self.model.parameters()).dtype, threads=stage_threads())
        return self._encoder

    @property
    def fps(self) -> float:
        """Frames per second of the streams the model was trained on (sources are resampled to it)."""
        return self.loaded.format_config.fps

    @property
    def threshold(self) -> float:
        """The θ used when none is given: the model's recommended one, else the engine's (the paper's 0.725)."""
        return resolve_threshold(None, self.loaded)

    @property
    def runs_on(self) -> str:
        """Device and weight precision, e.g. "cpu float32"."""
        dtype = str(next(self.model.parameters()).dtype).removeprefix("torch.")
        return f"{self.model.device.type} {dtype}"

    def session(self, threshold: float | None = None, max_new_tokens: int = 64, max_frames_per_forward: int = 8,
                realtime: bool = False, system_prompt: str | None = None,
                decode: DecodeMode = "eager", prompt_lookup: int | None = None) -> StreamSession:
        """A fresh engine session (one stream, one state): feed it frame tokens yourself, e.g. from a server.
        `decode`: how response tokens are decoded, `EngineConfig.decode` ("compiled" on a GPU, docs/engine.md);
        `prompt_lookup`: `EngineConfig.prompt_lookup`, None = `PROMPT_LOOKUP` with eager decoding, else 0."""
        config = self.engine_config(threshold, max_new_tokens, max_frames_per_forward, realtime, decode, prompt_lookup)
        return StreamSession(self.model, self.fmt, config, system_prompt=system_prompt)

    def engine_config(self, threshold: float | None = None, max_new_tokens: int = 64, max_frames_per_forward: int = 8,
                      realtime: bool = False, decode: DecodeMode = "eager",
                      prompt_lookup: int | None = None) -> EngineConfig:
        """What `session` gives its session (θ None = `self.threshold`; `prompt_lookup` None = `PROMPT_LOOKUP`
        with eager decoding, 0 with a static step), for sessions made elsewhere (a `SessionBatch` row).
        Raises ConfigError: θ outside [0, 1], an unknown `decode`, prompt lookup with a static step."""
        check_threshold(threshold)
        if prompt_lookup is None:
            prompt_lookup = PROMPT_LOOKUP if decode == "eager" else 0
        return EngineConfig(threshold=resolve_threshold(threshold, self.loaded), max_new_tokens=max_new_tokens,
                            max_frames_per_forward=max_frames_per_forward, realtime=realtime, decode=decode,
                            prompt_lookup=prompt_lookup)

    def stream(self, source: str | int | Path, queries: Iterable[Query] = (), *, threshold: float | None = None,
               realtime: bool = False, max_new_tokens: int = 64, max_frames_per_forward: int = 8,
               system_prompt: str | None = None, open_timeout_s: float = 10.0, decode: DecodeMode = "eager",
               prompt_lookup: int | None = None) -> Stream:
        """Watch `source` and speak when the model decides to.

        Args:
            source: a video file, a camera (index or /dev/videoN) or a URL (rtsp/http/…).
            queries: `(time_s, text)` pairs asked at those stream times.
            threshold: θ, stay silent while P(separator) ≥ θ; None = `self.threshold`.
            realtime: release frames at wall-clock pace (a file played "live"); False: as fast as possible.
            decode: how response tokens are decoded (`EngineConfig.decode`: "eager", "static", "compiled").
            prompt_lookup: tokens guessed from the stream and checked in one forward (`EngineConfig.prompt_lookup`:
                the same responses in fewer forwards); None = `PROMPT_LOOKUP` with eager decoding, 0 = off.
        Returns:
            a `Stream` to iterate. The source is opened here, so a bad one raises now.
        Raises:
            VideoError: the source cannot be opened (the message says why and what to do).
            ConfigError: θ outside [0, 1], a query before 0 s or empty, an unknown `decode`.
        """
        from livevlm.video import read_frames

        checked = check_queries(queries)
        session = self.session(threshold, max_new_tokens, max_frames_per_forward, realtime, system_prompt, decode,
                               prompt_lookup)
        source = str(source) if isinstance(source, Path) else source
        frames = read_frames(source, fps=self.fps, size=self.encoder.image_size, timeout_s=open_timeout_s,
                             resample=self.encoder.resample)
        try:
            pipeline = StreamPipeline(session, self.encoder, frames, realtime=realtime, queries=checked)
        except BaseException:
            frames.close()  # the source is open and its decode thread running: stop it
            raise
        return Stream(pipeline, session.config.threshold)

    def evaluate(self, data: str | Path, features: str | Path | None = None,
                 thresholds: Iterable[float] | None = None, max_frames: int = 1200, limit: int = 0) -> dict[str, Any]:
        """Teacher-forced stream metrics on a dialogue file (see `livevlm.evaluation.stream_eval`).

        Args:
            data: dialogue JSONL (held-out).
            features: a feature cache folder (`livevlm data encode`); None = encode the videos on the fly.
            thresholds: the θs to report, the first at top level; None = the model's, the engine's 0.725 and 0.
        Returns:
            the metrics, overall and per task, as `livevlm evaluate` prints them (strict-JSON-ready with
            `stream_eval.json_ready`).
        """
        from livevlm.data.dataset import StreamDataset
        from livevlm.evaluation.stream_eval import evaluate_stream_model

        asked = [check_threshold(float(threshold)) for threshold in thresholds or []]  # once: any iterable
        chosen = list(dict.fromkeys(asked or [self.threshold, EngineConfig().threshold, 0.0]))
        dataset = StreamDataset(data, self.fmt, cache_dir=features or None,
                                encoder=None if features else self.encoder, max_frames=max_frames)
        return evaluate_stream_model(self.loaded, dataset, chosen, limit)

    def evaluate_free_running(self, data: str | Path, features: str | Path | None = None, *,
                              threshold: float | None = None, tolerance_s: float = 1.0, max_new_tokens: int = 64,
                              max_frames_per_forward: int = 8, max_frames: int = 1200, limit: int = 0,
                              results: str | Path | None = None, progress: bool = False,
                              names: Any = None, judge: Judge | None = None) -> dict[str, Any]:
        """Free-running scores on a dialogue file: each record's clip streamed through the real engine, its queries
        at their times, the model's own responses in its context (see `livevlm.evaluation.free_running`).

        Args:
            threshold: θ; None = `self.threshold`.
            tolerance_s: a response within this many seconds of a ground-truth turn can match it (one to one).
            results: a JSONL file that keeps each finished dialogue's scores: a second run with the same settings
                resumes where the first stopped.
            names: optional `(response, turn) -> bool | None`: whether a matched response names what its turn
                does (reported as `object_named`; the world benchmark's `names_object`).
            judge: a `livevlm.evaluation.judge.Judge` (`make_judge("words")`, `make_judge("openai", base_url=…)`)
                that adds `judge_score` (mean 1–5 over matched responses) and `pauc` (ProactiveVideoQA's PAUC at
                ω 0, 0.5, 1; `livevlm.evaluation.pauc`); None = neither. The caller closes it.
        Returns:
            trigger_precision / recall / f1, time_diff_s, duplicate_ratio, responses, turns, word_f1 (matched
            responses against their turns), answer_word_f1 (answers to queries), overall and under "by_task".
        Raises:
            JudgeError: the judge failed after its retries; what was finished is in `results`, to resume.
        """
        from livevlm.data.dataset import StreamDataset
        from livevlm.evaluation.free_running import evaluate_free_running

        check_threshold(threshold)
        if tolerance_s < 0:
            raise ValueError(f"tolerance_s must be ≥ 0 s, got {tolerance_s}")
        config = EngineConfig(threshold=resolve_threshold(threshold, self.loaded), max_new_tokens=max_new_tokens,
                              max_frames_per_forward=max_frames_per_forward)
        dataset = StreamDataset(data, self.fmt, cache_dir=features or None,
                                encoder=None if features else self.encoder, max_frames=max_frames)
        return evaluate_free_running(self.model, self.fmt, dataset, config, tolerance_s, limit, results, progress,
                                     names=names, judge=judge)

    def evaluate_world(self, videos: int = 20, seed: int = 1, duration: float = 30.0, *,
                       threshold: float | None = None, tolerance_s: float = 1.0, results: str | Path | None = None,
                       progress: bool = False, cache_dir: str | Path | None = None,
                       judge: Judge | None = None) -> dict[str, Any]:
        """The synthetic proactive benchmark (`livevlm.evaluation.world_benchmark`): held-out synthetic-world
        videos (default: the default model's held-out set, seed 1, 20 × 30 s; rendered once into the cache)
        streamed free-running; the scores of `evaluate_free_running` (`judge` as there) plus `object_named`,
        the share of matched responses that name their turn's colours and shapes."""
        from livevlm.evaluation.world_benchmark import names_object, prepare

        data = prepare(videos, seed, duration, cache_dir)
        result = self.evaluate_free_running(data, threshold=threshold, tolerance_s=tolerance_s, results=results,
                                            progress=progress, names=names_object, judge=judge)
        result["benchmark"] = {"name": "world", "videos": videos, "seed": seed, "duration_s": duration}
        return result

    def evaluate_coin(self, kind: str | Iterable[str], data: str | Path, videos: str | Path, *,
                      subset: str = "testing", max_new_tokens: int | None = None, max_frames: int = 1200,
                      limit: int = 0, skip_missing: bool = False, results: str | Path | None = None,
                      progress: bool = False) -> dict[str, Any]:
        """The paper's offline COIN benchmarks (`livevlm.evaluation.coin_benchmark`): top-1 accuracy of the
        model's greedy answers, mapped to the nearest step / task name.

        Args:
            kind: "coin-step", "coin-task", "coin-next", "coin-procedure", "coin-procedure+" (or without "coin-"),
                several of them, or "coin" for all five (each video decoded and encoded once for all).
            data: COIN.json; videos: the folder of its videos (`{youtube_id}.mp4`, or another extension).
            subset: the videos whose subset contains this ("testing": the paper's split).
            max_new_tokens: cap on an answer; None = 128. max_frames: longer clips keep their last frames.
            limit: the first N questions of each kind (0 = all). skip_missing: leave out missing videos.
            results: a JSONL file keeping each answer; a rerun with the same settings resumes.
        Returns:
            accuracy / correct / total / questions per kind under "by_kind" (at top level too for one kind),
            questions, videos, skipped_videos, and "benchmark" (the settings).
        Raises:
            AnnotationError / FileNotFoundError: a malformed COIN.json or a missing video, naming the record.
            ValueError: an unknown kind.
        """
        from livevlm.evaluation.coin_benchmark import (
            COIN_KINDS,
            MAX_NEW_TOKENS,
            build_coin_questions,
            coin_kinds,
            run_coin,
        )

        kinds = coin_kinds(kind if isinstance(kind, str) else list(kind))
        cap = _positive(max_new_tokens, MAX_NEW_TOKENS)
        benchmark = build_coin_questions(data, videos, kinds, subset=subset, fps=self.fps, max_frames=max_frames,
                                         limit=limit, skip_missing=skip_missing)
        result = run_coin(self.model, self.fmt, self.encoder, benchmark, self.fps, max_new_tokens=cap,
                          results=results, progress=progress)
        name = "coin" if set(kinds) == set(COIN_KINDS) else ",".join("coin-" + k for k in kinds)
        result["benchmark"] = {"name": name, "data": str(data), "video_dir": str(videos), "subset": subset,
                               "fps": self.fps, "max_new_tokens": cap, "max_frames": max_frames,
                               "matcher": "levenshtein"}
        return result

    def evaluate_lta(self, data: str | Path, videos: str | Path, *, taxonomy: str | Path | None = None,
                     max_new_tokens: int | None = None, max_frames: int = 1200, limit: int = 0,
                     skip_missing: bool = False, results: str | Path | None = None,
                     progress: bool = False) -> dict[str, Any]:
        """Ego4D long-term action anticipation (`livevlm.evaluation.lta_benchmark`): ED@20 of verbs, nouns and
        actions of the model's greedy answer (one candidate; the challenge allows 5), lower is better.

        Args:
            data: fho_lta_val.json (labelled); videos: the folder of `{video_uid}.mp4` or `{clip_uid}.mp4`.
            taxonomy: fho_lta_taxonomy.json; None = the one next to `data`, else the records' verb/noun names.
            max_new_tokens: cap on an answer; None = 256. Others as `evaluate_coin`.
        Returns:
            verb_ed, noun_ed, action_ed, questions, z, candidates, clips, videos, skipped_clips, vocabulary, and
            "benchmark" (the settings).
        Raises:
            AnnotationError / FileNotFoundError: a malformed file or a missing video, naming the record.
        """
        from livevlm.evaluation.lta_benchmark import MAX_NEW_TOKENS, build_lta_questions, run_lta

        cap = _positive(max_new_tokens, MAX_NEW_TOKENS)
        benchmark = build_lta_questions(data, videos, taxonomy=taxonomy, fps=self.fps, max_frames=max_frames,
                                        limit=limit, skip_missing=skip_missing)
        result = run_lta(self.model, self.fmt, self.encoder, benchmark, self.fps, max_new_tokens=cap,
                         results=results, progress=progress)
        result["benchmark"] = {"name": "ego4d-lta", "data": str(data), "video_dir": str(videos), "fps": self.fps,
                               "max_new_tokens": cap, "max_frames": max_frames}
        return result


def _positive(value: int | None, default: int) -> int:
    """`value`, or `default` when None; a cap on generated tokens must be at least 1."""
    if value is None:
        return default
    if value < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {value}")
    return value


def load(model: str | Path = "default", *, llm: str | None = None, vision: str | None = None, device: str = "auto",
         dtype: str = "auto") -> LiveVLM:
    """Load a livevlm model and its frame encoder.

    Args:
        model: "default" (the shipped model), a livevlm checkpoint folder, or the paper's released checkpoint
            (an official VideoLLM-online adapter folder, or its hub id, e.g. chenjoya/videollm-online-8b-v1plus,
            fetched where a network exists; see `livevlm.official`).
        llm, vision: override the base LLM / vision tower the checkpoint names (a local folder or a hub id); for
            the official checkpoint they default to Meta-Llama-3-8B-Instruct and SigLIP-L/384.
        device: "auto" (the GPU when there is one, else the CPU), "cpu", "cuda", "cuda:1", …
        dtype: "auto" (bfloat16 on a GPU, float32 on the CPU), "float32", "bfloat16", "float16".
    Raises:
        CheckpointError / DefaultModelError: the folder is not a (complete) checkpoint, or a model cannot be found
            (one line naming the file or option and the fix).
        ValueError: an unknown device or dtype.
    """
    torch_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, torch_device)
    folder = resolve_model_ref(model)
    loaded = load_checkpoint(folder, device=torch_device, dtype=torch_dtype, llm=llm or None, vision=vision or None)
    fmt = StreamFormat(loaded.tokenizer, loaded.format_config, loaded.model_config.tokens_per_frame)
    return LiveVLM(loaded, fmt)


def evaluate(model: LiveVLM | str | Path, data: str | Path, *, features: str | Path | None = None,
             thresholds: Iterable[float] | None = None, max_frames: int = 1200, limit: int = 0,
             device: str = "auto", dtype: str = "float32") -> dict[str, Any]:
    """Teacher-forced stream metrics of `model` (loaded, or a name/folder to load) on a dialogue file.

    `dtype` (when loading here) defaults to float32, so that figures compare across machines.
    """
    if not isinstance(model, LiveVLM):
        model = load(model, device=device, dtype=dtype)
    return model.evaluate(data, features, thresholds, max_frames, limit)

