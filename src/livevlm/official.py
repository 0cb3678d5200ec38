"""The paper's released checkpoints (VideoLLM-online 8B-v1+, 8B-v1) as livevlm models: recognise, load, check, export.

The official format (a PEFT LoRA adapter written by PEFT 0.10–0.13; no config.json):
    adapter_config.json        base_model_name_or_path "meta-llama/Meta-Llama-3-8B-Instruct", r 128, lora_alpha
                               256, target_modules the regex string OFFICIAL_TARGETS, modules_to_save ["connector"]
    adapter_model.safetensors  (bf16) under "base_model.model.":
        model.layers.{i}.{self_attn.q/k/v/o_proj, mlp.gate/up/down_proj}.lora_{A,B}.weight, lm_head.lora_{A,B}.weight
        lm_head.base_layer.weight      a full copy of the frozen LM head [vocab, hidden]
        connector.{0,2}.{weight,bias}  Linear(1024 → 4096) → GELU (erf) → Linear(4096 → 4096)
The tokenizer is the base LLM's with `<v>` added as a special token (id 128256 = len(tokenizer) − 1, outside the
embedding table: never looked up, its positions take the connector's outputs) and `<|eot_id|>` as eos. Frames:
SigLIP-L/384 (`google/siglip-large-patch16-384`), 2 fps, letterboxed bicubic on black, mean/std 0.5; per frame
the pooled output and the 24×24 patch grid average-pooled to 3×3 (10 tokens; v1: the pooled output only).

Nothing in those files tells v1+ from v1, so the *name* does: a folder (or hub id) whose name ends in "-v1" or
"_v1" (`videollm-online-8b-v1`) has the v1 layout (1 token per frame, no separator: livevlm's `separator=""`),
anything else v1+ ("," between frames). The v1 vision tower is assumed to be SigLIP-L/384 as well (the public
code's `live1` arguments use it with the pooled token only; the paper's unreleased 7B-v1 used CLIP-L/224).

Read top to bottom: what a folder is (`is_official_folder`, `resolve_model_ref`, `fetch`), the adapter read and
checked (`read_adapter`), the base LLM's tokenizer (`load_tokenizer`), GPU memory (`estimate_gpu_bytes`), the
merge (`merge_adapter`) and the loaded model (`load_official`); then training from it (`load_official_weights`)
and the two exports (`export_livevlm`: official → livevlm checkpoint, `export_official`: the way back).
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

import torch
import yaml
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from livevlm.attention import use_cache_friendly_attention
from livevlm.checkpoint import CONFIG_NAME, CheckpointError, LoadedModel, _replace_dir, _untie_lm_head
from livevlm.config import OFFICIAL_LORA_TARGETS, FormatConfig, ModelConfig, to_dict
from livevlm.model import LiveModel
from livevlm.stream_format import StreamFormat, StreamFormatError, register_placeholder

log = logging.getLogger(__name__)

OFFICIAL_LLM = "meta-llama/Meta-Llama-3-8B-Instruct"
OFFICIAL_VISION = "google/siglip-large-patch16-384"
OFFICIAL_TARGETS = "model.*(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)|lm_head$"
OFFICIAL_THRESHOLD = 0.725  # the public demo's θ
FRAME_SIZE = 384
EOT = "<|eot_id|>"  # Llama-3-Instruct's end of a turn: the official model's eos
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PREFIX = "base_model.model."  # PEFT's prefix of every saved key
HEAD_COPY = "lm_head.base_layer.weight"
# The connector's keys: official (an nn.Sequential) ↔ livevlm's `Connector`.
CONNECTOR_KEYS = {"connector.0.weight": "fc1.weight", "connector.0.bias": "fc1.bias",
                  "connector.2.weight": "fc2.weight", "connector.2.bias": "fc2.bias"}
# The adapter_config.json keys PEFT 0.10 writes for a LoRA: the export writes only these, because PEFT
# 0.10–0.13 (the public code's) refuses a config with keys it does not know.
PEFT_010_KEYS = ("alpha_pattern", "auto_mapping", "base_model_name_or_path", "bias", "fan_in_fan_out",
                 "inference_mode", "init_lora_weights", "layer_replication", "layers_pattern", "layers_to_transform",
                 "loftq_config", "lora_alpha", "lora_dropout", "megatron_config", "megatron_core", "modules_to_save",
                 "peft_type", "r", "rank_pattern", "revision", "target_modules", "task_type", "use_dora",
                 "use_rslora")
PEFT_010_DEFAULTS = {"alpha_pattern": {}, "auto_mapping": None, "bias": "none", "fan_in_fan_out": False,
                     "inference_mode": True, "init_lora_weights": True, "layer_replication": None,
                     "layers_pattern": None, "layers_to_transform": None, "loftq_config": {}, "lora_dropout": 0.05,
                     "megatron_config": None, "megatron_core": "megatron.core", "peft_type": "LORA",
                     "rank_pattern": {}, "revision": None, "task_type": "CAUSAL_LM", "use_dora": False,
                     "use_rslora": False}
# What a hub download fetches: configs, safetensors weights and tokenizer files, not Meta's original/ .pth copy.
HUB_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "*.tiktoken"]
GIB = 2**30
WORKING_ROOM = GIB  # activations, a chunk of 128k-vocabulary logits, CUDA's own context

Layout = Literal["v1", "v1+"]


# ---------------------------------------------------------------------------------------------------
# what a folder or a name is


def is_official_folder(folder: str | Path) -> bool:
    """A folder holding a PEFT adapter (adapter_config.json) and no livevlm.yaml: the official format."""
    folder = Path(folder)
    return (folder / ADAPTER_CONFIG).is_file() and not (folder / CONFIG_NAME).is_file()


def looks_like_hub_id(name: str) -> bool:
    """"owner/name" that is not an existing path: a Hugging Face hub id."""
    return not Path(name).exists() and re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", name) is not None


def layout_of(folder: Path) -> Layout:
    """v1 when the checkpoint's name ends in -v1 / _v1 (the folder's, or the hub repository's for a folder in
    the Hugging Face cache: models--chenjoya--videollm-online-8b-v1/snapshots/<hash>); v1+ otherwise."""
    names = [folder.name]
    if folder.parent.name == "snapshots":
        names.append(folder.parent.parent.name)
    return "v1" if any(re.search(r"[-_]v1$", name, re.IGNORECASE) for name in names) else "v1+"


def resolve_model_ref(name: str | Path | None, flag: str = "--model") -> Path:
    """A model name → its folder: "default" → the shipped model; an existing folder → itself; "owner/name" →
    the hub repository, fetched (`fetch`); anything else → the path, unchanged (its loader says what is wrong)."""
    from livevlm.default_model import is_default, resolve_model

    if is_default(name) or not looks_like_hub_id(str(name)):
        return resolve_model(name)
    return fetch(str(name), flag, "model")


def fetch(name: str, flag: str, what: str, named_in: Path | None = None) -> Path:
    """A local folder as it is; a hub id downloaded (or found in the Hugging Face cache) with huggingface_hub.

    Gated repositories (Llama-3) use the user's token as transformers does (`hf auth login` or HF_TOKEN).
    Raises CheckpointError, one line naming `flag` and the fix, when it cannot be had (offline, gated, absent);
    `named_in`: the file that named it, when the user did not.
    """
    path = Path(name).expanduser()
    if path.is_dir():
        return path
    subject = f"the {what} {name} (named in {named_in})" if named_in else f"{flag} {name}"
    if not looks_like_hub_id(name):
        raise CheckpointError(f"{subject}: no such folder; give a local folder of the {what} or a hub id "
                              f"(owner/name) with {flag}")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    try:
        return Path(snapshot_download(name, allow_patterns=HUB_PATTERNS, ignore_patterns=["original/*"]))
    except GatedRepoError:
        raise CheckpointError(f"{subject}: the repository is gated; accept its licence on huggingface.co and log "
                              f"in (`hf auth login` or HF_TOKEN), or pass a local folder with {flag}") from None
    except RepositoryNotFoundError:
        raise CheckpointError(f"{subject}: no such repository on the Hugging Face hub (or it is private); pass a "
                              f"local folder with {flag}") from None
    except Exception as exc:  # offline, no network, a proxy, a full disk: each library raises its own type
        from huggingface_hub import constants

        reason = "HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE else _first_line(exc)
        raise CheckpointError(f"{subject}: no such folder here, and as a hub id it is not in the local Hugging Face "
                              f"cache and cannot be downloaded ({reason}); pass a local folder of the {what} with "
                              f"{flag}") from None


def _first_line(error: BaseException) -> str:
    """The gist of a library's error in one short line: the root cause's first line (huggingface_hub wraps a
    connection error in several lines of advice)."""
    while error.__cause__ is not None or error.__context__ is not None:
        error = error.__cause__ or error.__context__  # type: ignore[assignment]
    text = " ".join(str(error).split()) or type(error).__name__
    return text if len(text) <= 100 else text[:97] + "…"


# ---------------------------------------------------------------------------------------------------
# the adapter, read and checked


@dataclass
class OfficialAdapter:
    """An official checkpoint's adapter, every tensor accounted for (CPU tensors, as stored).

    lora: module name in the LLM ("model.layers.0.self_attn.q_proj", "lm_head") → (A `[r, in]`, B `[out, r]`).
    head: the adapter's copy of the frozen LM head `[vocab, hidden]`, or None.
    connector: livevlm `Connector` names (fc1/fc2) → tensors.
    """

    folder: Path
    config: dict
    lora: dict[str, tuple[torch.Tensor, torch.Tensor]]
    head: torch.Tensor | None
    connector: dict[str, torch.Tensor]
    layout: Layout

    @property
    def r(self) -> int:
        return int(self.config["r"])

    @property
    def alpha(self) -> float:
        return float(self.config["lora_alpha"])

    @property
    def scale(self) -> float:
        """LoRA's merge factor: W += scale·B@A, scale = α/r (α/√r with rsLoRA)."""
        return self.alpha / (math.sqrt(self.r) if self.config.get("use_rslora") else self.r)

    @property
    def base_model(self) -> str:
        return self.config.get("base_model_name_or_path") or OFFICIAL_LLM

    @property
    def vision_width(self) -> int:
        return self.connector["fc1.weight"].shape[1]

    @property
    def connector_hidden(self) -> int:
        return self.connector["fc1.weight"].shape[0]

    @property
    def llm_width(self) -> int:
        return self.connector["fc2.weight"].shape[0]

    @property
    def dtype(self) -> torch.dtype:
        return self.connector["fc1.weight"].dtype

    @property
    def lora_targets(self) -> list[str]:
        """livevlm's `model.lora_targets` for the modules the adapter holds LoRA weights for."""
        return [t for t in OFFICIAL_LORA_TARGETS if any(n == t or n.endswith(f".{t}") for n in self.lora)]

    @property
    def tokens_per_frame(self) -> int:
        return 10 if self.layout == "v1+" else 1


def read_adapter(folder: str | Path) -> OfficialAdapter:
    """Read an official checkpoint folder and check it on its own: the config, every tensor used, every tensor
    of a pair present, shapes consistent, every value finite.

    Raises:
        CheckpointError: one line naming the file and the fix.
    """
    folder = Path(folder)
    config = _read_adapter_config(folder / ADAPTER_CONFIG)
    weights = folder / ADAPTER_WEIGHTS
    if not weights.is_file():
        found = "adapter_model.bin (a pickle, which livevlm does not read) is there" \
            if (folder / "adapter_model.bin").is_file() else "it is missing"
        raise CheckpointError(f"{weights}: {found}; download the checkpoint's adapter_model.safetensors again")
    try:
        tensors = load_file(str(weights))
    except Exception as exc:  # safetensors raises its own SafetensorError for a damaged file
        raise CheckpointError(f"{weights} cannot be read ({exc}); download it again") from None
    lora: dict[str, dict[str, torch.Tensor]] = {}
    head, connector, unused = None, {}, []
    for key, tensor in tensors.items():
        name = key.removeprefix(PREFIX)
        if key == name:
            unused.append(key)
        elif name in CONNECTOR_KEYS:
            connector[CONNECTOR_KEYS[name]] = tensor
        elif name == HEAD_COPY:
            head = tensor
        elif m := re.fullmatch(r"(.+)\.lora_([AB])\.weight", name):
            lora.setdefault(m[1], {})[m[2]] = tensor
        else:
            unused.append(key)
    if unused:
        raise CheckpointError(f"{weights} holds tensors an official VideoLLM-online adapter does not have "
                              f"({', '.join(unused[:3])}{', …' if len(unused) > 3 else ''}); is it another model's "
                              "adapter? livevlm loads the paper's checkpoints and its own")
    _check_finite(weights, tensors)
    adapter = OfficialAdapter(folder, config, _lora_pairs(weights, lora, int(config["r"])), head,
                              _checked_connector(weights, connector), layout_of(folder))
    if head is not None and head.shape[1] != adapter.llm_width:
        raise CheckpointError(f"{weights}: {PREFIX}{HEAD_COPY} is {list(head.shape)} but the connector's output is "
                              f"{adapter.llm_width} wide; the file is inconsistent, download it again")
    return adapter


def _read_adapter_config(path: Path) -> dict:
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path} cannot be read as JSON ({exc}); download the checkpoint again") from None
    if not isinstance(config, dict) or config.get("peft_type", "LORA") != "LORA":
        raise CheckpointError(f"{path}: not a LoRA adapter config (peft_type {config.get('peft_type')!r}); "
                              "the official checkpoints are PEFT LoRA adapters")
    for key in ("r", "lora_alpha", "target_modules"):
        if key not in config:
            raise CheckpointError(f"{path} has no {key!r}; download the checkpoint again")
    if config.get("use_dora") or config.get("rank_pattern") or config.get("alpha_pattern"):
        raise CheckpointError(f"{path}: DoRA and per-module ranks (rank_pattern, alpha_pattern) are not in the "
                              "official format; livevlm merges plain LoRA only")
    if "connector" not in (config.get("modules_to_save") or []):
        raise CheckpointError(f"{path}: modules_to_save does not name the connector, so this is not a "
                              "VideoLLM-online checkpoint (its connector is saved with the adapter)")
    return config


def _check_finite(weights: Path, tensors: dict[str, torch.Tensor]) -> None:
    for key, tensor in tensors.items():
        bad = int((~torch.isfinite(tensor)).sum())
        if bad:
            why = (" (a connector left uninitialised is what broke the public demo)" if ".connector." in key else "")
            raise CheckpointError(f"{weights}: {key} holds {bad} NaN/inf values of {tensor.numel()}{why}; the "
                                  "checkpoint is damaged: download it again")


def _lora_pairs(weights: Path, lora: dict[str, dict[str, torch.Tensor]],
                r: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    if not lora:
        raise CheckpointError(f"{weights} holds no LoRA weights (lora_A / lora_B); download the checkpoint again")
    pairs = {}
    for name, pair in sorted(lora.items()):
        if set(pair) != {"A", "B"}:
            missing = "lora_B" if "A" in pair else "lora_A"
            raise CheckpointError(f"{weights}: {PREFIX}{name}.{missing}.weight is missing; download it again")
        a, b = pair["A"], pair["B"]
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != r or b.shape[1] != r:
            raise CheckpointError(f"{weights}: {name} has LoRA A {list(a.shape)} and B {list(b.shape)}, which do "
                                  f"not make a rank-{r} pair (adapter_config.json r={r}); download it again")
        pairs[name] = (a, b)
    return pairs


def _checked_connector(weights: Path, connector: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    missing = [official for official, ours in CONNECTOR_KEYS.items() if ours not in connector]
    if missing:
        raise CheckpointError(f"{weights}: the connector's {', '.join(PREFIX + m for m in missing)} "
                              "is missing (Linear → GELU → Linear under base_model.model.connector.{0,2}); "
                              "download the checkpoint again")
    w1, b1, w2, b2 = (connector[k] for k in ("fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"))
    if w1.dim() != 2 or w2.dim() != 2 or b1.shape != w1.shape[:1] or w2.shape[1] != w1.shape[0] \
            or b2.shape != w2.shape[:1]:
        shapes = {k: list(v.shape) for k, v in connector.items()}
        raise CheckpointError(f"{weights}: the connector's shapes do not chain as Linear → GELU → Linear: {shapes}")
    return connector


# ---------------------------------------------------------------------------------------------------
# base LLM and vision tower: found, checked against the adapter


def check_llm_config(llm_folder: Path, adapter: OfficialAdapter, flag: str) -> object:
    """The base LLM's config, checked against the adapter's shapes before any weight is loaded."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(str(llm_folder))
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{flag} {llm_folder}: no LLM config ({str(exc).splitlines()[0]}); give the folder "
                              f"of the base LLM ({adapter.base_model})") from None
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    hidden, vocab = getattr(config, "hidden_size", None), getattr(config, "vocab_size", None)
    wrong = []
    if hidden != adapter.llm_width:
        wrong.append(f"its hidden size is {hidden}, the connector's output {adapter.llm_width}")
    if adapter.head is not None and vocab != adapter.head.shape[0]:
        wrong.append(f"its vocabulary is {vocab}, the adapter's LM head {adapter.head.shape[0]}")
    if wrong:
        raise CheckpointError(f"{flag} {llm_folder} is not the base this adapter was trained on ({'; '.join(wrong)}); "
                              f"give a folder of {adapter.base_model}")
    return config


def vision_width(vision_folder: Path, flag: str = "--vision") -> int:
    """The vision tower's output width (a full SigLIP/CLIP model's vision half, or a vision-only model)."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(str(vision_folder))
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{flag} {vision_folder}: no vision model config ({str(exc).splitlines()[0]}); give "
                              f"a folder of {OFFICIAL_VISION}") from None
    return int(getattr(config, "vision_config", config).hidden_size)


def load_tokenizer(llm_folder: Path, placeholder: str = "<v>"):
    """The base LLM's tokenizer with `<|eot_id|>` as eos and `<v>` added as a new special token.

    Returns (tokenizer, placeholder id). Raises CheckpointError when `<v>` cannot be added past the vocabulary.
    """
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(llm_folder))
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"--llm {llm_folder}: no tokenizer can be read ({str(exc).splitlines()[0]}); give "
                              "the base LLM's folder with its tokenizer files") from None
    use_eot_as_eos(tokenizer, llm_folder)
    try:
        placeholder_id = register_placeholder(tokenizer, placeholder)
    except Exception as exc:  # a tokenizer class without added tokens raises its own kind of error
        raise CheckpointError(f"{llm_folder}: {placeholder!r} cannot be added to the tokenizer as a special token "
                              f"({exc}); pass the base LLM's own (Llama-3) tokenizer folder with --llm") from None
    if placeholder_id != len(tokenizer) - 1:
        raise CheckpointError(f"{llm_folder}: the tokenizer cannot take {placeholder!r} as a new special token: it "
                              f"already is token {placeholder_id} of {len(tokenizer)}; the official model needs it "
                              "added after the vocabulary (128256 for Llama-3): pass the base LLM's own tokenizer "
                              "with --llm")
    return tokenizer, placeholder_id


def use_eot_as_eos(tokenizer, source: str | Path) -> None:
    """Make `<|eot_id|>` the eos (and pad, when none) where the tokenizer has it: Llama-3-Instruct ends its turns
    with it, and the official model was trained so; older cached Llama-3 tokenizers name `<|end_of_text|>`."""
    if tokenizer.eos_token == EOT:
        return
    if EOT not in tokenizer.get_vocab():
        log.warning("%s: the tokenizer has no %s; responses end at its eos %r", source, EOT, tokenizer.eos_token)
        return
    log.info("%s: eos is %r; using %s (id %d) as the official model does", source, tokenizer.eos_token, EOT,
             tokenizer.convert_tokens_to_ids(EOT))
    tokenizer.eos_token = EOT
    if tokenizer.pad_token is None:
        tokenizer.pad_token = EOT


def format_config_of(layout: Layout) -> FormatConfig:
    """v1+: livevlm's default layout ("," between frames); v1: no separator (silence is eos)."""
    return FormatConfig() if layout == "v1+" else FormatConfig(separator="")


def model_config_of(adapter: OfficialAdapter, llm: str, vision: str, dtype: torch.dtype) -> ModelConfig:
    """The official model in livevlm's terms (what livevlm.yaml says for it)."""
    return ModelConfig(llm=llm, vision=vision, frame_size=FRAME_SIZE, pooled_token=True,
                       grid=3 if adapter.layout == "v1+" else 0, connector_hidden=adapter.connector_hidden,
                       finetune="lora", lora_r=adapter.r, lora_alpha=_number(adapter.alpha),
                       lora_dropout=float(adapter.config.get("lora_dropout", 0.05)),
                       lora_targets=adapter.lora_targets, dtype=str(dtype).removeprefix("torch."))  # type: ignore[arg-type]


def _number(value: float) -> int:
    return int(value) if float(value).is_integer() else value  # type: ignore[return-value]


# ---------------------------------------------------------------------------------------------------
# GPU memory, said before loading


def parameter_count(folder: Path, prefix: str = "") -> int:
    """Parameters stored in a folder's safetensors files (headers only), those whose names start with `prefix`
    when any does (a full SigLIP model's "vision_model."); 0 when it has none."""
    counts: dict[str, int] = {}
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as handle:
            for key in handle.keys():
                counts[key] = math.prod(handle.get_slice(key).get_shape())
    chosen = [n for k, n in counts.items() if k.startswith(prefix)] if prefix else []
    return sum(chosen) if chosen else sum(counts.values())


def estimate_gpu_bytes(llm_folder: Path, vision_folder: Path, adapter: OfficialAdapter, dtype: torch.dtype,
                       context_tokens: int | None = None) -> dict[str, int]:
    """What the model needs on a GPU, in bytes: weights (LLM, vision tower, connector) in `dtype`, the KV cache
    of a full context (`context_tokens`, default the LLM's max_position_embeddings) and working room.

    Llama-3-8B in bf16: 16.1 GB of weights + SigLIP-L's vision half 0.6 GB + 1.1 GB of KV cache for 8k tokens
    + 1 GiB of room ≈ 19 GB (the paper measured 18.2 GB).
    """
    from transformers import AutoConfig

    size = torch.finfo(dtype).bits // 8
    text = AutoConfig.from_pretrained(str(llm_folder))
    text = text.get_text_config() if hasattr(text, "get_text_config") else text
    heads = text.num_attention_heads
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    context = context_tokens or getattr(text, "max_position_embeddings", 8192)
    connector = sum(t.numel() for t in adapter.connector.values())
    kv_cache = 2 * text.num_hidden_layers * kv_heads * head_dim * context  # keys and values of every layer
    return {"llm": parameter_count(llm_folder) * size, "vision": parameter_count(vision_folder, "vision_model.") * size,
            "connector": connector * size, "kv_cache": kv_cache * size, "room": WORKING_ROOM}


def check_gpu_memory(need: dict[str, int], device: torch.device) -> None:
    """Raise CheckpointError (one line: what is needed, what is free) when a CUDA device has too little free."""
    if device.type != "cuda":
        return
    free, total = torch.cuda.mem_get_info(device)
    if sum(need.values()) <= free:
        return
    parts = ", ".join(f"{name.replace('_', ' ')} {value / GIB:.1f}" for name, value in need.items())
    raise CheckpointError(f"the model needs about {sum(need.values()) / GIB:.1f} GiB of GPU memory ({parts} GiB) "
                          f"but {device} ({torch.cuda.get_device_name(device)}) has {free / GIB:.1f} of "
                          f"{total / GIB:.1f} GiB free; use a larger GPU (24 GB or more for the 8B model in "
                          "bfloat16), free this one, or run on the CPU with --device cpu (slow)")


# ---------------------------------------------------------------------------------------------------
# the merge and the loaded model


def target_module_names(llm: torch.nn.Module, target_modules: str | list[str]) -> set[str]:
    """The Linear layers PEFT puts a LoRA on: a regex string must match a module's whole name, a list entry
    must be its name or its last dotted part."""
    names = {name for name, module in llm.named_modules() if isinstance(module, torch.nn.Linear)}
    if isinstance(target_modules, str):
        return {name for name in names if re.fullmatch(target_modules, name)}
    return {name for name in names if any(name == t or name.endswith(f".{t}") for t in target_modules)}


def merge_adapter(llm: torch.nn.Module, adapter: OfficialAdapter, flag: str = "--llm") -> int:
    """Merge the adapter into `llm` in place: W += scale·B@A (computed in float32) on every targeted layer, the
    head replaced by the adapter's copy. Returns the number of layers merged.

    Raises:
        CheckpointError: a targeted layer has no LoRA, a LoRA has no layer, shapes disagree, or a merged weight
            is not finite.
    """
    weights = adapter.folder / ADAPTER_WEIGHTS
    expected = target_module_names(llm, adapter.config["target_modules"])
    missing, extra = sorted(expected - set(adapter.lora)), sorted(set(adapter.lora) - expected)
    if missing or extra:
        what = f"lacks LoRA weights for {missing[:3]}" if missing else \
            f"has LoRA weights for layers {flag} lacks: {extra[:3]}"
        raise CheckpointError(f"{weights} {what}; the adapter does not fit this base LLM: give {adapter.base_model} "
                              f"with {flag}")
    if "lm_head" in adapter.lora or adapter.head is not None:
        _untie_lm_head(llm)  # the head changes; the input embeddings must not
    if adapter.head is not None:
        _use_head_copy(llm, adapter.head, weights)
    with torch.no_grad():
        for name, (a, b) in adapter.lora.items():
            weight = llm.get_submodule(name).weight  # [out, in]
            if tuple(weight.shape) != (b.shape[0], a.shape[1]):
                raise CheckpointError(f"{weights}: the LoRA of {name} is for a [{b.shape[0]}, {a.shape[1]}] weight, "
                                      f"{flag}'s is {list(weight.shape)}; give {adapter.base_model} with {flag}")
            a, b = a.to(weight.device, torch.float32), b.to(weight.device, torch.float32)
            merged = weight.float() + adapter.scale * (b @ a)
            if not torch.isfinite(merged).all():
                raise CheckpointError(f"{weights}: merging the LoRA of {name} gives non-finite weights; the base LLM "
                                      f"({flag}) or the adapter is damaged")
            weight.copy_(merged.to(weight.dtype))
    return len(adapter.lora)


def _use_head_copy(llm: torch.nn.Module, head: torch.Tensor, weights: Path) -> None:
    """The adapter's copy of the frozen head replaces the base's (they are equal for the true base)."""
    weight = llm.get_output_embeddings().weight
    if tuple(weight.shape) != tuple(head.shape):
        raise CheckpointError(f"{weights}: the LM head copy is {list(head.shape)}, the base LLM's {list(weight.shape)}")
    with torch.no_grad():
        copy = head.to(weight.device, weight.dtype)
        if not torch.equal(copy, weight):
            delta = float((copy.float() - weight.float()).abs().max())
            log.warning("the LM head stored in %s differs from the base LLM's (max |Δ| %.3g): is --llm the base it "
                        "was trained on? using the stored head", weights, delta)
        weight.copy_(copy)


def load_official(folder: str | Path, llm: str | None = None, vision: str | None = None,
                  device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> LoadedModel:
    """Load an official VideoLLM-online checkpoint folder as a LiveModel (LoRA merged), checked.

    Args:
        folder: the adapter folder (adapter_config.json + adapter_model.safetensors).
        llm: the base LLM (folder or hub id); None = the adapter's base_model_name_or_path.
        vision: the vision tower (folder or hub id); None = SigLIP-L/384.
    Returns:
        a LoadedModel with the official θ 0.725; its model_config names the local folders used.
    Raises:
        CheckpointError: one line naming the file and the fix (see `read_adapter`, `merge_adapter`), or the GPU is
            too small (`check_gpu_memory`), before the weights load.
    """
    from transformers import AutoModelForCausalLM

    folder, device = Path(folder), torch.device(device)
    adapter = read_adapter(folder)
    llm_folder = fetch(llm or adapter.base_model, "--llm", "base LLM", None if llm else folder / ADAPTER_CONFIG)
    check_llm_config(llm_folder, adapter, "--llm")
    vision_folder = fetch(vision or OFFICIAL_VISION, "--vision", "vision tower")
    if (width := vision_width(vision_folder)) != adapter.vision_width:
        raise CheckpointError(f"--vision {vision_folder}: the tower's output is {width} wide but the connector takes "
                              f"{adapter.vision_width} ({folder / ADAPTER_WEIGHTS}); give {OFFICIAL_VISION} or "
                              "another tower of that width")
    tokenizer, placeholder_id = load_tokenizer(llm_folder)
    format_config = format_config_of(adapter.layout)
    try:
        StreamFormat(tokenizer, format_config, adapter.tokens_per_frame)
    except StreamFormatError as exc:
        raise CheckpointError(f"{llm_folder}: {exc}") from None
    check_gpu_memory(estimate_gpu_bytes(llm_folder, vision_folder, adapter, dtype), device)
    model_kwargs = {"device_map": {"": str(device)}} if device.type == "cuda" else {}
    base = AutoModelForCausalLM.from_pretrained(str(llm_folder), dtype=dtype, **model_kwargs)
    if placeholder_id < base.get_input_embeddings().num_embeddings:
        raise CheckpointError(f"{llm_folder}: `<v>` got id {placeholder_id}, inside the LLM's embedding table; the "
                              "official model needs it past the vocabulary: pass the base LLM's own tokenizer")
    merged = merge_adapter(base, adapter)
    model = LiveModel(base, adapter.vision_width, placeholder_id, adapter.connector_hidden)
    model.connector.load_state_dict(adapter.connector)
    model.to(device=device, dtype=dtype).eval().requires_grad_(False)
    use_cache_friendly_attention(model.llm)  # the same outputs, without copying the KV cache per frame
    model_config = model_config_of(adapter, str(llm_folder), str(vision_folder), dtype)
    log.info("loaded the official VideoLLM-online %s checkpoint %s: base LLM %s, vision tower %s, LoRA r=%d α=%g "
             "merged into %d layers, connector %d→%d→%d, %d tokens per frame, %s on %s", adapter.layout, folder,
             llm_folder, vision_folder, adapter.r, adapter.alpha, merged, adapter.vision_width,
             adapter.connector_hidden, adapter.llm_width, adapter.tokens_per_frame, model_config.dtype, device)
    return LoadedModel(model, tokenizer, model_config, format_config, OFFICIAL_THRESHOLD)


# ---------------------------------------------------------------------------------------------------
# training from it (`train.init_from`)


def load_official_weights(model: LiveModel, folder: Path, model_config: ModelConfig) -> None:
    """Copy an official checkpoint's connector and LoRA into a freshly built, trainable LiveModel (the recipe
    `recipes/official_v1plus.yaml`): `train.init_from` = an official folder or hub id.

    Raises:
        CheckpointError: the recipe's model settings differ from the checkpoint's in a setting that shapes the
            weights (the message lists them), or the weights do not fit the model.
    """
    from peft import set_peft_model_state_dict

    from livevlm.checkpoint import WEIGHT_SETTINGS
    from livevlm.vision import added_channels

    adapter = read_adapter(folder)
    saved = model_config_of(adapter, model_config.llm, model_config.vision, torch.float32)
    ours = replace(model_config, connector_hidden=model_config.connector_hidden or adapter.connector_hidden)
    differ = [f"model.{name}: {getattr(saved, name)!r} in the checkpoint, {getattr(ours, name)!r} here"
              for name in WEIGHT_SETTINGS if name not in ("llm", "vision", "lora_targets")
              and getattr(saved, name) != getattr(ours, name)]
    if set(saved.lora_targets) != set(ours.lora_targets):
        differ.append(f"model.lora_targets: {saved.lora_targets} in the checkpoint, {ours.lora_targets} here")
    if ours.frame_delta:
        differ.append("model.frame_delta: the official model has none; set it false")
    if differ:
        raise CheckpointError(f"train.init_from={folder} (an official VideoLLM-online {adapter.layout} checkpoint) has "
                              "other model settings; set them as it has them: " + "; ".join(differ))
    try:
        model.load_connector(adapter.connector, False,
                             added_channels(model_config.mean_rgb, model_config.hue_bins, model_config.change_hues))
    except ValueError as exc:
        raise CheckpointError(f"train.init_from={folder}: {exc} (from the feature cache); encode the features with "
                              f"{OFFICIAL_VISION} at {FRAME_SIZE} px") from None
    state = {f"{PREFIX}{name}.lora_{part}.weight": tensor
             for name, pair in adapter.lora.items() for part, tensor in zip("AB", pair, strict=True)}
    fix = f"give the base LLM it was trained on ({adapter.base_model}) as model.llm"
    try:
        result = set_peft_model_state_dict(model.llm, state)
    except RuntimeError as exc:  # torch's size mismatch
        raise CheckpointError(f"train.init_from={folder}: the adapter's LoRA does not fit this model "
                              f"({str(exc).splitlines()[-1].strip()[:160]}); {fix}") from None
    missing = [key for key in result.missing_keys if "lora_" in key]
    if result.unexpected_keys or missing:
        raise CheckpointError(f"train.init_from={folder}: the adapter's LoRA does not fit this model (unexpected "
                              f"{result.unexpected_keys[:3]}, missing {missing[:3]}); {fix}")
    if adapter.head is not None:
        _use_head_copy(model.llm.get_base_model(), adapter.head, folder / ADAPTER_WEIGHTS)
    log.info("starting from the official VideoLLM-online %s checkpoint %s (connector and LoRA r=%d α=%g)",
             adapter.layout, folder, adapter.r, adapter.alpha)


# ---------------------------------------------------------------------------------------------------
# export: official → livevlm checkpoint, and back


def export_livevlm(folder: str | Path, out: str | Path, llm: str | None = None, vision: str | None = None) -> Path:
    """Write an official checkpoint as a livevlm checkpoint (for `evaluate --choose-threshold`, further training,
    or the way back with `export_official`): the tensors as stored, nothing merged.

    livevlm.yaml names `llm` (default: the adapter's base) and `vision` (default SigLIP-L/384) as given; the
    base LLM's tokenizer (found with `fetch`) is saved with `<v>` and `<|eot_id|>` as eos.
    """
    folder, out = Path(folder), Path(out)
    adapter = read_adapter(folder)
    llm_name = llm or adapter.base_model
    tokenizer, _ = load_tokenizer(fetch(llm_name, "--llm", "base LLM", None if llm else folder / ADAPTER_CONFIG))
    model_config = model_config_of(adapter, llm_name, vision or OFFICIAL_VISION, adapter.dtype)
    sections = {"model": to_dict(model_config), "format": to_dict(format_config_of(adapter.layout)),
                "engine": {"threshold": OFFICIAL_THRESHOLD}}
    adapter_state = {f"{PREFIX}{name}.lora_{part}.weight": tensor
                     for name, pair in adapter.lora.items() for part, tensor in zip("AB", pair, strict=True)}
    if adapter.head is not None:
        adapter_state[PREFIX + HEAD_COPY] = adapter.head
    config = dict(adapter.config, modules_to_save=None)  # livevlm keeps its connector in connector.safetensors

    def write(tmp: Path) -> None:
        (tmp / CONFIG_NAME).write_text(yaml.safe_dump(sections, sort_keys=False, allow_unicode=True))
        save_file(adapter.connector, str(tmp / "connector.safetensors"))
        save_file(adapter_state, str(tmp / ADAPTER_WEIGHTS))
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
        tokenizer.save_pretrained(str(tmp / "tokenizer"))

    return _write_folder(out, write)


def export_official(folder: str | Path, out: str | Path, llm: str | None = None, base_name: str = "") -> Path:
    """Write a livevlm LoRA checkpoint with a Llama-3 base and the v1+ layout in the official format, so that the
    public VideoLLM-online code (PEFT 0.10–0.13) and other tools load it. Tensors are written in bfloat16.

    Args:
        llm: where to read the base LM head from when the checkpoint has no copy of it (default: its model.llm).
        base_name: adapter_config.json's base_model_name_or_path; default: the checkpoint's when it is a hub id,
            else meta-llama/Meta-Llama-3-8B-Instruct.
    Raises:
        CheckpointError: the checkpoint cannot be expressed in the official format (the message says why).
    """
    from livevlm.checkpoint import _load_connector, read_checkpoint_config

    folder, out = Path(folder), Path(out)
    model_config, format_config = read_checkpoint_config(folder)
    _check_exportable(folder, model_config, format_config)
    source_config = json.loads((folder / ADAPTER_CONFIG).read_text())
    weights = folder / ADAPTER_WEIGHTS
    stored = load_file(str(weights))
    head_key = PREFIX + HEAD_COPY
    other = sorted(key for key in stored if key != head_key and not re.search(r"\.lora_[AB]\.weight$", key))
    if other:
        raise CheckpointError(f"{weights} holds weights the official format has no place for: {other[:3]}")
    regex = _target_regex(model_config.lora_targets)
    _check_lora_coverage(weights, {key.removeprefix(PREFIX).rsplit(".lora_", 1)[0] for key in stored
                                   if ".lora_" in key}, regex, model_config.lora_targets)
    if head_key not in stored and "lm_head" in model_config.lora_targets:
        stored[head_key] = _base_head(fetch(llm or model_config.llm, "--llm", "base LLM",
                                            None if llm else folder / CONFIG_NAME))
    connector = _load_connector(folder)
    tensors = {key: tensor.to(torch.bfloat16).contiguous() for key, tensor in stored.items()}
    tensors |= {PREFIX + official: connector[ours].to(torch.bfloat16).contiguous()
                for official, ours in CONNECTOR_KEYS.items()}
    name = base_name or source_config.get("base_model_name_or_path") or ""
    if not looks_like_hub_id(str(name)):
        name = OFFICIAL_LLM
    config = {key: source_config.get(key, PEFT_010_DEFAULTS.get(key)) for key in PEFT_010_KEYS}
    config |= {"base_model_name_or_path": name, "r": model_config.lora_r, "lora_alpha": model_config.lora_alpha,
               "target_modules": regex, "modules_to_save": ["connector"], "task_type": "CAUSAL_LM",
               "inference_mode": True}

    def write(tmp: Path) -> None:
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        save_file(tensors, str(tmp / ADAPTER_WEIGHTS), metadata={"format": "pt"})

    return _write_folder(out, write)


def _check_exportable(folder: Path, model_config: ModelConfig, format_config: FormatConfig) -> None:
    """The official format holds a LoRA + connector over Llama-3 with the v1+ layout, SigLIP-L/384 tokens."""
    reasons = []
    if model_config.finetune != "lora":
        reasons.append(f"model.finetune is {model_config.finetune!r}, the official format holds a LoRA")
    if (model_config.pooled_token, model_config.grid, model_config.frame_size) != (True, 3, FRAME_SIZE):
        reasons.append("the frame tokens are not the official pooled token + 3×3 grid at 384 px")
    if (model_config.mean_rgb or model_config.hue_bins or model_config.change_hues or model_config.frame_delta
            or model_config.connector_norm):
        reasons.append("mean_rgb / hue_bins / change_hues / frame_delta / connector_norm are livevlm's own inputs, "
                       "unknown to the public code")
    official = FormatConfig()
    if replace(format_config, system_prompt=official.system_prompt) != official:
        reasons.append("the stream layout is not the official v1+ one")
    tokenizer_folder = folder / "tokenizer"
    if not reasons:
        from transformers import AutoTokenizer

        from livevlm.default_model import resolve_llm

        tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_folder) if tokenizer_folder.is_dir()
                                                  else resolve_llm(model_config.llm))
        placeholder = register_placeholder(tokenizer, format_config.placeholder)
        if placeholder != 128256 or tokenizer.convert_tokens_to_ids(EOT) != 128009:
            reasons.append(f"the base LLM is not Llama-3 (`<v>` is {placeholder}, not 128256)")
    if reasons:
        raise CheckpointError(f"{folder} cannot be written in the official format: {'; '.join(reasons)}")
    if format_config.system_prompt != official.system_prompt:
        log.warning("%s uses its own system prompt; the public code starts streams with the official one", folder)


def _check_lora_coverage(weights: Path, names: set[str], regex: str, targets: list[str]) -> None:
    """Every LoRA module inside the official target pattern, and every layer holding every targeted projection
    (what the public code's PEFT would create for the pattern)."""
    outside = sorted(name for name in names if not re.fullmatch(regex, name))
    layers = {int(m[1]) for name in names if (m := re.match(r"model\.layers\.(\d+)\.", name))}
    expected = {f"model.layers.{i}.{'self_attn' if t.endswith(('q_proj', 'k_proj', 'v_proj', 'o_proj')) else 'mlp'}.{t}"
                for i in range(max(layers, default=-1) + 1) for t in targets if t != "lm_head"}
    expected |= {"lm_head"} if "lm_head" in targets else set()
    missing = sorted(expected - names)
    if outside or missing:
        what = f"LoRA on {outside[:3]}, outside the official pattern {regex!r}" if outside else \
            f"no LoRA for {missing[:3]}, which the official pattern {regex!r} targets"
        raise CheckpointError(f"{weights}: {what}; the public code would load it differently")


def _target_regex(targets: list[str]) -> str:
    """The official target pattern for livevlm's lora_targets (OFFICIAL_TARGETS for the official list)."""
    layers = [t for t in OFFICIAL_LORA_TARGETS if t in targets and t != "lm_head"]
    regex = f"model.*({'|'.join(layers)})" if layers else ""
    return regex + ("|lm_head$" if regex and "lm_head" in targets else "lm_head$" if "lm_head" in targets else "")


def _base_head(llm_folder: Path) -> torch.Tensor:
    """The base LLM's LM head weight `[vocab, hidden]`, read from its safetensors without loading the model."""
    index = llm_folder / "model.safetensors.index.json"
    weight_map = json.loads(index.read_text())["weight_map"] if index.is_file() else {}
    for key in ("lm_head.weight", "model.embed_tokens.weight"):  # the second: a tied head
        file = llm_folder / weight_map.get(key, "model.safetensors")
        if file.is_file():
            with safe_open(str(file), framework="pt") as handle:
                if key in handle.keys():
                    return handle.get_tensor(key)
    raise CheckpointError(f"--llm {llm_folder}: no lm_head.weight in its safetensors files; give the base LLM's folder")


def _write_folder(out: Path, write) -> Path:
    """Write a new folder atomically (a temporary sibling renamed into place); an existing `out` is refused."""
    if out.exists():
        raise CheckpointError(f"{out} already exists; choose a new folder (or remove it)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        write(tmp)
        os.chmod(tmp, 0o755)
        _replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out

