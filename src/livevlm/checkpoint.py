"""Save and load LiveModel checkpoints (safetensors): only what was trained, plus the recipe to rebuild it.

A checkpoint folder holds:
    livevlm.yaml            the model and format sections of the recipe (base LLM, vision tower, layout),
                            and optionally `engine: {threshold: θ}`, the speak threshold chosen for this
                            model on a validation split (`livevlm evaluate --choose-threshold`)
    connector.safetensors   the connector
    adapter_model.safetensors + adapter_config.json   LoRA (peft's own format), when finetune = lora
    llm/                    the whole LLM (HF format), when finetune = full
    tokenizer/              the tokenizer with the placeholder registered (exact ids at inference); a slim
                            checkpoint may leave it out: the base LLM's tokenizer + the placeholder then
The base LLM and vision tower are named in livevlm.yaml ("default" = the packaged backbones), so a LoRA
checkpoint is a few MB.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import warnings
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file, save_file

from livevlm.attention import use_cache_friendly_attention
from livevlm.config import ConfigError, EngineConfig, FormatConfig, ModelConfig, from_dict, load_yaml, to_dict
from livevlm.files import fsync_dir, fsync_tree, write_text_atomically
from livevlm.model import LiveModel
from livevlm.stream_format import register_placeholder
from livevlm.vision import added_channels

log = logging.getLogger(__name__)
CONFIG_NAME = "livevlm.yaml"


class CheckpointError(ValueError):
    """A checkpoint folder is missing or incomplete; the message names the folder and the missing file."""


@dataclass
class LoadedModel:
    model: LiveModel
    tokenizer: object
    model_config: ModelConfig
    format_config: FormatConfig
    threshold: float | None = None  # the speak threshold θ recommended for this model, if it has one


def save_checkpoint(model: LiveModel, tokenizer, model_config: ModelConfig, format_config: FormatConfig,
                    folder: str | Path) -> Path:
    """Write the checkpoint into `folder` atomically: a temporary sibling is renamed over it when complete,
    so a crash (or a full disk) mid-write leaves the previous checkpoint intact."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        sections = {"model": to_dict(model_config), "format": to_dict(format_config)}
        (tmp / CONFIG_NAME).write_text(yaml.safe_dump(sections, sort_keys=False, allow_unicode=True))
        connector = {k: v.detach().cpu().contiguous() for k, v in model.connector.state_dict().items()}
        save_file(connector, str(tmp / "connector.safetensors"))
        if model_config.finetune == "lora":
            # peft: adapter_model.safetensors + adapter_config.json. A LoRA on a tied lm_head makes peft
            # want to save the (frozen) embedding table too: tens of MB for nothing.
            model.llm.save_pretrained(str(tmp), save_embedding_layers=False)
        elif model_config.finetune == "full":
            model.llm.save_pretrained(str(tmp / "llm"))
        tokenizer.save_pretrained(str(tmp / "tokenizer"))
        _replace_dir(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


def _replace_dir(src: Path, dst: Path) -> None:
    """Move `src` to `dst`, replacing it; the old one is removed only after the new one is in place.

    A folder swap, so it cannot go through `files.atomic_path` (a file's `os.replace`): POSIX cannot
    rename a folder over a non-empty one, so the old folder is moved aside first. Between the two renames
    `dst` is briefly missing (never half-written); a crash there leaves the old checkpoint at `.<name>.old-*`.
    """
    fsync_tree(src)  # the files must be on disk before the folder's new name points at them
    old = None
    if dst.exists():
        old = dst.with_name(f".{dst.name}.old-{os.getpid()}")
        dst.rename(old)
    src.rename(dst)
    fsync_dir(dst.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _untie_lm_head(llm) -> None:
    """Give the LM head its own copy of a tied embedding table, so that merging a LoRA on lm_head into it
    cannot also change the input embeddings (SmolLM2 ties them; training never changed them)."""
    head, embeddings = llm.get_output_embeddings(), llm.get_input_embeddings()
    if head is not None and head.weight is embeddings.weight:
        head.weight = torch.nn.Parameter(embeddings.weight.detach().clone(), requires_grad=False)
        llm.config.tie_word_embeddings = False
        if hasattr(llm.config, "get_text_config"):
            llm.config.get_text_config().tie_word_embeddings = False


def _load_connector(folder: Path) -> dict[str, torch.Tensor]:
    """The connector's weights; every checkpoint has them, whatever it fine-tuned."""
    if not (folder / "connector.safetensors").is_file():
        raise CheckpointError(f"checkpoint {folder} is incomplete: connector.safetensors is missing")
    return load_file(str(folder / "connector.safetensors"))


def _read_config(folder: Path) -> dict:
    """The parsed livevlm.yaml of a checkpoint folder; CheckpointError when it is not one."""
    config_file = folder / CONFIG_NAME
    if not folder.is_dir():
        raise CheckpointError(f"{folder} does not exist; give a checkpoint folder (or a hub id owner/name), or omit "
                              "--model for the default model")
    if not config_file.is_file():
        raise CheckpointError(f"{folder} is not a livevlm checkpoint ({CONFIG_NAME} is missing) nor an official "
                              "VideoLLM-online one (adapter_config.json + adapter_model.safetensors); give a folder "
                              "written by `livevlm train` or the paper's released checkpoint, or omit --model for the "
                              "default model")
    try:
        data = load_yaml(config_file.read_text(), config_file) or {}
    except ConfigError as exc:
        raise CheckpointError(str(exc)) from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{config_file} must be a mapping of sections (model, format, engine)")
    return data


def read_checkpoint_config(folder: str | Path) -> tuple[ModelConfig, FormatConfig]:
    return _model_and_format(_read_config(Path(folder)))


def _model_and_format(data: dict) -> tuple[ModelConfig, FormatConfig]:
    return from_dict(ModelConfig, data.get("model", {}), "model."), from_dict(FormatConfig, data.get("format", {}),
                                                                             "format.")


def read_recommended_threshold(folder: str | Path) -> float | None:
    """The speak threshold θ stored in a checkpoint's livevlm.yaml (`engine.threshold`), or None.

    A model's P(separator) is calibrated by its own training data, so the θ that times it best differs
    between models (the paper's 0.725 was chosen for its 8B model). Only the threshold may be stored: the
    other engine settings are the user's, not the model's.
    """
    return _stored_threshold(_read_config(Path(folder)), Path(folder))


def _stored_threshold(data: dict, folder: Path) -> float | None:
    engine = data.get("engine") or {}
    if not isinstance(engine, dict) or set(engine) - {"threshold"}:
        raise CheckpointError(f"{folder / CONFIG_NAME}: the engine section may hold only `threshold`, "
                              f"got {engine!r}")
    if "threshold" not in engine:
        return None
    return from_dict(EngineConfig, engine, "engine.").threshold


def store_recommended_threshold(folder: str | Path, threshold: float) -> Path:
    """Write `engine: {threshold: θ}` into a checkpoint's livevlm.yaml (atomically; other sections kept)."""
    EngineConfig(threshold=threshold)  # range check, naming engine.threshold
    data = _read_config(Path(folder))
    data["engine"] = {"threshold": float(threshold)}
    return write_text_atomically(Path(folder) / CONFIG_NAME, yaml.safe_dump(data, sort_keys=False, allow_unicode=True))


def resolve_threshold(requested: float | None, loaded: LoadedModel) -> float:
    """The θ to run with: the one asked for, else the model's recommended one, else the engine's default
    (the paper's 0.725)."""
    if requested is not None:
        return requested
    return loaded.threshold if loaded.threshold is not None else EngineConfig().threshold


def load_checkpoint(folder: str | Path, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                    trainable: bool = False, merge_lora: bool = True, llm: str | None = None,
                    vision: str | None = None) -> LoadedModel:
    """Rebuild a LiveModel from a checkpoint folder: livevlm's own, or the paper's released (official) format.

    Args:
        folder: a folder written by `save_checkpoint`, or an official VideoLLM-online adapter folder
            (`livevlm.official`, always loaded merged for inference).
        trainable: keep LoRA weights trainable (resuming); otherwise the model is put in eval mode and,
            with `merge_lora`, LoRA is merged into the base weights (faster inference, same outputs).
        llm, vision: override the base LLM / vision tower the checkpoint names (a folder or a hub id).

    Raises:
        CheckpointError: a required file is missing (one line naming the file and the fix).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from livevlm.default_model import resolve_llm
    from livevlm.official import is_official_folder, load_official  # official imports this module

    folder = Path(folder)
    if is_official_folder(folder):
        if trainable:
            raise CheckpointError(f"{folder} is an official VideoLLM-online checkpoint: it loads for inference; to "
                                  "train from it, name it as train.init_from")
        return load_official(folder, llm, vision, device, dtype)
    config = _read_config(folder)
    model_config, format_config = _model_and_format(config)
    model_config = replace(model_config, llm=llm or model_config.llm, vision=vision or model_config.vision)
    threshold = _stored_threshold(config, folder)  # checked before the slow part, like the rest of the config
    connector_state = _load_connector(folder)
    if (folder / "tokenizer").is_dir():
        tokenizer = AutoTokenizer.from_pretrained(str(folder / "tokenizer"))
    else:  # a slim checkpoint (the shipped default model): the base tokenizer + the placeholder
        tokenizer = AutoTokenizer.from_pretrained(resolve_llm(model_config.llm))
        register_placeholder(tokenizer, format_config.placeholder)
    if model_config.finetune == "full":
        llm = AutoModelForCausalLM.from_pretrained(str(folder / "llm"), dtype=dtype)
    else:
        llm = AutoModelForCausalLM.from_pretrained(resolve_llm(model_config.llm), dtype=dtype)
    if model_config.finetune == "lora":
        from peft import PeftModel

        if not (folder / "adapter_config.json").is_file():
            raise CheckpointError(f"checkpoint {folder} says finetune=lora but adapter_config.json is missing")
        if not trainable and merge_lora:
            _untie_lm_head(llm)
        with warnings.catch_warnings():
            # peft warns about LoRA on a tied lm_head (handled by _untie_lm_head) and transformers about a
            # deprecated name peft still calls: noise for someone who just streams a video.
            warnings.filterwarnings("ignore", message=".*tie_word_embeddings.*")
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")
            llm = PeftModel.from_pretrained(llm, str(folder), is_trainable=trainable)
        if not trainable and merge_lora:
            llm = llm.merge_and_unload()
    vision_dim = connector_state["fc1.weight"].shape[1]
    placeholder_id = tokenizer.convert_tokens_to_ids(format_config.placeholder)
    model = LiveModel(llm, vision_dim, placeholder_id, model_config.connector_hidden, model_config.frame_delta,
                      model_config.connector_norm)
    model.connector.load_state_dict(connector_state)
    model.to(device=device, dtype=dtype)
    if not trainable:
        model.eval().requires_grad_(False)
        use_cache_friendly_attention(model.llm)  # the same outputs, without copying the KV cache per frame
    return LoadedModel(model, tokenizer, model_config, format_config, threshold)


# The model settings that decide the shapes and meaning of the trained weights: a checkpoint can start a
# training run only when they agree (dtype and dropout may differ).
WEIGHT_SETTINGS = ("llm", "vision", "frame_size", "pooled_token", "grid", "connector_hidden", "connector_norm",
                   "finetune", "lora_r", "lora_alpha", "lora_targets")


def load_trained_weights(model: LiveModel, folder: str | Path, model_config: ModelConfig) -> None:
    """Copy a checkpoint's trained weights (connector, LoRA or the full LLM) into a freshly built, trainable
    LiveModel: `train.init_from`, to go on training a model (the default one, your own, or the paper's released
    one: `official.load_official_weights`) on new data.

    Raises:
        CheckpointError: the folder is not a complete checkpoint, or its model section differs from
            `model_config` in a setting that shapes the weights (the message lists them).
    """
    from livevlm.official import is_official_folder, load_official_weights  # official imports this module

    folder = Path(folder)
    if is_official_folder(folder):
        return load_official_weights(model, folder, model_config)
    saved, _ = read_checkpoint_config(folder)
    differ = [f"model.{name}: {getattr(saved, name)!r} in the checkpoint, {getattr(model_config, name)!r} here"
              for name in WEIGHT_SETTINGS if getattr(saved, name) != getattr(model_config, name)]
    for name in ("mean_rgb", "frame_delta", "change_hues"):  # inputs can be added to a checkpoint, not taken away
        if getattr(saved, name) and not getattr(model_config, name):
            differ.append(f"model.{name}: True in the checkpoint, False here")
    if saved.hue_bins and saved.hue_bins != model_config.hue_bins:  # hues can be added, not changed or taken away
        differ.append(f"model.hue_bins: {saved.hue_bins} in the checkpoint, {model_config.hue_bins} here")
    if saved.hue_bins and model_config.mean_rgb and not saved.mean_rgb:  # the colours would go before its hues
        differ.append("model.mean_rgb: False in a checkpoint with hue_bins, True here (add both at once or neither)")
    if differ:
        raise CheckpointError(f"train.init_from={folder} was trained with other model settings; set them as "
                              "it has them, or start from scratch: " + "; ".join(differ))
    # Inputs added to a model trained without them (colour, hues, changed hues, frame changes) start unused:
    # `load_connector`. Inputs are only added (checked above), so the new ones are the difference.
    new_channels = (added_channels(model_config.mean_rgb, model_config.hue_bins, model_config.change_hues)
                    - added_channels(saved.mean_rgb, saved.hue_bins, saved.change_hues))
    try:
        model.load_connector(_load_connector(folder), saved.frame_delta, new_channels)
    except ValueError as exc:  # the model's width is the feature cache's
        raise CheckpointError(f"train.init_from={folder}: {exc} (from the feature cache); encode the features as "
                              "it was trained") from None
    if model_config.finetune == "lora":
        from peft import set_peft_model_state_dict

        adapter = folder / "adapter_model.safetensors"
        if not adapter.is_file():
            raise CheckpointError(f"checkpoint {folder} says finetune=lora but {adapter.name} is missing")
        result = set_peft_model_state_dict(model.llm, load_file(str(adapter)))
        if result.unexpected_keys:
            raise CheckpointError(f"{adapter} has weights this model lacks: {result.unexpected_keys[:5]}")
        missing = [key for key in result.missing_keys if "lora_" in key]
        if missing:
            raise CheckpointError(f"{adapter} lacks LoRA weights this model has: {missing[:5]}")
    elif model_config.finetune == "full":
        from transformers import AutoModelForCausalLM

        trained = AutoModelForCausalLM.from_pretrained(str(folder / "llm"), dtype=next(model.llm.parameters()).dtype)
        model.llm.load_state_dict(trained.state_dict())
