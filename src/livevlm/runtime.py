"""Process-wide settings that a *program* chooses, never a library: the `livevlm` command applies them.

Importing livevlm or using its Python API changes no process setting. These three are set by the entry
point (`livevlm.cli.main`) because each trades something for the whole process, which only the program
that owns the process may decide; a Python user who wants the same calls them explicitly:

    import livevlm.runtime as runtime
    runtime.cap_onednn_isa()       # before torch is imported
    runtime.pin_mmap_threshold()   # before an endless stream

* `cap_onednn_isa`: some CPUs report AMX, which oneDNN then uses for bf16 matmuls and dies with "Illegal
  instruction". Capping oneDNN at AVX512_CORE_BF16 avoids it, at the price of AMX speed on CPUs that do
  run it; it must happen before torch initialises oneDNN.
* `pin_mmap_threshold`: flat memory for endless streams (see its docstring), at ~20 % of CPU speed.
* `use_all_cores`: torch's intra-op pool on every core this process may run on (affinity, not the
  machine's count), for the commands that compute on the caller's thread.

`usable_cores` and `stage_threads` only read: the cores this process may run on, and the share of them each of
a stream's two compute stages takes (the library sizes its pipeline and ONNX Runtime's pool with them).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

ONEDNN_ISA_CAP = "AVX512_CORE_BF16"
MMAP_THRESHOLD_BYTES = 128 * 1024  # glibc's own default, kept from rising (see `pin_mmap_threshold`)
_M_MMAP_THRESHOLD = -3  # mallopt parameter number (glibc malloc.h)


def cap_onednn_isa(isa: str = ONEDNN_ISA_CAP) -> bool:
    """Cap oneDNN's instruction set (unless the user set ONEDNN_MAX_CPU_ISA). Returns False when torch is
    already imported, as oneDNN has then read the variable (the cap may not take effect)."""
    os.environ.setdefault("ONEDNN_MAX_CPU_ISA", isa)
    return "torch" not in sys.modules


def pin_mmap_threshold(threshold: int = MMAP_THRESHOLD_BYTES) -> bool:
    """Keep blocks of `threshold` bytes and more in their own mmap for the whole process (glibc only).

    glibc raises its mmap threshold to the size of each large block freed, so afterwards blocks of up to
    tens of MB come from the heap. A stream's forwards allocate temporaries whose sizes grow with the cache
    (attention scores, masks: `[heads, new tokens, cached tokens]`); in the heap these leave holes that the
    next, slightly larger ones cannot use, and resident memory climbs for as long as the stream runs even
    though nothing is kept (an hour-long stream's process peaked 72 % above a 5-minute one). Pinning the
    threshold gives such blocks back to the system when freed. Returns False where there is no glibc
    (nothing to do) or when the environment variable LIVEVLM_MMAP_THRESHOLD is 0. The price is speed: every
    large temporary (the frame encoder's activations too) is then mapped and faulted in afresh, which cost
    ~20 % of a 1-minute stream's FPS on a 2-core machine; LIVEVLM_MMAP_THRESHOLD=0 trades the flat memory
    back for it, and LIVEVLM_MMAP_THRESHOLD=BYTES sets another threshold.
    """
    threshold = int(os.environ.get("LIVEVLM_MMAP_THRESHOLD", threshold))
    if threshold <= 0 or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, int(threshold)))
    except (OSError, AttributeError):  # musl and others have no mallopt
        return False


def usable_cores() -> int:
    """Cores this process may run on (its affinity mask; a container's limit, not the machine's count)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def stage_threads() -> int:
    """Threads for each of a stream's two compute stages, which run at once (the frame encoder and the LLM, see
    `engine.pipeline`): half the usable cores, at least 1, so that the two never fight over one core."""
    return max(1, usable_cores() // 2)


def use_all_cores() -> int:
    """Size torch's intra-op thread pool to the usable cores; returns the count."""
    import torch

    cores = usable_cores()
    torch.set_num_threads(cores)
    return cores
