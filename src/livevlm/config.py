"""Typed configuration: dataclasses for model / format / train / engine, YAML recipes, CLI overrides.

A recipe is a YAML file whose top-level keys are the sections of `Recipe` (`model`, `format`, `train`,
`engine`). Command-line overrides use dotted keys: `train.lr=1e-4 model.grid=2`. Unknown keys and values
of the wrong type raise `ConfigError` naming the key, so a typo never silently falls back to a default.

The `livevlm` command builds its options from dataclasses too (`livevlm.cli.arguments`); that layer is
the CLI's, not the library's.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml

OFFICIAL_SYSTEM_PROMPT = (
    "A multimodal AI assistant is helping users with some activities. Below is their conversation, "
    "interleaved with the list of video frames received by the assistant."
)
OFFICIAL_LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"]


class ConfigError(ValueError):
    """A configuration value or key is invalid; the message names the key and the fix."""


class _StrictLoader(yaml.SafeLoader):
    """PyYAML's safe loader, but a key given twice in one mapping is an error.

    Plain `yaml.safe_load` keeps the last of two equal keys without a word, so a recipe edited by hand
    (a second `model:` block left below the first, a `lr:` set twice) would silently run with whichever
    came last.
    """

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: set = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if key in seen:
                raise ConfigError(f"line {key_node.start_mark.line + 1}: key {key!r} is given twice in the same "
                                  "section; keep one")
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def load_yaml(text: str, source: str | Path) -> Any:
    """Parse YAML text (safe types only), refusing duplicate keys; errors name `source` and the line."""
    try:
        return yaml.load(text, Loader=_StrictLoader)
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{source} is not valid YAML: {exc}") from None


@dataclass
class ModelConfig:
    """What the model is made of. `llm` / `vision` are a local folder, a hub name, or "default"."""

    llm: str = "default"
    vision: str = "default"
    frame_size: int = 224  # square side the frames are letterboxed to before the vision encoder
    pooled_token: bool = True  # one pooled/CLS token per frame, before the grid
    grid: int = 3  # k: the patch grid is average-pooled to k x k tokens (0 = no grid tokens)
    mean_rgb: bool = False  # each frame token also carries its pixels' mean colour (D + 3; see vision.py)
    hue_bins: int = 0  # each frame token also carries a histogram of its pixels' hues in K bins (+ K; vision.py)
    change_hues: bool = False  # ... and the same histogram of only its pixels changed since the frame before (+ K)
    frame_delta: bool = False  # each frame token also carries its change since the frame before (2D; model.py)
    connector_hidden: int = 0  # hidden width of the 2-layer MLP connector; 0 = the LLM's hidden size
    connector_norm: bool = False  # the connector ends in an RMSNorm: frame tokens enter at the text's scale
    finetune: Literal["lora", "full", "connector"] = "lora"
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    lora_targets: list[str] = field(default_factory=lambda: list(OFFICIAL_LORA_TARGETS))
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"

    def __post_init__(self) -> None:
        if self.grid < 0:
            raise ConfigError(f"model.grid must be >= 0, got {self.grid}")
        if not self.pooled_token and self.grid == 0:
            raise ConfigError("model: a frame needs at least one token: set model.pooled_token=true or grid>0")
        if self.hue_bins < 0 or self.hue_bins in (1, 2):
            raise ConfigError(f"model.hue_bins must be 0 (none) or at least 3 bins around the hue circle, got "
                              f"{self.hue_bins}")
        if self.change_hues and not self.hue_bins:
            raise ConfigError("model.change_hues needs model.hue_bins (its histogram has that many bins); set both")
        if self.frame_size <= 0:
            raise ConfigError(f"model.frame_size must be positive, got {self.frame_size}")
        if self.lora_r <= 0 and self.finetune == "lora":
            raise ConfigError(f"model.lora_r must be positive for LoRA, got {self.lora_r}")

    @property
    def tokens_per_frame(self) -> int:
        return int(self.pooled_token) + self.grid * self.grid


@dataclass
class FormatConfig:
    """The interleaved text layout (official VideoLLM-online v1+ by default).

    With `separator=""` frames are not separated (the one-token-per-frame v1 layout): the silence
    target of a frame's last token is then the tokenizer's eos.
    """

    system_prompt: str = OFFICIAL_SYSTEM_PROMPT
    placeholder: str = "<v>"
    separator: str = ","
    frames_open: str = "\n["
    frames_close: str = "]\n"
    user_role: str = "User"
    assistant_role: str = "Assistant"
    fps: float = 2.0
    # A text token fed after each frame's placeholders, where the speak decision is read (the stay-silent or
    # speak target sits there). "" = the official layout: the decision is read at the frame's last placeholder,
    # a frame token, whose embedding dwarfs a text token's (docs/experiments.md, "The decision reads that a
    # request exists").
    decision: str = ""
    # The role of the model's notes to itself (dialogue turns of role "note"), e.g. "Note": after a frame the model
    # may write a note ("]\nNote: A small red circle appears on the left.<eos>") and only then choose between
    # answering the user ("\nAssistant: …") and going on with the frames ("\n["). The note names what it sees,
    # and the choice is read at a text position right after those words: a reminder's decision, which the frame
    # decision cannot make (docs/experiments.md, "A verdict after the event's words"). "" = no notes, the
    # paper's layout.
    note_role: str = ""

    def __post_init__(self) -> None:
        if self.note_role and self.note_role in (self.user_role, self.assistant_role):
            raise ConfigError(f"format.note_role {self.note_role!r} must differ from the user and assistant roles "
                              f"({self.user_role!r}, {self.assistant_role!r}); the official-style choice is 'Note'")
        if self.fps <= 0:
            raise ConfigError(f"format.fps must be positive, got {self.fps}")
        if not self.placeholder:
            raise ConfigError("format.placeholder must not be empty (the official one is '<v>')")
        if not self.frames_close:
            raise ConfigError("format.frames_close must not be empty (the official one is ']\\n')")


@dataclass
class MixedData:
    """A further dialogue file trained on beside `train.data`, with its own feature cache (LLaVA-style data
    mixing: e.g. short "what just changed?" clips kept in the stream stage so it does not unlearn them)."""
    data: str = ""  # dialogue JSONL
    features: str = ""  # its feature cache folder, encoded with the same options as train.features
    count: int = 0  # how many of its dialogues to use, drawn once with train.seed; 0 = all

    def __post_init__(self) -> None:
        if self.count < 0:
            raise ConfigError(f"train.mix: count must be >= 0 (0 = all), got {self.count}")


@dataclass
class TrainConfig:
    data: str = ""  # dialogue JSONL
    features: str = ""  # feature cache folder (from `livevlm data encode`)
    mix: list[MixedData] = field(default_factory=list)  # further dialogue files shuffled in with train.data
    eval_data: str = ""
    output_dir: str = "runs/default"
    init_from: str = ""  # a livevlm checkpoint ("default" = the shipped model) to start from; "" = fresh weights
    epochs: float = 1.0
    max_steps: int = 0  # > 0 overrides epochs
    batch_size: int = 1
    grad_accum: int = 1
    lr: float = 2e-4
    connector_lr: float = 0.0  # the connector's own peak lr (LLaVA's mm_projector_lr); 0 = train.lr
    weight_decay: float = 0.0
    warmup_ratio: float = 0.05
    max_frames: int = 256
    stream_loss_weight: float = 1.0
    # × the speak/silent targets of a dialogue's key frames (`key_frames_s`: the hard decisions, e.g. a
    # reminder's events, one answered, the others waited through); 1 = the plain LIVE objective.
    key_frame_weight: float = 1.0
    gradient_checkpointing: bool = False
    bf16: bool = False
    seed: int = 42
    save_steps: int = 200
    eval_steps: int = 0
    log_steps: int = 10

    def __post_init__(self) -> None:
        for name in ("batch_size", "grad_accum", "max_frames"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"train.{name} must be positive, got {getattr(self, name)}")
        if self.lr <= 0:
            raise ConfigError(f"train.lr must be positive, got {self.lr}")
        if self.key_frame_weight < 0:
            raise ConfigError(f"train.key_frame_weight must be >= 0 (1 = unweighted), got {self.key_frame_weight}")
        if self.connector_lr < 0:
            raise ConfigError(f"train.connector_lr must be positive (or 0 = train.lr), got {self.connector_lr}")


DecodeMode = Literal["eager", "static", "compiled"]  # EngineConfig.decode
DECODE_MODES: tuple[str, ...] = typing.get_args(DecodeMode)


@dataclass
class EngineConfig:
    threshold: float = 0.725  # stay silent while P(separator) >= threshold
    max_new_tokens: int = 64
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    max_frames_per_forward: int = 8
    window_frames: int = 0  # 0 = keep everything up to the context length, then slide
    realtime: bool = False
    # How response tokens are decoded: "eager" one forward each on the growing cache; "static" through a
    # static-shape step (a fixed-capacity cache, the whole buffer masked), the same events; "compiled" that
    # step under torch.compile (CUDA graphs on a GPU: the decode loop stops being Python-bound).
    decode: DecodeMode = "eager"
    # Prompt-lookup decoding (greedy, eager): after each decoded token, look for the response's last tokens
    # earlier in the stream, take up to this many tokens that followed them there as a guess, and check the
    # whole guess in one forward; keep the guessed tokens the model picks itself (argmax), so the response is
    # the one decoded token by token, in fewer forwards where the stream repeats itself (narration's
    # sentences). 0 = off.
    prompt_lookup: int = 0

    def __post_init__(self) -> None:
        if not 0.0 <= self.threshold <= 1.0:
            raise ConfigError(f"engine.threshold must be in [0, 1], got {self.threshold}")
        if self.max_new_tokens <= 0:
            raise ConfigError(f"engine.max_new_tokens must be positive, got {self.max_new_tokens}")
        if self.decode not in DECODE_MODES:
            raise ConfigError(f"engine.decode must be one of {list(DECODE_MODES)}, got {self.decode!r}")
        if self.prompt_lookup < 0:
            raise ConfigError(f"engine.prompt_lookup must be >= 0 (0 = off), got {self.prompt_lookup}")
        if self.prompt_lookup and (self.temperature > 0 or self.decode != "eager"):
            raise ConfigError("engine.prompt_lookup checks guessed tokens against the argmax, one multi-token forward "
                              f"at a time: it needs engine.temperature=0 and engine.decode='eager' (got "
                              f"{self.temperature}, {self.decode!r}); set engine.prompt_lookup=0 to sample")


Query = tuple[float, str]  # (stream time in seconds, text)


def check_threshold(threshold: float | None, name: str = "threshold") -> float | None:
    """θ must be a probability; None (use the model's) passes. Raises ConfigError naming the value as `name`
    (the command line passes its flag, "--threshold")."""
    if threshold is not None and not 0.0 <= threshold <= 1.0:
        raise ConfigError(f"{name} {threshold:g} is not in [0, 1]: the model stays silent while P(separator) "
                          "≥ θ, so θ is a probability (the paper's is 0.725)")
    return threshold


def check_queries(queries: Iterable[Query]) -> list[Query]:
    """Queries as `(time_s, text)` pairs with time_s ≥ 0 and a non-empty text. Raises ConfigError."""
    checked = []
    for time_s, text in queries:
        if time_s < 0:
            raise ConfigError(f"query {text!r} is at {time_s:g} s: a query's time must be ≥ 0 (0 = the first frame)")
        if not str(text).strip():
            raise ConfigError(f"the query at {time_s:g} s is empty; give it a text")
        checked.append((float(time_s), str(text)))
    return checked


@dataclass
class Recipe:
    model: ModelConfig = field(default_factory=ModelConfig)
    format: FormatConfig = field(default_factory=FormatConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)


T = TypeVar("T")


def _coerce(value: Any, annotation: Any, key: str) -> Any:
    """Check/convert one value against a (resolved) type annotation, naming `key` on failure."""
    origin = typing.get_origin(annotation)
    if annotation is Any:
        return value
    if origin is Literal:
        allowed = typing.get_args(annotation)
        if value not in allowed:
            raise ConfigError(f"{key}: {value!r} is not one of {list(allowed)}")
        return value
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if value is None:
            return None
        return _coerce(value, args[0], key)
    if origin is list:
        (item_type,) = typing.get_args(annotation) or (Any,)
        if isinstance(value, str):
            value = [v for v in value.split(",") if v]
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{key}: expected a list, got {type(value).__name__} {value!r}")
        return [_coerce(v, item_type, f"{key}[{i}]") for i, v in enumerate(value)]
    if dataclasses.is_dataclass(annotation):
        if isinstance(value, annotation):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping of {annotation.__name__} fields, got {value!r}")
        return from_dict(annotation, value, prefix=f"{key}.")
    if annotation is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "false", "0", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"{key}: expected true/false, got {value!r}")
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int | str):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        try:
            return int(value)
        except ValueError:
            raise ConfigError(f"{key}: expected an integer, got {value!r}") from None
    if annotation is float:
        if isinstance(value, bool) or not isinstance(value, int | float | str):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        try:
            return float(value)
        except ValueError:
            raise ConfigError(f"{key}: expected a number, got {value!r}") from None
    if annotation is str:
        if not isinstance(value, str | int | float) or isinstance(value, bool):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return str(value)
    if annotation is Path:
        return Path(value)
    return value


def from_dict(cls: type[T], data: dict[str, Any], prefix: str = "") -> T:
    """Build dataclass `cls` from a mapping, rejecting unknown keys and wrongly typed values."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(data) - names)
    if unknown:
        key = str(unknown[0])
        close = difflib.get_close_matches(key, names, n=1)
        hint = f"did you mean {prefix}{close[0]}? " if close else ""
        raise ConfigError(f"unknown key {prefix}{key}; {hint}valid keys here: {sorted(names)}")
    kwargs = {k: _coerce(v, hints[k], f"{prefix}{k}") for k, v in data.items()}
    try:
        return cls(**kwargs)
    except TypeError as exc:  # a required field is missing
        raise ConfigError(f"{prefix or cls.__name__}: {exc}") from None


def to_dict(obj: Any) -> dict[str, Any]:
    return dataclasses.asdict(obj)


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `section.key=value` strings to a nested dict (values parsed as YAML scalars)."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like section.key=value, e.g. train.lr=1e-4")
        dotted, raw = item.split("=", 1)
        *parents, leaf = dotted.split(".")
        node = data
        for p in parents:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {p} is not a section")
        node[leaf] = yaml.safe_load(raw) if raw else ""
    return data


def _merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """`override` over `base`, section by section (a nested mapping merges, anything else replaces)."""
    merged = dict(base)
    for key, value in override.items():
        merged[key] = _merge(merged[key], value) if isinstance(value, dict) and isinstance(merged.get(key), dict) \
            else value
    return merged


def read_recipe_data(path: str | Path, _seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """A recipe file as a dict, with its `base: OTHER.yaml` (a path relative to it) merged underneath.

    Shipped recipes share their common settings this way (`recipes/base.yaml`); a key the recipe sets wins.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"recipe {path} does not exist; the shipped ones are under recipes/")
    if path.resolve() in _seen:
        raise ConfigError(f"recipe {path}: its `base:` chain comes back to itself")
    loaded = load_yaml(path.read_text(), f"recipe {path}") or {}
    if not isinstance(loaded, dict):
        raise ConfigError(f"recipe {path} must be a mapping of sections (model, format, train, engine)")
    base = loaded.pop("base", None)
    if base is None:
        return loaded
    if not isinstance(base, str) or not base:
        raise ConfigError(f"recipe {path}: `base` must name another recipe file, e.g. base: base.yaml")
    return _merge(read_recipe_data(path.parent / base, (*_seen, path.resolve())), loaded)


def load_recipe(path: str | Path | None = None, overrides: list[str] | None = None) -> Recipe:
    """Load a YAML recipe (or the defaults when `path` is None), its `base:` first, and apply CLI overrides."""
    data = apply_overrides(read_recipe_data(path) if path is not None else {}, overrides or [])
    try:
        return from_dict(Recipe, data)
    except ConfigError as exc:
        try:  # the overrides alone: when they are at fault, say so rather than blame the file
            from_dict(Recipe, apply_overrides({}, overrides or []))
        except ConfigError as own:
            raise ConfigError(f"override: {own}") from None
        where = f"recipe {path}: " if path is not None else ""
        raise ConfigError(f"{where}{exc}") from None


def save_recipe(recipe: Recipe, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(recipe), sort_keys=False, allow_unicode=True))
