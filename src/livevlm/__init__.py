"""livevlm: online video LLMs that watch a stream and decide by themselves when to speak."""

import os

# Some of these CPUs report AMX, which oneDNN then uses for bf16 matmuls and dies with "Illegal
# instruction". Capping the ISA must happen before torch initialises oneDNN, so it is done at the very
# first import of the package (every entry point and the tests import it before torch).
os.environ.setdefault("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_BF16")

__version__ = "0.1.0"
