"""`livevlm train`: HF Trainer on the streaming objective, resumable checkpoints, a livevlm checkpoint out.

Why HF Trainer and not a hand-written loop: it already does AdamW, cosine-with-warm-up, gradient
accumulation, mixed precision, periodic evaluation, a progress bar, DDP / DeepSpeed / FSDP through
accelerate, and checkpoints that resume exactly (optimizer, scheduler, RNG states, data position).
livevlm adds only what is its own:

* `StreamTrainer.compute_loss`: the LIVE loss of `LiveModel`, normalised by the labelled tokens of the
  whole accumulated (and, with several processes, gathered) batch, so batch 64 means the same loss
  whatever its split into per-device batch × accumulation × devices;
* Trainer checkpoints (`output_dir/checkpoint-N/`) hold only the *trainable* weights (LoRA + connector,
  or the whole LLM for full fine-tuning) next to the optimizer/scheduler/RNG states: a few MB for LoRA;
* after every checkpoint and at the end, the livevlm checkpoint `output_dir/model/` (`save_checkpoint`,
  written atomically, so a full disk leaves the previous one intact) — that folder is what
  `livevlm stream` / `evaluate` load;
* `output_dir/metrics.jsonl`: one JSON line per logging step (step, epoch, loss, lr, grad_norm) and per
  evaluation (eval_loss); cut back to the checkpoint's step on resume, so it always tells one run;
* resume: `--resume auto` (default) continues from the newest *complete* checkpoint in output_dir (one
  whose trainer_state.json, written last, parses), so rerunning the killed command just continues.

How Trainer is extended: through its public hooks (`compute_loss`, `create_optimizer`, and the callbacks
`LiveCheckpointExport` and `JsonlMetrics`) wherever one exists; two private methods are overridden, `_save`
and `_load_from_checkpoint`, because no public hook chooses which weights a Trainer checkpoint holds (see
`StreamTrainer._save`). A transformers upgrade that renames them fails the resume tests, not a user's run.

Several GPUs: `accelerate launch --config_file recipes/accelerate/{fsdp,deepspeed_zero2,deepspeed_zero3}.yaml
-m livevlm.cli train RECIPE.yaml` (see those files). Under FSDP / ZeRO-3 the weights are sharded, so
the livevlm checkpoint is written only at the end, from the gathered trainable weights.
"""

from __future__ import annotations

import errno
import json
import logging
import os
from functools import partial
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch.utils.data import ConcatDataset, Dataset, Subset
from transformers import Trainer, TrainerCallback, TrainingArguments

from livevlm.checkpoint import CONFIG_NAME, CheckpointError, load_trained_weights, save_checkpoint
from livevlm.config import ConfigError, ModelConfig, Recipe, TrainConfig, load_yaml, save_recipe, to_dict
from livevlm.data.dataset import StreamDataset, collate_streams
from livevlm.data.features import feature_file
from livevlm.files import write_text_atomically
from livevlm.model import LiveModel, build_live_model
from livevlm.official import is_official_folder, resolve_model_ref, use_eot_as_eos
from livevlm.stream_format import IGNORE, StreamFormat, register_placeholder

log = logging.getLogger(__name__)

LIVE_CHECKPOINT_DIR = "model"  # the livevlm checkpoint inside output_dir
METRICS_FILE = "metrics.jsonl"
RECIPE_FILE = "recipe.yaml"
TRAINABLE_FILE = "model.safetensors"  # Trainer's own weights file name; here: trainable weights only
TRAINER_STATE_FILE = "trainer_state.json"  # written last into a Trainer checkpoint: marks it complete


def train(recipe: Recipe, resume: str = "auto", callbacks: list[TrainerCallback] | None = None,
          keep_checkpoints: int = 2) -> Path:
    """Train the model a recipe describes and write its livevlm checkpoint.

    Args:
        recipe: model (LLM folder, finetuning), format and train sections; `train.data` and
            `train.features` name the dialogue JSONL and the feature cache.
        resume: "auto" (newest complete checkpoint in `train.output_dir`, if any), "never", or a
            `checkpoint-N` folder.
        callbacks: extra `TrainerCallback`s (progress hooks, tests).
        keep_checkpoints: how many Trainer checkpoints to keep.

    Returns:
        The livevlm checkpoint folder (`train.output_dir/model`).

    Raises:
        ConfigError: a train setting is unusable (no data file, bad warm-up ratio).
        MissingFeaturesError: dialogues whose videos are not in the feature cache (listing them).
        FileNotFoundError: `resume` names a folder that is not a complete checkpoint.
        OSError: the disk filled while writing a checkpoint (the previous one is intact).
    """
    cfg = recipe.train
    _check_train_config(cfg)
    output_dir = Path(cfg.output_dir)
    checkpoint = resolve_resume(resume, output_dir)
    init_from = None  # a resumed run gets every weight from its checkpoint
    if cfg.init_from and not checkpoint:
        init_from = resolve_model_ref(cfg.init_from, "train.init_from")  # a hub id: the official checkpoint
        if not (init_from / CONFIG_NAME).is_file() and not is_official_folder(init_from):  # before data and model
            raise ConfigError(f"train.init_from: {cfg.init_from} is not a livevlm checkpoint (no {CONFIG_NAME}) nor "
                              "the paper's released one (adapter_config.json); train that model first (a recipe that "
                              "starts from another names it in its header), or set train.init_from='' to start from "
                              "fresh weights")
    torch.manual_seed(cfg.seed)  # the connector and LoRA initialisation
    tokenizer = _load_tokenizer(recipe.model.llm)
    if init_from is not None and is_official_folder(init_from):
        use_eot_as_eos(tokenizer, recipe.model.llm)  # the official model ends its turns with <|eot_id|>
    placeholder_id = register_placeholder(tokenizer, recipe.format.placeholder)
    fmt = StreamFormat(tokenizer, recipe.format, recipe.model.tokens_per_frame)
    train_set, vision_dim = training_set(cfg, fmt, recipe.model)
    eval_set = StreamDataset(cfg.eval_data, fmt, cfg.features or None,
                             max_frames=cfg.max_frames) if cfg.eval_data else None
    model = build_model(recipe.model, vision_dim, placeholder_id, cfg.gradient_checkpointing)
    if init_from is not None:
        load_trained_weights(model, init_from, recipe.model)
        log.info("starting from the weights of %s", init_from)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    trainer = StreamTrainer(
        model=model, args=training_arguments(cfg, keep_checkpoints), train_dataset=train_set,
        eval_dataset=eval_set, data_collator=partial(collate_streams, pad_id=pad_id,
                                                          frame_targets=cfg.stream_loss_weight != 0),
        callbacks=[JsonlMetrics(output_dir / METRICS_FILE), *(callbacks or [])],
        recipe=recipe, tokenizer=tokenizer)
    if checkpoint and (changed := changed_settings(recipe, output_dir / RECIPE_FILE)):
        log.warning("resuming %s with a changed recipe (%s): the run is no longer one reproducible recipe",
                    checkpoint, ", ".join(changed))
    if trainer.args.should_save:
        truncate_metrics(output_dir / METRICS_FILE, _checkpoint_step(checkpoint) if checkpoint else 0)
        output_dir.mkdir(parents=True, exist_ok=True)
        save_recipe(recipe, output_dir / RECIPE_FILE)
    if checkpoint:
        log.info("resuming from %s", checkpoint)
    trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    return trainer.save_live_checkpoint(final=True)


# ---------------------------------------------------------------------------------------------------
# building blocks


def _check_train_config(cfg: TrainConfig) -> None:
    if not cfg.data:
        raise ConfigError("train.data is empty: name the dialogue JSONL to train on (train.data=PATH)")
    if not Path(cfg.data).is_file():
        raise ConfigError(f"train.data: {cfg.data} does not exist (make one with `livevlm data convert`)")
    for i, mixed in enumerate(cfg.mix):
        if not mixed.data or not Path(mixed.data).is_file():
            raise ConfigError(f"train.mix[{i}].data: {mixed.data!r} is not a dialogue file (make one with "
                              "`livevlm data convert`)")
        if not mixed.features:
            raise ConfigError(f"train.mix[{i}].features is empty: name its feature cache (`livevlm data encode`)")
    if cfg.eval_data and not Path(cfg.eval_data).is_file():
        raise ConfigError(f"train.eval_data: {cfg.eval_data} does not exist")
    if not 0.0 <= cfg.warmup_ratio < 1.0:
        raise ConfigError(f"train.warmup_ratio must be in [0, 1), got {cfg.warmup_ratio}")
    if cfg.save_steps <= 0 or cfg.log_steps <= 0:
        raise ConfigError(f"train.save_steps and train.log_steps must be positive, got {cfg.save_steps}, "
                          f"{cfg.log_steps}")


def _load_tokenizer(llm: str):
    from transformers import AutoTokenizer

    from livevlm.default_model import resolve_llm

    return AutoTokenizer.from_pretrained(resolve_llm(llm))


def training_set(cfg: TrainConfig, fmt: StreamFormat, config: ModelConfig) -> tuple[Dataset, int]:
    """`train.data` and every `train.mix` file as one dataset, which the Trainer shuffles as one, and the width D
    of the frame tokens they share.

    A mixed file's `count` dialogues are drawn once, with `train.seed`, so a resumed run trains on the same ones.

    Raises:
        MissingFeaturesError: a file's dialogues whose videos are not in its feature cache.
        ConfigError: a cache encoded with other options than the model takes, or a `count` above the file's size.
    """
    main = StreamDataset(cfg.data, fmt, cfg.features or None, max_frames=cfg.max_frames)
    width = feature_dim(main, config)
    parts: list[Dataset] = [main]
    for i, mixed in enumerate(cfg.mix):
        part = StreamDataset(mixed.data, fmt, mixed.features, max_frames=cfg.max_frames)
        feature_dim(part, config)  # its cache must carry the same channels as the model takes
        if mixed.count > len(part):
            raise ConfigError(f"train.mix[{i}].count={mixed.count} but {mixed.data} holds {len(part)} dialogues")
        if mixed.count:
            drawn = torch.randperm(len(part), generator=torch.Generator().manual_seed(cfg.seed))[:mixed.count]
            part = Subset(part, sorted(drawn.tolist()))
        parts.append(part)
    return (main if len(parts) == 1 else ConcatDataset(parts)), width


def feature_dim(dataset: StreamDataset, config: ModelConfig) -> int:
    """Width D of the frame tokens `[T, N, D]` the model takes: the cached width, read from the first
    dialogue's cache file header, twice that with `frame_delta`.

    Raises:
        ConfigError: the cache was encoded with another `mean_rgb`, `hue_bins` or `change_hues` than `config` asks
            for.
    """
    dialogue = dataset.dialogues[0]
    file = feature_file(dialogue, dataset.root, dataset.cache_dir)
    if file is None:  # StreamDataset has already checked the cache; this is an encoder-only dataset
        raise ConfigError("train.features: training reads cached features; run `livevlm data encode` first")
    with safe_open(str(file), framework="pt") as handle:
        metadata = handle.metadata() or {}
        cached_inputs = {"mean_rgb": metadata.get("mean_rgb", "False") == "True",  # what `data encode` wrote
                         "hue_bins": int(metadata.get("hue_bins", "0")),
                         "change_hues": metadata.get("change_hues", "False") == "True"}
        for name, cached_value in cached_inputs.items():
            wanted = getattr(config, name)
            if cached_value != wanted:
                option = (f"--hue-bins {wanted}" if name == "hue_bins"
                          else f"--{'' if wanted else 'no-'}{name.replace('_', '-')}")
                raise ConfigError(f"model.{name}={wanted} but {file} was encoded with {name}={cached_value}; "
                                  f"re-encode with `livevlm data encode … {option}` into another folder, or set "
                                  f"model.{name} to match")
        cached = int(handle.get_slice("tokens").get_shape()[-1])
    return 2 * cached if config.frame_delta else cached


def build_model(config: ModelConfig, vision_dim: int, placeholder_id: int,
                gradient_checkpointing: bool = False) -> LiveModel:
    """Load the base LLM (`config.llm`, in `config.dtype`) and wrap it as a trainable LiveModel."""
    from transformers import AutoModelForCausalLM

    from livevlm.default_model import resolve_llm

    llm = AutoModelForCausalLM.from_pretrained(resolve_llm(config.llm), dtype=getattr(torch, config.dtype))
    llm.config.use_cache = False  # no KV cache while training
    if gradient_checkpointing:
        # Non-reentrant checkpointing needs no input that requires grad (LoRA / frozen embeddings).
        llm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return build_live_model(config, llm, vision_dim, placeholder_id)


def bf16_supported() -> bool:
    """Whether this machine runs bf16 matmuls natively (CUDA with bf16, or a CPU whose oneDNN has bf16)."""
    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def training_arguments(cfg: TrainConfig, keep_checkpoints: int = 2) -> TrainingArguments:
    """Map the recipe's train section onto HF `TrainingArguments`."""
    from transformers.integrations import is_tensorboard_available

    bf16 = cfg.bf16 and bf16_supported()
    if cfg.bf16 and not bf16:
        log.warning("train.bf16 is set but this machine has no bf16 support: training in float32")
    evaluate = bool(cfg.eval_data)
    return TrainingArguments(
        output_dir=cfg.output_dir, seed=cfg.seed, data_seed=cfg.seed,
        per_device_train_batch_size=cfg.batch_size, per_device_eval_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.grad_accum, learning_rate=cfg.lr, weight_decay=cfg.weight_decay,
        lr_scheduler_type="cosine", warmup_steps=cfg.warmup_ratio,  # a float < 1 is a ratio of all steps
        num_train_epochs=cfg.epochs, max_steps=cfg.max_steps if cfg.max_steps > 0 else -1, bf16=bf16,
        logging_steps=cfg.log_steps, save_strategy="steps", save_steps=cfg.save_steps,
        save_total_limit=keep_checkpoints,
        eval_strategy=("steps" if cfg.eval_steps > 0 else "epoch") if evaluate else "no",
        eval_steps=cfg.eval_steps if cfg.eval_steps > 0 else None,
        report_to=["tensorboard"] if is_tensorboard_available() else "none",
        remove_unused_columns=False,  # the collator's keys are LiveModel.forward's arguments
        label_names=["labels"], prediction_loss_only=True, dataloader_num_workers=0,
        dataloader_pin_memory=torch.cuda.is_available(), use_cpu=not torch.cuda.is_available(),
        ddp_find_unused_parameters=False,  # every trainable weight (connector, LoRA) is used each step
    )


# ---------------------------------------------------------------------------------------------------
# the Trainer


class StreamTrainer(Trainer):
    """HF Trainer for LiveModel: streaming loss, trainable-only checkpoints, livevlm checkpoint export.

    Args (besides Trainer's): recipe (its model/format sections go into the livevlm checkpoint, its
    `train.stream_loss_weight` into the loss) and the tokenizer with the placeholder registered.
    """

    # compute_loss normalises by the labelled tokens of the whole accumulated batch itself.
    loss_is_scaled_for_ga = True

    def __init__(self, *args: Any, recipe: Recipe, tokenizer: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.recipe = recipe
        self.tokenizer = tokenizer
        # Makes Trainer count the labelled tokens of each accumulated batch (`num_items_in_batch`).
        self.model_accepts_loss_kwargs = True
        self.trainable_names = {n for n, p in self.model.named_parameters() if p.requires_grad}
        self._live_saved_step = -1  # the step of the last livevlm checkpoint written
        self.add_callback(LiveCheckpointExport(self))

    @property
    def sharded(self) -> bool:
        """True when every process holds only a shard of the weights (FSDP, DeepSpeed ZeRO-3)."""
        if self.is_fsdp_enabled:
            return True
        return self.is_deepspeed_enabled and \
            self.accelerator.state.deepspeed_plugin.deepspeed_config.get("zero_optimization", {}).get("stage") == 3

    def create_optimizer(self, model: torch.nn.Module | None = None):
        """Trainer's optimizer, with the connector in a parameter group of its own at `train.connector_lr`
        (the schedule scales both groups alike). A new input of the connector (colour, a new tower) can need
        a larger step than the LoRA it feeds."""
        connector_lr = self.recipe.train.connector_lr
        if connector_lr and self.is_deepspeed_enabled:
            log.warning("train.connector_lr is not applied under DeepSpeed (its config builds the optimizer): "
                        "the connector trains at train.lr")
        if not connector_lr or self.optimizer is not None or self.is_deepspeed_enabled:
            return super().create_optimizer()
        decay = set(self.get_decay_parameter_names(self.model))
        groups = []
        for is_connector in (False, True):
            for decays in (True, False):
                params = [p for n, p in self.model.named_parameters() if p.requires_grad and (n in decay) == decays
                          and n.startswith("connector.") == is_connector]
                if params:
                    groups.append({"params": params, "weight_decay": self.args.weight_decay if decays else 0.0,
                                   **({"lr": connector_lr} if is_connector else {})})
        optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, self.model)
        self.optimizer = optimizer_cls(groups, **optimizer_kwargs)
        return self.optimizer

    def compute_loss(self, model: torch.nn.Module, inputs: dict[str, torch.Tensor], return_outputs: bool = False,
                     num_items_in_batch: torch.Tensor | int | None = None):
        """Σ wⱼ·CEⱼ over this micro-batch / labelled tokens of the whole optimizer step's batch.

        `LiveModel` returns the loss normalised by this micro-batch's labelled tokens; rescaling by
        (this batch's count / `num_items_in_batch`) turns the sum over micro-batches into the loss of the
        whole batch. Under DDP gradients are averaged over processes, hence × num_processes when
        `num_items_in_batch` was gathered over them.
        """
        # Logits only where a target is: the vocabulary projection of every position is wasted work.
        logits, loss, _ = model(**inputs, stream_loss_weight=self.recipe.train.stream_loss_weight,
                                key_frame_weight=self.recipe.train.key_frame_weight, labelled_logits_only=True)
        if num_items_in_batch is not None:
            labelled = (inputs["labels"] != IGNORE).sum()
            loss = loss * labelled / num_items_in_batch
            if self.args.average_tokens_across_devices:
                loss = loss * self.accelerator.num_processes
        return (loss, {"logits": logits}) if return_outputs else loss

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        """Write only the trainable weights (the base LLM is named in the recipe and never changes).

        One of the two private Trainer methods overridden here (with `_load_from_checkpoint`), because Trainer
        has no public hook that chooses *which* weights a checkpoint holds: `save_model` is public but is only
        the non-sharded entry, while `_save` is where every path (plain, DDP, gathered FSDP/ZeRO state) writes
        the weights. Both are pinned by tests (`test_train.py`: exact resume, trainable-only files)."""
        output_dir = output_dir or self.args.output_dir
        if state_dict is None:
            state_dict = self.accelerator.unwrap_model(self.model).state_dict()
        if not self.args.should_save:
            return
        trainable = {k: v.detach().cpu().contiguous() for k, v in state_dict.items() if k in self.trainable_names}
        os.makedirs(output_dir, exist_ok=True)
        save_file(trainable, os.path.join(output_dir, TRAINABLE_FILE), metadata={"format": "pt"})
        torch.save(self.args, os.path.join(output_dir, "training_args.bin"))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: torch.nn.Module | None = None) -> None:
        """Load the trainable weights saved by `_save`, checking they are exactly this model's."""
        file = Path(resume_from_checkpoint) / TRAINABLE_FILE
        if self.is_fsdp_enabled or self.is_deepspeed_enabled or not file.is_file():
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        state = load_file(str(file))
        missing, unexpected = self.trainable_names - set(state), set(state) - self.trainable_names
        if missing or unexpected:
            raise CheckpointError(
                f"{file} does not fit this recipe's model: missing {sorted(missing)[:3]}, unexpected "
                f"{sorted(unexpected)[:3]}; resume with the recipe it was trained with, or --resume never")
        (model or self.model).load_state_dict(state, strict=False)

    def save_live_checkpoint(self, final: bool = False) -> Path:
        """Write `output_dir/model` (atomic: a failed write leaves the previous one intact).

        Raises:
            OSError: the write failed (e.g. a full disk); the message names the intact previous folder.
        """
        folder = Path(self.args.output_dir) / LIVE_CHECKPOINT_DIR
        if self._live_saved_step == self.state.global_step:  # the last Trainer checkpoint already wrote it
            return folder
        model = self.accelerator.unwrap_model(self.model)
        if self.sharded:
            if not final:
                return folder
            model = self._gathered_copy()
        if not self.args.should_save or model is None:
            return folder
        try:
            save_checkpoint(model, self.tokenizer, self.recipe.model, self.recipe.format, folder)
        except OSError as exc:
            kept = "the previous one there is intact" if folder.exists() else "nothing was written"
            raise OSError(exc.errno or errno.EIO, f"could not write the livevlm checkpoint {folder} "
                          f"({exc.strerror or exc}); {kept}; free space and rerun the same command to "
                          "resume from the last Trainer checkpoint") from exc
        self._live_saved_step = self.state.global_step
        log.info("livevlm checkpoint at step %d: %s", self.state.global_step, folder)
        return folder

    def _gathered_copy(self) -> LiveModel | None:
        """Sharded engines: gather the full state (collective), rebuild the model on CPU on the main process."""
        state = self.accelerator.get_state_dict(self.model_wrapped)
        if not self.args.should_save:
            return None
        copy = build_model(self.recipe.model, self.model.connector.fc1.in_features, self.model.placeholder_id)
        copy.load_state_dict({k: v for k, v in state.items() if k in self.trainable_names}, strict=False)
        return copy


class LiveCheckpointExport(TrainerCallback):
    """After every Trainer checkpoint, the livevlm checkpoint `output_dir/model` too (through the public
    `on_save` hook, which Trainer calls once the checkpoint folder is complete). Sharded weights (FSDP,
    ZeRO-3) are gathered only once, at the end (`save_live_checkpoint(final=True)`)."""

    def __init__(self, trainer: StreamTrainer) -> None:
        self.trainer = trainer

    def on_save(self, args: TrainingArguments, state: Any, control: Any, **kwargs: Any) -> None:
        if not self.trainer.sharded:
            self.trainer.save_live_checkpoint()


# ---------------------------------------------------------------------------------------------------
# metrics log and resume


class JsonlMetrics(TrainerCallback):
    """Appends one JSON object per Trainer log event to `path` (main process only).

    Training lines: step, epoch, loss, lr, grad_norm; evaluation lines: step, epoch, eval_loss; the final
    summary line carries Trainer's train_* figures.
    """

    RENAME = {"learning_rate": "lr"}

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    def on_log(self, args: TrainingArguments, state: Any, control: Any, logs: dict | None = None,
               **kwargs: Any) -> None:
        if not state.is_world_process_zero or not logs:
            return
        record = {"step": state.global_step, "epoch": state.epoch}
        record.update({self.RENAME.get(k, k): v for k, v in logs.items() if k != "epoch"})
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a") as handle:
            handle.write(json.dumps(record) + "\n")


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl file, in order."""
    path = Path(path)
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def truncate_metrics(path: Path, step: int) -> None:
    """Keep the records up to `step` (those a resumed run will not log again); atomic rewrite."""
    if not path.is_file():
        return
    kept = [r for r in read_metrics(path) if r.get("step", 0) <= step]
    write_text_atomically(path, "".join(json.dumps(r) + "\n" for r in kept))


def changed_settings(recipe: Recipe, saved: Path) -> list[str]:
    """The `section.key`s whose value differs from the recipe saved at `saved` (empty if none is saved)."""
    if not saved.is_file():
        return []
    old = load_yaml(saved.read_text(), saved) or {}
    new = to_dict(recipe)
    return [f"{section}.{key}" for section, values in new.items() for key, value in values.items()
            if (old.get(section) or {}).get(key, value) != value]


def _checkpoint_step(folder: Path) -> int:
    return int(json.loads((folder / TRAINER_STATE_FILE).read_text())["global_step"])


def _is_complete(folder: Path) -> bool:
    """Trainer writes trainer_state.json after the weights, optimizer, scheduler and RNG states (any engine)."""
    try:
        _checkpoint_step(folder)
    except (OSError, ValueError, KeyError):
        return False
    return True


def latest_checkpoint(output_dir: Path) -> Path | None:
    """The newest complete `checkpoint-N` in `output_dir` (trainer_state.json is written last), or None."""
    found = []
    for folder in Path(output_dir).glob("checkpoint-*"):
        suffix = folder.name.removeprefix("checkpoint-")
        if suffix.isdigit():
            if _is_complete(folder):
                found.append((int(suffix), folder))
            else:
                log.warning("ignoring incomplete checkpoint %s (interrupted while writing)", folder)
    return max(found)[1] if found else None


def resolve_resume(resume: str, output_dir: Path) -> Path | None:
    """"auto" → the newest complete checkpoint (or None); "never" → None; else that checkpoint folder.

    Raises:
        FileNotFoundError: `resume` names a folder that is not a complete Trainer checkpoint.
    """
    if resume == "never":
        if any(Path(output_dir).glob("checkpoint-*")):
            log.warning("%s holds checkpoints of an earlier run; this run's will mix with them (a later "
                        "--resume auto picks the highest step): prefer a fresh train.output_dir", output_dir)
        return None
    if resume == "auto":
        return latest_checkpoint(output_dir)
    folder = Path(resume)
    if not _is_complete(folder):
        raise FileNotFoundError(f"--resume {resume}: not a complete training checkpoint (a checkpoint-N folder "
                                f"with a readable {TRAINER_STATE_FILE}); use auto or never")
    return folder
