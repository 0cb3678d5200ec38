"""Where a model runs and in what precision: one meaning of "auto" for every command.

`livevlm stream`, `evaluate`, `data encode` and the transformers synthesis backend all take `--device` and
(where weights are loaded) `--dtype`; they resolve them here so that "auto" means the same everywhere.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal, get_args

if TYPE_CHECKING:
    import torch

# The --dtype choices of every command. Importable without torch (it loads in the functions below), so that
# the command line can build its options without paying torch's import.
DtypeName = Literal["auto", "float32", "bfloat16", "float16"]
DTYPE_CHOICES: tuple[str, ...] = get_args(DtypeName)


def resolve_device(name: str) -> torch.device:
    """"auto" (or "") → the first CUDA GPU when one is visible, else the CPU; anything else as torch spells it.

    Raises:
        ValueError: a name torch does not know (naming it), or a CUDA device when no GPU is visible.
    """
    import torch

    if name in ("", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device {name!r} is not a device torch knows; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0 or (device.index is not None and device.index >= count):
            raise ValueError(f"--device {name}: this machine has {count} visible CUDA GPU(s); "
                             "use --device cpu (or auto, which picks the GPU when there is one)")
    return device


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """"auto" → bfloat16 on a GPU that supports it (float16 on an older one), float32 on the CPU.

    Why float32 on the CPU: without bf16 matrix units most CPUs run bf16 matmuls slower than fp32, and the
    figures in the README and the model card were measured in fp32 there.

    Raises:
        ValueError: a name outside DTYPE_CHOICES.
    """
    import torch

    if name == "auto":
        if device.type != "cuda":
            return torch.float32
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if name not in DTYPE_CHOICES:
        raise ValueError(f"--dtype {name!r}: use one of {', '.join(DTYPE_CHOICES)}")
    return getattr(torch, name)
