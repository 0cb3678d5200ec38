"""Process-wide settings: the library never changes them; `livevlm.runtime` does, when a program asks."""

import os
import subprocess
import sys
import textwrap

import pytest

from livevlm import runtime

# Whether glibc serves a 256 KB block from its own mmap after a 4 MB block was freed. Untouched, glibc raises
# its mmap threshold to the freed block's size, so the 256 KB block comes from the heap (False); with the
# threshold pinned (`runtime.pin_mmap_threshold`) it is mapped (True).
PROBE_ALLOCATOR = textwrap.dedent("""
    import ctypes

    class MallInfo2(ctypes.Structure):
        _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd",
                                                          "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]

    libc = ctypes.CDLL("libc.so.6")
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    libc.mallinfo2.restype = MallInfo2
    libc.free(libc.malloc(4 << 20))
    before = libc.mallinfo2().hblks
    block = libc.malloc(256 << 10)
    mapped = libc.mallinfo2().hblks > before
    libc.free(block)
""")


def run_python(code: str) -> str:
    env = {k: v for k, v in os.environ.items() if k not in ("ONEDNN_MAX_CPU_ISA", "LIVEVLM_MMAP_THRESHOLD")}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


glibc = pytest.mark.skipif(not sys.platform.startswith("linux") or os.environ.get("LIVEVLM_MMAP_THRESHOLD") == "0",
                           reason="glibc's allocator")


@glibc
def test_import_and_a_stream_through_the_api_change_no_process_setting(tiny_checkpoint):
    ckpt, video = tiny_checkpoint
    code = textwrap.dedent(f"""
        import os
        import livevlm
        model = livevlm.load({str(ckpt)!r}, device="cpu")
        events = list(model.stream({str(video)!r}, queries=[(0.0, "Narrate.")], max_new_tokens=2))
        assert events
    """) + PROBE_ALLOCATOR + "print(os.environ.get('ONEDNN_MAX_CPU_ISA'), mapped)"
    assert run_python(code) == "None False"


@glibc
def test_the_probe_sees_a_pinned_threshold():
    """The control: the same probe after `runtime.pin_mmap_threshold()` sees the block mapped, so the test above
    can fail."""
    assert run_python("from livevlm import runtime\nruntime.pin_mmap_threshold()\n" + PROBE_ALLOCATOR
                      + "print(mapped)") == "True"


def test_the_command_line_caps_onednn_before_torch_loads():
    code = ("import sys\nfrom livevlm import runtime\nassert runtime.cap_onednn_isa()\nimport os\n"
            "print(os.environ['ONEDNN_MAX_CPU_ISA'], 'torch' in sys.modules)")
    assert run_python(code) == "AVX512_CORE_BF16 False"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_pinning_the_mmap_threshold_is_accepted_by_glibc():
    assert runtime.pin_mmap_threshold() is True


def test_the_environment_can_leave_the_allocator_alone(monkeypatch):
    monkeypatch.setenv("LIVEVLM_MMAP_THRESHOLD", "0")
    assert runtime.pin_mmap_threshold() is False
