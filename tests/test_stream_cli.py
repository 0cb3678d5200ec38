"""`livevlm stream` end to end on a tiny random checkpoint and a synthetic-world video."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from livevlm.checkpoint import store_recommended_threshold
from livevlm.cli import run
from livevlm.world import WorldSpec, render_video


def test_jsonl_events_and_summary(tiny_checkpoint, capsys, tmp_path):
    ckpt, video = tiny_checkpoint
    code = run(["stream", str(video), "--model", str(ckpt), "--jsonl", "--threshold", "0", "--query", "Narrate.",
                "--at", "1.0", "--max-new-tokens", "4", "--plot", str(tmp_path / "t.png")])
    assert code == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    types = [line["type"] for line in lines]
    assert types.count("frame") == 12  # 6 s at 2 fps
    assert types[-1] == "summary" and lines[-1]["frames"] == 12 and lines[-1]["threshold"] == 0.0
    query = next(line for line in lines if line["type"] == "query")
    assert query == {"type": "query", "time_s": 1.0, "text": "Narrate."}
    answer = lines[types.index("query") + 1]
    assert answer["type"] == "response" and answer["time_s"] == 1.0
    assert set(answer) == {"type", "time_s", "text", "latency_s"}
    assert (tmp_path / "t.png").stat().st_size > 0


def test_decode_static_says_what_the_eager_loop_says(tiny_checkpoint, capsys):
    """`--decode` reaches the engine: the static-shape step gives the eager loop's responses, word for word."""
    ckpt, video = tiny_checkpoint
    said = {}
    for decode in ("eager", "static"):
        assert run(["stream", str(video), "--model", str(ckpt), "--jsonl", "--no-frames", "--threshold", "0",
                    "--max-new-tokens", "4", "--decode", decode]) == 0
        lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
        said[decode] = [(line["time_s"], line["text"]) for line in lines if line["type"] == "response"]
    assert said["eager"] and said["static"] == said["eager"]


def test_the_models_recommended_threshold_is_used_when_none_is_given(tiny_checkpoint, capsys, tmp_path):
    ckpt, video = tiny_checkpoint
    shutil.copytree(ckpt, tmp_path / "ckpt")
    store_recommended_threshold(tmp_path / "ckpt", 0.9)
    assert run(["stream", str(video), "--model", str(tmp_path / "ckpt"), "--jsonl", "--no-frames",
                "--max-new-tokens", "2"]) == 0
    summary = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert summary["type"] == "summary" and summary["threshold"] == 0.9


def test_the_summary_says_where_it_ran_and_bfloat16_runs_on_the_cpu(tiny_checkpoint, capsys):
    ckpt, video = tiny_checkpoint
    assert run(["stream", str(video), "--model", str(ckpt), "--jsonl", "--no-frames", "--max-new-tokens", "2",
                "--device", "cpu", "--dtype", "bfloat16", "--query", "Narrate.", "--at", "0"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert lines[-1]["frames"] == 12 and lines[-1]["device"] == "cpu bfloat16"
    assert any(line["type"] == "response" for line in lines)


def test_a_gpu_that_is_not_there_is_one_clean_error(tiny_checkpoint, capsys, monkeypatch):
    ckpt, video = tiny_checkpoint
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert run(["stream", str(video), "--model", str(ckpt), "--device", "cuda"]) == 2
    assert "--device cuda: this machine has 0 visible CUDA GPU(s)" in capsys.readouterr().err


def test_missing_source_is_one_clean_error(tiny_checkpoint, capsys, tmp_path):
    ckpt, _ = tiny_checkpoint
    assert run(["stream", str(tmp_path / "nope.mp4"), "--model", str(ckpt)]) == 2
    err = capsys.readouterr().err
    assert "nope.mp4" in err and "Traceback" not in err


def test_camera_that_does_not_exist_is_one_clean_error(tiny_checkpoint, capsys):
    ckpt, _ = tiny_checkpoint
    assert run(["stream", "/dev/video57", "--model", str(ckpt)]) == 2
    assert "video57" in capsys.readouterr().err


def test_ctrl_c_prints_what_was_said_and_exits_130(tiny_checkpoint, tmp_path):
    ckpt, _ = tiny_checkpoint
    video = tmp_path / "long.mp4"  # 30 s in real time: the signal comes long before the end, even on a busy machine
    render_video(WorldSpec(seed=3, index=0, duration=30.0, size=64), video)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    # A shell that starts the tests in the background (`cmd &`) ignores SIGINT, and children inherit that; a
    # terminal's Ctrl-C never comes to an ignoring process. A handler (unlike "ignore") resets to the default
    # in the child, so the child gets SIGINT as a terminal's process does.
    inherited = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        proc = subprocess.Popen([sys.executable, "-m", "livevlm.cli", "stream", str(video), "--model", str(ckpt),
                                 "--realtime", "--threshold", "1.0", "--max-new-tokens", "2"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True,
                                env=env)
    finally:
        signal.signal(signal.SIGINT, inherited)
    deadline = time.monotonic() + 60
    line = proc.stdout.readline()  # the first response: the session is running
    assert line.startswith("["), line
    assert time.monotonic() < deadline
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 130
    assert "said so far" in err and "Traceback" not in err


def test_the_timeline_plot_takes_any_response_text(tmp_path):
    """Dollar signs are not TeX (matplotlib failed to parse "$x^^2$") and control characters are dropped."""
    import warnings

    from livevlm.cli.plot import plot_timeline

    said = [(0.0, "user", "Tell me when $x^^2$ shows"), (0.5, "assistant", "Now\x1a")]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        plot_timeline([(0.0, 0.1), (0.5, 0.9)], said, str(tmp_path / "t.png"), 0.725)
    assert (tmp_path / "t.png").stat().st_size > 0


@pytest.fixture
def no_model_load(monkeypatch):
    """Fail the test if `livevlm stream` gets as far as loading a model."""
    from livevlm.cli import stream as stream_cli

    def fail(args):
        pytest.fail("the model was loaded before the input was checked")

    monkeypatch.setattr(stream_cli, "_load", fail)


@pytest.mark.parametrize(("argv", "said"), [
    (["missing.mp4"], "missing.mp4 does not exist"),
    (["VIDEO", "--query", "Narrate.", "--at", "-5"], "--at -5: a query's stream time must be ≥ 0"),
    (["VIDEO", "--threshold", "1.5"], "--threshold 1.5 is not in [0, 1]"),
    (["/dev/video97"], "docker run --device=/dev/video0"),
    (["foo://host/stream"], "unknown URL scheme 'foo'"),
    (["VIDEO", "--demo"], "--demo streams a generated video"),
])
def test_bad_input_is_one_line_before_any_model_loads(argv, said, tiny_checkpoint, no_model_load, capsys, tmp_path,
                                                      monkeypatch):
    _, video = tiny_checkpoint
    monkeypatch.chdir(tmp_path)
    assert run(["stream", *[str(video) if a == "VIDEO" else a for a in argv]]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("livevlm: error: ") and said in err[0], err


def test_an_unknown_override_suggests_the_key_and_blames_the_override(capsys):
    recipe = os.path.join(os.path.dirname(__file__), "..", "recipes", "default.yaml")
    assert run(["train", recipe, "train.max_step=3"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("livevlm: error: override: unknown key train.max_step; did you mean train.max_steps?")


@pytest.mark.parametrize("after_s", [0.3, 0.6, 1.0, 1.5])
def test_ctrl_c_while_starting_exits_130_without_a_traceback(tiny_checkpoint, after_s):
    """Ctrl-C during the imports or the model load (a new user's first seconds) is one line, not a traceback."""
    ckpt, video = tiny_checkpoint
    inherited = signal.signal(signal.SIGINT, signal.default_int_handler)  # see the test above
    try:
        proc = subprocess.Popen([sys.executable, "-m", "livevlm.cli", "stream", str(video), "--model", str(ckpt),
                                 "--realtime"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                stdin=subprocess.DEVNULL, text=True)
    finally:
        signal.signal(signal.SIGINT, inherited)
    time.sleep(after_s)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err
    last = err.strip().splitlines()[-1]
    assert last == "livevlm: interrupted" or "said so far" in err, err


def test_a_truncated_file_is_one_warning_line_then_the_summary(tiny_checkpoint, tmp_path, capsys):
    ckpt, _ = tiny_checkpoint
    whole = tmp_path / "whole.mp4"
    render_video(WorldSpec(seed=3, index=0, duration=20.0, size=64), whole)
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    assert run(["stream", str(cut), "--model", str(ckpt), "--jsonl", "--max-new-tokens", "2"]) == 0
    captured = capsys.readouterr()
    warned = [line for line in captured.err.splitlines() if "warning" in line.lower()]
    assert len(warned) == 1 and warned[0].startswith(f"livevlm: warning: video {cut}: stopped at"), captured.err
    assert "warnings.warn" not in captured.err  # no Python source line
    summary = json.loads(captured.out.splitlines()[-1])
    assert summary["frames"] < 40  # what came before the cut (the stream still ends with its summary)


def test_a_missing_source_is_reported_before_torch_is_even_imported(tmp_path):
    """A typo costs a fraction of a second: nothing heavy loads before the input is checked."""
    code = ("import sys\nfrom livevlm.cli import run\n"
            f"code = run(['stream', {str(tmp_path / 'nope.mp4')!r}])\n"
            "print(code, sorted(m for m in ('torch', 'transformers') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.stdout.strip() == "2 []", result.stderr
    assert "does not exist" in result.stderr


class _Terminal:
    """A stdout that says it is a terminal, and keeps what is written."""

    def __init__(self) -> None:
        self.text = ""

    def isatty(self) -> bool:
        return True

    def write(self, text: str) -> int:
        self.text += text
        return len(text)

    def flush(self) -> None:
        pass


def test_a_terminal_shows_a_responses_words_as_they_are_decoded(tiny_tokenizer, monkeypatch):
    from livevlm.cli.stream import _View
    from livevlm.engine import FrameEvent, ResponseEvent, TokenEvent

    terminal = _Terminal()
    monkeypatch.setattr(sys, "stdout", terminal)
    view = _View(jsonl=False, frames=True, tokenizer=tiny_tokenizer)
    ids = tiny_tokenizer.encode("a red circle", add_special_tokens=False)
    view(FrameEvent(0.5, 0.9))
    shown = []
    for token in ids:
        view(TokenEvent(0.5, token, False))
        shown.append(terminal.text)
    assert shown[0].startswith("[    0.5s] Assistant: ") and shown[-1].endswith("a red circle")
    assert len(set(shown)) > 1  # it grew word by word, before the response was finished
    view(ResponseEvent(0.5, "a red circle", tuple(ids), 0.1, "eos", False))
    assert terminal.text == "[    0.5s] Assistant: a red circle\n"  # the finished line, once


@pytest.mark.parametrize("frames", [True, False])
def test_a_note_is_a_jsonl_line_with_the_frames_and_never_said(capsys, frames):
    from livevlm.cli.stream import _View
    from livevlm.engine import NoteEvent

    view = _View(jsonl=True, frames=frames)
    view(NoteEvent(2.5, "A red circle appears.", (1, 2), False, 0.1))
    out = capsys.readouterr().out
    expected = {"type": "note", "time_s": 2.5, "text": "A red circle appears.", "answered": False}
    assert [json.loads(line) for line in out.splitlines()] == ([expected] if frames else [])
    assert view.said == []  # a note is not among what the model said
