"""`livevlm assets prepare | package-default`: the default backbones and the shipped default model."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class PrepareArgs:
    """Arguments of `livevlm assets prepare`."""

    cache_dir: str = field(
        default="", metadata={"help": "cache folder for the converted backbones; empty = $LIVEVLM_CACHE or "
                                      "~/.cache/livevlm"})


def prepare(args: PrepareArgs) -> int:
    """Convert the default LLM and vision encoder (if not cached yet) and print their folders."""
    from livevlm.backbones import materialize_dinov2, materialize_smollm2

    cache_dir = Path(args.cache_dir) if args.cache_dir else None
    print(f"llm: {materialize_smollm2(cache_dir)}")
    print(f"vision: {materialize_dinov2(cache_dir)}")
    return 0


@dataclass
class PackageDefaultArgs:
    """Arguments of `livevlm assets package-default CHECKPOINT` (maintainers: scripts/build_default_model.sh)."""

    checkpoint: str = field(metadata={"help": "a trained LoRA checkpoint on the default backbones (runs/…/model)"})
    card: str = field(default="", metadata={"help": "model card to ship with it; empty = keep the current one"})


def package_default(args: PackageDefaultArgs) -> int:
    """Copy the checkpoint, slimmed, into the package as the default model; print where."""
    from livevlm.default_model import install_default_model

    print(install_default_model(Path(args.checkpoint), card=Path(args.card) if args.card else None))
    return 0
