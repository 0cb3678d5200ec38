"""`livevlm data synthesize`: skeletons, prompts, parsing and filters of LLM answers, resumable output, the
`rules` and `transformers` backends, and the `openai` backend's retries against a local HTTP server.

The real llama.cpp server tests are in test_synthesis_server.py.
"""

import http.server
import json
import sys
import threading
import time
from collections import Counter

import pytest
import torch

from livevlm.cli import run
from livevlm.config import FormatConfig
from livevlm.data.backends import (
    BackendError,
    BackendOptions,
    Completion,
    DeadlineExceeded,
    OpenAIBackend,
    Request,
    TransformersBackend,
    join_prefill,
    make_backend,
)
from livevlm.data.dataset import StreamDataset
from livevlm.data.features import feature_name, save_features
from livevlm.data.schema import read_dialogues
from livevlm.data.synthesis_text import (
    Item,
    Malformed,
    Step,
    build_skeleton,
    fill_skeleton,
    is_skeleton_start,
    load_query_templates,
    parse_numbered,
    refine_texts,
    render_lines,
    response_problem,
    rule_rewrite,
    skeleton_prefill,
    timestamp_leak,
)
from livevlm.data.synthesize import SynthesisOptions, run_synthesis
from livevlm.stream_format import StreamFormat, register_placeholder
from livevlm.world import WorldSpec, plan_video


def write_world(folder, videos=3, duration=30.0):
    """A world annotations.jsonl (planned, not rendered: the annotations are identical)."""
    folder.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps({"video": f"videos/{i:03d}.mp4", **plan_video(WorldSpec(index=i, duration=duration))})
             for i in range(videos)]
    path = folder / "annotations.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def kitchen_item(duration=10.0):
    return Item("kitchen", "videos/kitchen.mp4", duration,
                [Step(1.2, 4.0, "Cut the onion."), Step(5.0, 10.0, "Fry the onion.")], [])


def skeleton(queries=2, seed=0):
    import random

    return build_skeleton(kitchen_item(), 2.0, queries, random.Random(seed), load_query_templates())


class Scripted:
    """A backend that answers with fixed texts, to feed the pipeline chosen LLM outputs (malformed ones)."""

    name = "scripted"
    concurrency = 1

    def __init__(self, answer):
        self.answer = answer  # request -> completion text, or an exception to raise

    def complete(self, requests, deadline):
        out = []
        for request in requests:
            result = self.answer(request)
            if isinstance(result, Exception):
                raise result
            out.append(Completion(result))
        return out

    def close(self):
        pass


def args_for(annotations, out, **kw):
    return SynthesisOptions(input=str(annotations), output=str(out), progress=False, **kw)


# ---------------------------------------------------------------------------------------------------
# templates and skeletons


def test_query_library_has_150_distinct_templates_in_every_tense():
    templates = load_query_templates()
    everything = [q for queries in templates.values() for q in queries]
    assert set(templates) == {"past", "current", "next", "off-topic"}
    assert len(everything) >= 150 and len(set(everything)) == len(everything)
    assert all(len(queries) >= 25 for queries in templates.values())


def test_skeleton_has_an_assistant_line_at_every_step_start_and_end_on_the_grid():
    lines = skeleton(queries=0)
    # starts 1.2 -> 1.5 (next 2 fps frame), end 4.0, start 5.0; the end at 10.0 is the video's end: no event
    assert [(line.time_s, line.role, line.text) for line in lines] == [
        (1.5, "assistant", "..."), (4.0, "assistant", "..."), (5.0, "assistant", "...")]
    assert [line.rule for line in lines] == ["Cut the onion.", "Finished: cut the onion.", "Fry the onion."]


def test_skeleton_has_q_queries_at_distinct_frames_first_at_zero_each_followed_by_its_slot():
    lines = skeleton(queries=5)
    users = [i for i, line in enumerate(lines) if line.role == "user"]
    assert len(users) == 5
    assert lines[users[0]].time_s == 0.0
    assert len({lines[i].time_s for i in users}) == 5
    for i in users:
        assert lines[i + 1].role == "assistant" and lines[i + 1].time_s == lines[i].time_s
    assert all((line.time_s * 2).is_integer() for line in lines)


def test_query_tense_matches_what_the_timeline_allows():
    templates = load_query_templates()
    for seed in range(20):
        lines = skeleton(queries=6, seed=seed)
        for line in lines:
            if line.role != "user":
                continue
            assert line.text in templates[line.why]
            if line.why == "past":  # something must have ended: the first end is at 4.0 s
                assert line.time_s >= 4.0
            if line.why == "next":  # something must still come: the last start is at 5.0 s
                assert line.time_s < 5.0


def test_skeleton_prompt_lines_and_prefill():
    lines = skeleton(queries=1)
    assert render_lines(lines).splitlines()[:2] == [f"0s User: {lines[0].text}", "0s Assistant: ..."]
    assert skeleton_prefill(lines) == f"0s User: {lines[0].text}\n0s Assistant:"


# ---------------------------------------------------------------------------------------------------
# parsing and validating an answer against its skeleton


def answer_for(lines, responses):
    """A well-formed answer: the skeleton with its assistant slots replaced by `responses` in order."""
    it = iter(responses)
    return "\n".join(f"{line.time_s:g}s {line.role.capitalize()}: {next(it) if line.role == 'assistant' else line.text}"
                     for line in lines)


def test_fill_skeleton_takes_responses_in_order_and_keeps_the_skeletons_queries():
    lines = skeleton(queries=1)
    answer = answer_for(lines, ["Sure, I am watching.", "You start cutting.", "Done cutting.", "Now frying."])
    answer = answer.replace(lines[0].text, "A rephrased question?")  # user lines are the skeleton's
    turns = fill_skeleton(lines, answer, max_words=60)
    assert [(t.role, t.time_s, t.text) for t in turns] == [
        ("user", 0.0, lines[0].text), ("assistant", 0.0, "Sure, I am watching."),
        ("assistant", 1.5, "You start cutting."), ("assistant", 4.0, "Done cutting."),
        ("assistant", 5.0, "Now frying.")]


def test_a_continued_prefill_with_nothing_after_it_is_garbage():
    lines = skeleton(queries=1)
    prefill = skeleton_prefill(lines)
    with pytest.raises(Malformed) as caught:
        fill_skeleton(lines, " I cannot help with that.", 60, prefill)
    assert caught.value.reason == "garbage"


def test_fill_skeleton_ignores_chatter_and_lines_after_the_last_slot():
    lines = skeleton(queries=0)
    answer = "Here you go:\n" + answer_for(lines, ["A.", "B.", "C."]) + "\n5.0s Assistant: again\n12s User: more?"
    assert [t.text for t in fill_skeleton(lines, answer, 60)] == ["A.", "B.", "C."]


@pytest.mark.parametrize(("answer", "reason"), [
    ("1.5s Assistant: Cutting.\n5s Assistant: Frying.", "missing lines"),  # the 4.0 s line is gone
    ("1.5s Assistant: Cutting.", "missing lines"),
    ("1.5s Assistant: Cutting.\n4.5s Assistant: Done.\n5s Assistant: Frying.", "changed times"),
    ("2s Assistant: Cutting.\n4s Assistant: Done.\n5s Assistant: Frying.", "changed times"),
    ("I am sorry, I cannot help with that request.", "garbage"),
    ("", "garbage"),
    ("1.5s Assistant: Cutting.\n4s Assistant: Done after one second.\n5s Assistant: Frying.", "timestamp leak"),
    ("1.5s Assistant: Cutting.\n4s Assistant: Done at 12s.\n5s Assistant: Frying.", "timestamp leak"),
    ("1.5s Assistant: Cutting.\n4s Assistant: Done at 3:05.\n5s Assistant: Frying.", "timestamp leak"),
    ("1.5s Assistant: Cutting.\n4s Assistant: ...\n5s Assistant: Frying.", "unfilled placeholder"),
    ("1.5s Assistant: Cutting.\n4s Assistant:\n5s Assistant: Frying.", "empty response"),
    ("1.5s Assistant: Cutting.\n4s Assistant: " + "word " * 61 + "\n5s Assistant: Frying.", "over-long response"),
])
def test_malformed_answer_is_rejected_with_its_reason(answer, reason):
    with pytest.raises(Malformed) as caught:
        fill_skeleton(skeleton(queries=0), answer, max_words=60)
    assert caught.value.reason == reason


@pytest.mark.parametrize(("text", "leak"), [
    ("It stopped a second ago.", "second"), ("At 12s it moves.", "12s"), ("It moves at 3:05.", "3:05"),
    ("Wait 2 s.", "2 s"), ("Two minutes later.", "minutes"), ("You pick up 3 cups.", None),
    ("The star leaves on the left.", None),
])
def test_timestamp_leak(text, leak):
    assert timestamp_leak(text) == leak


def test_response_problem_accepts_a_plain_sentence():
    assert response_problem("You pick up the cup.", max_words=60) is None


def test_join_prefill_continues_a_prefill_but_never_doubles_it():
    prefill = "0s User: Hi?\n0s Assistant:"
    continuation = " Hello.\n1s Assistant: Bye."
    assert join_prefill(prefill, continuation, is_skeleton_start) == prefill + continuation
    whole = "0s User: Hi?\n0s Assistant: Hello."
    assert join_prefill(prefill, whole, is_skeleton_start) == whole


# ---------------------------------------------------------------------------------------------------
# refine-narration


@pytest.mark.parametrize(("narration", "rewrite"), [
    ("#C C picks a cup from the table", "You pick a cup from the table."),
    ("#C C washes his hands", "You wash your hands."),
    ("#C C carries the box to C's car", "You carry the box to your car."),
    ("#O man X walks past C", "Man X walks past you."),
    ("A small red circle appears on the left.", "A small red circle appears on the left."),
])
def test_rule_rewrite(narration, rewrite):
    assert rule_rewrite(narration) == rewrite


def test_refine_falls_back_to_rules_line_by_line_and_counts_why():
    narrations = ["#C C picks a cup", "#C C opens the door", "#C C sits down", "#C C waves"]
    answer = "1. You pick up a cup.\n3. You sit down.\n4. You wave after 5 seconds.\n9. Extra."
    texts, fallbacks = refine_texts(narrations, answer, max_words=60)
    assert texts == ["You pick up a cup.", "You open the door.", "You sit down.", "You wave."]
    assert fallbacks == Counter({"missing line": 1, "timestamp leak": 1})


def test_refine_replaces_an_unrelated_answer_by_the_rule_rewrite():
    texts, fallbacks = refine_texts(["#C C picks a cup"], "1. I am a helpful assistant.", max_words=60)
    assert (texts, fallbacks) == (["You pick a cup."], Counter({"unrelated rewrite": 1}))


def test_parse_numbered_keeps_the_first_line_of_each_number():
    assert parse_numbered("1. A.\n1. B.\n2) C.\nnoise\n3. D.", 2) == {1: "A.", 2: "C."}


def test_refine_narration_with_garbage_output_writes_rule_rewrites_never_placeholders(tmp_path):
    annotations = write_world(tmp_path, videos=1)
    report = run_synthesis(args_for(annotations, tmp_path / "n.jsonl", task="refine-narration"),
                           Scripted(lambda request: "I cannot do that."))
    (dialogue,) = read_dialogues(tmp_path / "n.jsonl")
    events = json.loads(annotations.read_text())["events"]
    said = " ".join(t.text for t in dialogue.turns if t.role == "assistant")
    assert all(event["text"] in said for event in events)  # world events are sentences: the rule keeps them
    assert report.notes == Counter({"rule fallback: unrelated rewrite": 1,  # "1." + "I cannot do that."
                                    "rule fallback: missing line": len(events) - 1})


# ---------------------------------------------------------------------------------------------------
# the whole command with the rules backend


def features_for(out_path, cache, tokens_per_frame=2, width=4):
    for dialogue in read_dialogues(out_path):
        file = cache / feature_name(dialogue.video)
        if not file.exists():
            save_features(file, torch.randn(dialogue.num_frames(), tokens_per_frame, width), {"fps": "2.0"})


def test_rules_dialogue_on_world_steps_loads_in_the_training_dataset(tmp_path, tiny_tokenizer):
    annotations = write_world(tmp_path / "world")
    out = tmp_path / "data" / "dialogue.jsonl"
    report = run_synthesis(args_for(annotations, out, conversations=2, queries=3))
    assert report.ok and report.conversations == 6 and report.dropped == Counter()
    dialogues = read_dialogues(out)
    assert [d.id for d in dialogues] == [f"{i:03d}-dialogue-{j}" for i in range(3) for j in range(2)]
    assert all(d.video == f"../world/videos/{i // 2:03d}.mp4" for i, d in enumerate(dialogues))
    assert all(sum(t.role == "user" for t in d.turns) == 3 for d in dialogues)
    features_for(out, tmp_path / "cache")
    register_placeholder(tiny_tokenizer)
    dataset = StreamDataset(out, StreamFormat(tiny_tokenizer, FormatConfig(), tokens_per_frame=2),
                            cache_dir=tmp_path / "cache")
    sample = dataset[0]
    assert sample.frame_tokens.shape == (60, 2, 4)  # 30 s at 2 fps


def test_rules_output_is_deterministic(tmp_path):
    annotations = write_world(tmp_path)
    run_synthesis(args_for(annotations, tmp_path / "a.jsonl", conversations=2))
    run_synthesis(args_for(annotations, tmp_path / "b.jsonl", conversations=2))
    assert (tmp_path / "a.jsonl").read_bytes() == (tmp_path / "b.jsonl").read_bytes()


def test_guided_fill_asks_once_per_assistant_line_and_builds_the_same_dialogues(tmp_path):
    annotations = write_world(tmp_path, videos=2)
    run_synthesis(args_for(annotations, tmp_path / "whole.jsonl", conversations=2))
    prefills = []

    def answer(request):
        prefills.append(request.prefill)
        return request.rule_text + "\n99s Assistant: never read"  # cut at the line's end

    run_synthesis(args_for(annotations, tmp_path / "guided.jsonl", conversations=2, fill="guided"), Scripted(answer))
    assert (tmp_path / "guided.jsonl").read_bytes() == (tmp_path / "whole.jsonl").read_bytes()
    slots = sum(t.role == "assistant" for d in read_dialogues(tmp_path / "whole.jsonl") for t in d.turns)
    assert len(prefills) == slots and all(p.endswith("Assistant:") for p in prefills)


def test_segments_input_becomes_dialogues_with_videos_next_to_the_output(tmp_path):
    segments = tmp_path / "segments.jsonl"
    segments.write_text("\n".join(json.dumps(r) for r in [
        {"video": "cook", "start": 1.0, "end": 4.0, "text": "cut the onion", "duration": 12.0},
        {"video": "cook", "start": 5.0, "end": 9.0, "text": "fry the onion"},
        {"video": "wash", "start": 0.0, "end": 3.0, "text": "wash the dishes", "duration": 6.0}]) + "\n")
    run_synthesis(args_for(segments, tmp_path / "out" / "d.jsonl", queries=1))
    dialogues = read_dialogues(tmp_path / "out" / "d.jsonl")
    assert [(d.id, d.video, d.duration_s) for d in dialogues] == [
        ("cook-dialogue-0", "cook.mp4", 12.0), ("wash-dialogue-0", "wash.mp4", 6.0)]
    assert [t.time_s for t in dialogues[0].turns if t.role == "assistant"] == [0.0, 1.0, 4.0, 5.0, 9.0]


def test_duration_filter_skips_videos_and_reports_it(tmp_path):
    annotations = write_world(tmp_path, videos=2)
    report = run_synthesis(args_for(annotations, tmp_path / "d.jsonl", conversations=2, min_duration=31.0))
    assert report.ok and report.conversations == 0
    assert report.dropped == Counter({"duration out of range": 4})


def test_malformed_answers_are_counted_and_never_written(tmp_path):
    annotations = write_world(tmp_path, videos=3)
    # one answer per item, in item order: garbage, one line where many are due, a good one
    answers = iter(["garbage", "0s Assistant: Hello.", None])
    report = run_synthesis(args_for(annotations, tmp_path / "d.jsonl"),
                           Scripted(lambda request: next(answers) or request.rule_text))
    assert report.ok and report.conversations == 1
    assert report.dropped == Counter({"garbage": 1, "missing lines": 1})
    assert [d.id for d in read_dialogues(tmp_path / "d.jsonl")] == ["002-dialogue-0"]


def test_failed_item_is_reported_others_are_written_and_the_exit_code_is_1(tmp_path, capsys):
    annotations = write_world(tmp_path, videos=3)
    calls = iter([None, BackendError("HTTP 503 (gave up after 5 attempts)"), None])
    args = args_for(annotations, tmp_path / "d.jsonl")
    report = run_synthesis(args, Scripted(lambda request: next(calls) or request.rule_text))
    assert report.failed == {"001": "HTTP 503 (gave up after 5 attempts)"}
    assert [d.id for d in read_dialogues(tmp_path / "d.jsonl")] == ["000-dialogue-0", "002-dialogue-0"]
    saved = json.loads((tmp_path / "d.jsonl.report.json").read_text())
    assert saved["failed"] == {"001": "HTTP 503 (gave up after 5 attempts)"} and saved["done"] == 2


def test_max_failures_stops_starting_items_and_names_those_not_done(tmp_path):
    annotations = write_world(tmp_path, videos=4)
    report = run_synthesis(args_for(annotations, tmp_path / "d.jsonl", max_failures=2),
                           Scripted(lambda request: BackendError("cannot connect")))
    assert list(report.failed) == ["000", "001"]
    assert report.not_attempted == ["002", "003"]


# ---------------------------------------------------------------------------------------------------
# resuming


def test_restart_runs_only_missing_items_and_keeps_finished_ones_byte_for_byte(tmp_path):
    annotations = write_world(tmp_path, videos=3)
    out = tmp_path / "d.jsonl"
    run_synthesis(args_for(annotations, out, conversations=2, limit=2))
    before = out.read_bytes()
    report = run_synthesis(args_for(annotations, out, conversations=2))
    assert report.done_before == 2 and report.done == 1
    assert out.read_bytes().startswith(before)
    assert [d.id for d in read_dialogues(out)] == [f"{i:03d}-dialogue-{j}" for i in range(3) for j in range(2)]


def test_restart_after_a_torn_write_drops_the_half_item_and_redoes_it(tmp_path):
    annotations = write_world(tmp_path, videos=3)
    out = tmp_path / "d.jsonl"
    run_synthesis(args_for(annotations, out, limit=2))
    complete = out.read_bytes()
    index = out.with_name("d.jsonl.done")
    lines = index.read_bytes().splitlines(keepends=True)
    # a kill while item 001's index line was written: its records are in OUT, its index line is half there
    index.write_bytes(b"".join(lines[:2]) + lines[2][:10])
    with out.open("ab") as f:
        f.write(b'{"id": "002-dialo')  # and a half record of an item in flight
    report = run_synthesis(args_for(annotations, out))
    assert report.done_before == 1 and report.done == 2
    dialogues = read_dialogues(out)
    assert sorted(d.id for d in dialogues) == ["000-dialogue-0", "001-dialogue-0", "002-dialogue-0"]
    assert out.read_bytes().startswith(complete.split(b"\n")[0] + b"\n")


def test_resume_with_other_settings_is_refused(tmp_path):
    annotations = write_world(tmp_path, videos=1)
    run_synthesis(args_for(annotations, tmp_path / "d.jsonl", queries=3))
    with pytest.raises(ValueError, match="queries=3"):
        run_synthesis(args_for(annotations, tmp_path / "d.jsonl", queries=4))
    run_synthesis(args_for(annotations, tmp_path / "d.jsonl", queries=4, overwrite=True))
    assert sum(t.role == "user" for t in read_dialogues(tmp_path / "d.jsonl")[0].turns) == 4


def test_an_output_not_written_by_synthesis_is_not_touched(tmp_path):
    annotations = write_world(tmp_path, videos=1)
    (tmp_path / "d.jsonl").write_text("precious\n")
    with pytest.raises(ValueError, match="no done-index"):
        run_synthesis(args_for(annotations, tmp_path / "d.jsonl"))
    assert (tmp_path / "d.jsonl").read_text() == "precious\n"


def test_two_jobs_on_one_output_are_refused(tmp_path):
    from livevlm.data.synthesize import SynthesisOutput

    first = SynthesisOutput(tmp_path / "d.jsonl").open({"a": 1})
    try:
        with pytest.raises(ValueError, match="another synthesis job"):
            SynthesisOutput(tmp_path / "d.jsonl").open({"a": 1})
    finally:
        first.close()


def main(argv: list[str]) -> int:
    """`livevlm data synthesize ARGV`."""
    return run(["data", "synthesize", *argv])


def test_command_prints_the_report_and_returns_0(tmp_path, capsys):
    annotations = write_world(tmp_path, videos=2)
    code = main([str(annotations), str(tmp_path / "d.jsonl"), "--task", "dialogue", "--backend", "rules",
                 "--conversations", "2", "--queries", "2", "--no-progress"])
    printed = capsys.readouterr().out
    assert code == 0
    assert "items: 2 (0 done before, 2 done now, 0 failed, 0 not attempted)" in printed
    assert "conversations: 4 written, 0 dropped (none)" in printed


def test_command_rejects_bad_numbers_with_the_flag_named(tmp_path, capsys):
    annotations = write_world(tmp_path, videos=1)
    assert main([str(annotations), str(tmp_path / "d.jsonl"), "--queries", "-1"]) == 2
    assert "--queries" in capsys.readouterr().err


def test_unknown_backend_lists_the_valid_ones():
    with pytest.raises(ValueError, match="rules, transformers, openai"):
        make_backend("vllm", BackendOptions())


# ---------------------------------------------------------------------------------------------------
# the openai backend against a real local HTTP server that fails on purpose


class _Flaky(http.server.BaseHTTPRequestHandler):
    script: list = []  # status codes to answer with (or "html", "cut" for answers that are not JSON), then 200
    seen: list = []  # request bodies
    heard: list = []  # (path, Authorization header) of each request

    def do_POST(self):  # noqa: N802 - http.server's naming
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).seen.append(body)
        type(self).heard.append((self.path, self.headers.get("Authorization")))
        status = type(self).script.pop(0) if type(self).script else 200
        choice = {"text": " ok"} if self.path.endswith("/v1/completions") else {"message": {"content": " Hello."}}
        payload = ({"choices": [choice], "usage": {"prompt_tokens": 7, "completion_tokens": 2}}
                   if status == 200 else {"error": "busy"})
        data = json.dumps(payload).encode()
        content_type = "application/json"
        if status == "html":  # a proxy's error page
            status, content_type, data = 200, "text/html", b"<html>502 Bad Gateway</html>"
        elif status == "cut":  # JSON cut short
            status, data = 200, data[:10]
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture
def flaky_server():
    _Flaky.script, _Flaky.seen, _Flaky.heard = [], [], []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Flaky)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()
    server.server_close()


def openai_backend(url, **kw):
    return OpenAIBackend(BackendOptions(model="m", base_url=url, retries=3, backoff_s=0.01, **kw))


def test_openai_retries_5xx_then_succeeds_and_sends_the_prefill_as_a_final_assistant_message(flaky_server):
    _Flaky.script = [503, 500]
    backend = openai_backend(flaky_server)
    (completion,) = backend.complete([Request([{"role": "user", "content": "Hi"}], "0s Assistant:", 9)],
                                     time.monotonic() + 30)
    assert (completion.text, completion.prompt_tokens, completion.completion_tokens) == (" Hello.", 7, 2)
    assert len(_Flaky.seen) == 3
    assert _Flaky.seen[-1]["messages"][-1] == {"role": "assistant", "content": "0s Assistant:"}
    assert _Flaky.seen[-1]["continue_final_message"] is True and _Flaky.seen[-1]["max_tokens"] == 9


def test_openai_gives_up_after_the_retries(flaky_server):
    _Flaky.script = [503] * 10
    with pytest.raises(BackendError, match="gave up after 4 attempts"):
        openai_backend(flaky_server).complete([Request([{"role": "user", "content": "Hi"}])], time.monotonic() + 30)
    assert len(_Flaky.seen) == 4


def test_openai_does_not_retry_a_client_error(flaky_server):
    _Flaky.script = [400]
    with pytest.raises(BackendError, match="HTTP 400"):
        openai_backend(flaky_server).complete([Request([{"role": "user", "content": "Hi"}])], time.monotonic() + 30)
    assert len(_Flaky.seen) == 1


def test_openai_connection_refused_is_retried_then_reported(flaky_server):
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    backend = openai_backend(f"http://127.0.0.1:{port}/v1")
    with pytest.raises(BackendError, match="cannot connect.*gave up after 4 attempts"):
        backend.complete([Request([{"role": "user", "content": "Hi"}])], time.monotonic() + 30)


def test_openai_stops_at_the_item_deadline(flaky_server):
    _Flaky.script = [503] * 10
    backend = OpenAIBackend(BackendOptions(model="m", base_url=flaky_server, retries=10, backoff_s=0.5))
    start = time.monotonic()
    with pytest.raises(DeadlineExceeded):
        backend.complete([Request([{"role": "user", "content": "Hi"}])], time.monotonic() + 1.0)
    assert time.monotonic() - start < 1.5


def test_openai_retries_an_answer_that_is_not_json(flaky_server):
    _Flaky.script = ["html", "cut"]
    (completion,) = openai_backend(flaky_server).complete([Request([{"role": "user", "content": "Hi"}])],
                                                          time.monotonic() + 30)
    assert completion.text == " Hello." and len(_Flaky.seen) == 3


def test_openai_sends_the_key_from_the_environment_or_a_placeholder(flaky_server, monkeypatch):
    request = Request([{"role": "user", "content": "Hi"}])
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    openai_backend(flaky_server).complete([request], time.monotonic() + 30)
    monkeypatch.setenv("OPENAI_API_KEY", "sk-local")
    openai_backend(flaky_server).complete([request], time.monotonic() + 30)
    assert _Flaky.heard == [("/v1/chat/completions", "Bearer not-needed"), ("/v1/chat/completions", "Bearer sk-local")]


def test_openai_takes_the_url_and_model_from_the_environment(flaky_server, monkeypatch):
    monkeypatch.setenv("OPENAI_BASE_URL", flaky_server)
    monkeypatch.setenv("OPENAI_MODEL", "from-env")
    backend = OpenAIBackend(BackendOptions())
    backend.complete([Request([{"role": "user", "content": "Hi"}])], time.monotonic() + 30)
    assert backend.base_url == flaky_server and _Flaky.seen[0]["model"] == "from-env"


def test_openai_with_a_tokenizer_continues_the_prefill_through_completions(flaky_server, smollm2_dir):
    backend = openai_backend(flaky_server, tokenizer=str(smollm2_dir))
    (completion,) = backend.complete([Request([{"role": "user", "content": "Hi"}], "0s Assistant:", 5,
                                              stop=["\n\n"])], time.monotonic() + 30)
    assert (completion.text, completion.prompt_tokens, completion.completion_tokens) == (" ok", 7, 2)
    assert _Flaky.heard[0][0] == "/v1/completions"
    body = _Flaky.seen[0]
    assert body["prompt"].endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n0s Assistant:")
    assert (body["model"], body["max_tokens"], body["stop"]) == ("m", 5, ["\n\n"])


def test_openai_without_the_package_names_the_install_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "openai", None)  # what `import openai` meets when it is not installed
    with pytest.raises(BackendError, match=r"pip install 'livevlm\[synth\]'"):
        OpenAIBackend(BackendOptions(model="m"))


def test_openai_without_a_model_takes_the_servers_first(flaky_server):
    class Models(_Flaky):
        def do_GET(self):  # noqa: N802
            data = json.dumps({"data": [{"id": "smol"}, {"id": "other"}]}).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Models)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        backend = OpenAIBackend(BackendOptions(base_url=f"http://127.0.0.1:{server.server_address[1]}/v1"))
        assert backend.model == "smol"
    finally:
        server.shutdown()
        server.server_close()


# ---------------------------------------------------------------------------------------------------
# the transformers backend with the real SmolLM2


def test_transformers_batches_with_the_chat_template_and_matches_unbatched_greedy(smollm2_dir):
    backend = TransformersBackend(BackendOptions(model=str(smollm2_dir), batch_size=4))
    try:
        requests = [Request([{"role": "user", "content": "Name a colour."}], "Sure:", 6),
                    Request([{"role": "user", "content": "Say hello to the user in one short sentence."}], "", 6)]
        assert backend.prompt_text(requests[0]).endswith("<|im_start|>assistant\nSure:")
        batched = backend.generate(requests)
        alone = [backend.generate([r])[0] for r in requests]
        assert [c.text for c in batched] == [c.text for c in alone]
        assert all(0 < c.completion_tokens <= 6 and c.prompt_tokens > 0 for c in batched)
    finally:
        backend.close()


def test_transformers_dialogue_on_world_steps_loads_in_the_training_dataset(tmp_path, smollm2_dir, tiny_tokenizer):
    annotations = write_world(tmp_path / "world", videos=2, duration=10.0)
    out = tmp_path / "d.jsonl"
    args = args_for(annotations, out, backend="transformers", model=str(smollm2_dir), queries=1, max_tokens=24,
                    conversations=2, concurrency=2, batch_size=4, fill="guided")
    start = time.perf_counter()
    report = run_synthesis(args)
    print(f"transformers: {report.done} items in {time.perf_counter() - start:.1f} s, {report.completion_tokens} "
          f"tokens, dropped {dict(report.dropped)}")
    assert report.ok and report.done == 2 and report.completion_tokens > 0
    assert report.conversations + sum(report.dropped.values()) == 4
    assert report.conversations >= 1, report.examples
    assert len(read_dialogues(out)) == report.conversations
    features_for(out, tmp_path / "cache")
    register_placeholder(tiny_tokenizer)
    dataset = StreamDataset(out, StreamFormat(tiny_tokenizer, FormatConfig(), tokens_per_frame=2),
                            cache_dir=tmp_path / "cache")
    assert len(dataset) == report.conversations and dataset[0].frame_tokens.shape[0] == 20
