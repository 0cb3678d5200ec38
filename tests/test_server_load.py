"""`livevlm serve` under load: 8 concurrent sessions × 60 frames on loopback against the `livevlm serve` process.

Every session gets all its frame events and its summary, /health shows 0 sessions afterwards, the server's
RSS comes back within 10 % of its value before the load, and Ctrl-C stops the server cleanly. The test
prints per-session FPS and the aggregate against one session alone (figures, never asserted).
"""

import signal
import threading
import time

from server_helpers import ServeProcess, health, make_frames, png, run_session, wait_for_sessions

SESSIONS, FRAMES = 8, 60
START = {"max_new_tokens": 4}  # the tiny random model speaks after every frame: short responses keep it quick


def test_eight_sessions_at_once_each_get_everything_and_memory_comes_back(tiny_checkpoint):
    ckpt, _ = tiny_checkpoint
    frames = [png(f) for f in make_frames(FRAMES, seed=3)]
    inherited = signal.signal(signal.SIGINT, signal.default_int_handler)  # see test_stream_cli's Ctrl-C test
    try:
        serve = ServeProcess("--model", str(ckpt), "--device", "cpu", "--max-sessions", str(SESSIONS),
                             "--max-fps", "1000")
    finally:
        signal.signal(signal.SIGINT, inherited)
    try:
        run_session(serve.ws, frames[:10], start=START)  # warm-up: first-use allocations are not the load's
        alone = run_session(serve.ws, frames, start=START)
        assert len(alone.of("frame")) == FRAMES
        assert wait_for_sessions(serve.http, 0) == 0
        rss_before = serve.rss_kb()

        results: list = [None] * SESSIONS

        def one(k: int) -> None:
            results[k] = run_session(serve.ws, frames, start=START)

        threads = [threading.Thread(target=one, args=(k,)) for k in range(SESSIONS)]
        began = time.monotonic()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=120)
        wall = time.monotonic() - began

        for result in results:
            assert [m["index"] for m in result.of("frame")] == list(range(FRAMES))
            summary = result.messages[-1]
            assert summary["type"] == "summary" and summary["frames"] == FRAMES and summary["dropped"] == 0
            assert result.close_code == 1000
        assert wait_for_sessions(serve.http, 0) == 0
        assert health(serve.http)[1]["max_sessions"] == SESSIONS
        rss_after = serve.rss_kb()
        per_session = [FRAMES / r.elapsed_s for r in results]
        print(f"\none session alone: {FRAMES / alone.elapsed_s:.1f} FPS; {SESSIONS} at once: "
              f"{min(per_session):.1f}–{max(per_session):.1f} FPS each, {SESSIONS * FRAMES / wall:.1f} FPS in all "
              f"({SESSIONS * FRAMES / wall / (FRAMES / alone.elapsed_s):.2f}× one alone); "
              f"server RSS {rss_before / 1024:.0f} MB before, {rss_after / 1024:.0f} MB after")
        assert rss_after <= 1.10 * rss_before
    finally:
        serve.proc.send_signal(signal.SIGINT)
        try:
            code = serve.proc.wait(timeout=30)
        finally:
            serve.proc.kill()
    assert code == 130 and "Traceback" not in "".join(serve.log), "".join(serve.log)
