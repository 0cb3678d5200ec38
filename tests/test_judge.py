"""Judges (the word-F1 one's exact scores, the LLM one against a local OpenAI-compatible server) and a
dialogue's judge score and PAUC by hand (`free_running.judge_record`)."""

import http.server
import json
import socket
import threading

import pytest

from livevlm.data.schema import Dialogue, Turn
from livevlm.evaluation.free_running import judge_record, summarise
from livevlm.evaluation.judge import JudgeError, JudgeItem, LLMJudge, WordJudge, make_judge, parse_score


@pytest.mark.parametrize(("response", "reference", "score"), [
    ("A red circle appears.", "A red circle appears.", 5),  # F1 1: 1 + 4 = 5
    ("A red circle appears.", "A green circle appears on the left.", 3),  # F1 6/11: 1 + 4·0.545 = 3.18 → 3
    ("Red, red!", "red", 4),  # F1 2/3: 1 + 2.67 = 3.67 → 4
    ("A red circle appears. A green square appears.", "A red circle appears.", 4),  # F1 2/3 → 4
    ("The blue star leaves.", "A red circle appears.", 1),  # F1 0 → 1
    ("red", "a red circle appears now", 2),  # F1 2·1·(1/5)/(1 + 1/5) = 1/3: 1 + 1.33 = 2.33 → 2
])
def test_the_words_judge_maps_word_f1_to_the_nearest_of_1_to_5(response, reference, score):
    assert WordJudge().score([JudgeItem(response, reference)]) == [score]


@pytest.mark.parametrize(("answer", "score"), [("4", 4), ("Score: 2/5", 2), (" 5\n", 5), ("10", None),
                                               ("3.5", None), ("none", None)])
def test_parse_score_takes_the_first_standalone_digit_1_to_5(answer, score):
    assert parse_score(answer) == score


def test_an_unknown_judge_lists_the_valid_ones():
    with pytest.raises(ValueError, match="choose one of words, openai"):
        make_judge("bleu")


# ---------------------------------------------------------------------------------------------------
# the LLM judge against a local OpenAI-compatible server


class _Scorer(http.server.BaseHTTPRequestHandler):
    """Answers 5 when the assistant's answer is the ground truth, else "Score: 2"."""

    seen: list = []

    def do_POST(self):  # noqa: N802 - http.server's naming
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).seen.append(body)
        user = body["messages"][-1]["content"]
        truth = user.split("Ground-truth answer: ")[1].split("\n")[0]
        content = "5" if user.endswith(f"Assistant's answer: {truth}") else "Score: 2"
        data = json.dumps({"choices": [{"message": {"content": content}}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture
def scorer_url():
    _Scorer.seen = []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Scorer)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()
    server.server_close()


def test_the_llm_judge_reads_the_servers_scores(scorer_url):
    judge = LLMJudge(scorer_url, model="judge-m", backoff_s=0.01)
    items = [JudgeItem("A red circle.", "A red circle.", "Narrate."), JudgeItem("A blue star.", "A red circle.")]
    assert judge.score(items) == [5, 2]
    assert judge.identity == "openai:judge-m"
    # the requests go out concurrently: find the first item's by its request, not by arrival order
    first = next(body for body in _Scorer.seen if "Narrate." in body["messages"][1]["content"])
    assert (first["model"], first["temperature"], first["messages"][0]["role"]) == ("judge-m", 0.0, "system")
    assert first["messages"][1]["content"].startswith("User's request: Narrate.\nGround-truth answer: A red circle.")
    judge.close()


def test_an_unreachable_llm_judge_is_retried_then_named():
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    judge = LLMJudge(f"http://127.0.0.1:{port}/v1", model="m", retries=1, backoff_s=0.01)
    with pytest.raises(JudgeError, match=rf"127\.0\.0\.1:{port}/v1/chat/completions: cannot connect.*gave up after 2"):
        judge.score([JudgeItem("a", "b")])
    judge.close()


# ---------------------------------------------------------------------------------------------------
# one dialogue's judge score and PAUC, by hand with the words judge


def test_judge_record_by_hand():
    """Turns at 2 s and 6 s of a 10-s stream: spans [2, 6) and [6, 10). The model said "A red circle
    appears." at 2.5 s (matched to the first turn), "A green square appears." at 4 s and "The blue star
    leaves." at 9 s (3 s off the second turn: unmatched at ±1 s).

    judge_score: the one pair, identical words: 5.
    PAUC, first turn: at 2.5 s the reply alone (F1 1 → 5, height 1); at 4 s both replies joined (F1 2/3 → 4,
    height 0.75). ω 0: (0.5·0.25 + 1.5·1 + 2·0.75)/4 = 3.125/4; ω 0.5 (replies at 2.25, 3): (0.25·0.25 + 0.75·1
    + 3·0.75)/4 = 3.0625/4; ω 1: 0.75. Second turn: "The blue star leaves." at 9 s (height 1). ω 0: (3·0.25 +
    1·1)/4 = 1.75/4; ω 0.5 (at 7.5): (1.5·0.25 + 2.5·1)/4 = 2.875/4; ω 1: 1. The mean of the two turns.
    """
    turns = [Turn("user", 0.0, "Please narrate."), Turn("assistant", 0.0, "Sure."),
             Turn("assistant", 2.0, "A red circle appears."), Turn("assistant", 6.0, "The blue star leaves.")]
    dialogue = Dialogue("d", "v.mp4", 2.0, turns, duration_s=10.0, task="narration")
    record = {"id": "d", "task": "narration", "turns": 2, "responses": 3, "matched": 1, "duplicates": 0,
              "offset_sum_s": 0.5, "word_f1_sum": 1.0, "answers": 1, "answer_word_f1_sum": 0.0, "end_s": 10.0,
              "said": [{"time_s": 2.5, "text": "A red circle appears."},
                       {"time_s": 4.0, "text": "A green square appears."},
                       {"time_s": 9.0, "text": "The blue star leaves."}]}
    judged = judge_record(record, dialogue, WordJudge(), tolerance_s=1.0)
    assert (judged["judge"], judged["judged"], judged["judge_score_sum"]) == ("words", 1, 5)
    result = summarise([judged])
    assert result["judge"] == "words" and result["judge_score"] == 5.0
    assert result["pauc"] == pytest.approx({"0": (3.125 + 1.75) / 8, "0.5": (3.0625 + 2.875) / 8, "1": 1.75 / 2})
