"""Judges: how well a model's reply says what a ground-truth turn says, as a score from 1 to 5.

Free-running evaluation (`free_running.evaluate_free_running`) asks a judge for `judge_score` (each matched
response against its turn) and for PAUC's curve (`pauc`: the replies given so far in a turn's span against
the turn). Two are built in, in `JUDGES`:

- `words`: no model. Word F1 (`free_running.word_f1`, bags of lower-case words) mapped to the nearest of
  1–5 on a straight line, 1 + 4·F1 rounded half up: F1 < 0.125 → 1, < 0.375 → 2, < 0.625 → 3, < 0.875 → 4,
  else 5. Deterministic and instant, for tests and offline use; it counts words, not meaning.
- `openai`: an LLM behind any OpenAI-compatible server, through the synthesis backend
  (`data.backends.OpenAIBackend`: its client, concurrency, retries with backoff and error types). The
  instruction is ProactiveVideoQA's 5-point one in substance: how much of the ground truth's key
  information the reply covers.

Anything with `identity`, `score` and `close` is a judge (the `Judge` protocol).
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

LOWEST, HIGHEST = 1, 5  # the judges' scale


class JudgeError(RuntimeError):
    """A judge could not score (unreachable after its retries, or an answer that is not a score); the message
    names the server and what to do."""


@dataclass(frozen=True)
class JudgeItem:
    """One thing to score: a reply against the ground-truth turn it should say, and the user's request it
    answers ("" when there is none)."""

    response: str
    reference: str
    question: str = ""


class Judge(Protocol):
    """Scores replies against ground-truth turns."""

    @property
    def identity(self) -> str:
        """Which judge this is ("words", "openai:MODEL"); stored with scores so that a results file
        judged by another one is judged again."""
        ...

    def score(self, items: Sequence[JudgeItem]) -> list[int]:
        """A score in 1–5 for each item, in order.

        Raises:
            JudgeError: the judge could not score (the message says why and what to do).
        """
        ...

    def close(self) -> None:
        """Release connections and threads."""
        ...


def words_score(response: str, reference: str) -> int:
    """The `words` judge's score: 1 + 4·(word F1), rounded half up."""
    from livevlm.evaluation.free_running import word_f1

    return LOWEST + math.floor((HIGHEST - LOWEST) * word_f1(response, reference) + 0.5)


class WordJudge:
    """Word F1 mapped to 1–5 (`words_score`): no model, no network."""

    identity = "words"

    def score(self, items: Sequence[JudgeItem]) -> list[int]:
        return [words_score(item.response, item.reference) for item in items]

    def close(self) -> None:
        pass


INSTRUCTION = (
    "You evaluate a video assistant. Given a user's request, the ground-truth answer and the assistant's "
    "answer, rate how much of the ground truth's key information the assistant's answer gives:\n"
    "5: all of it, correct;\n"
    "4: all key information, with small inaccuracies or omissions;\n"
    "3: some of it right, but key points missing or wrong;\n"
    "2: mostly wrong or irrelevant, with a little that is right;\n"
    "1: wrong, irrelevant or empty.\n"
    "Reply with the number only.")


def prompt(item: JudgeItem) -> str:
    """The user message the LLM judge scores."""
    question = f"User's request: {item.question}\n" if item.question else ""
    return f"{question}Ground-truth answer: {item.reference}\nAssistant's answer: {item.response}"


def parse_score(text: str) -> int | None:
    """The first standalone digit 1–5 of the judge's answer ("4", "Score: 4/5"), or None."""
    found = re.search(r"(?<![\d.])([1-5])(?![\d.])", text)
    return int(found.group(1)) if found else None


class LLMJudge:
    """An LLM judge behind an OpenAI-compatible chat-completions server (vLLM, llama.cpp, Ollama, OpenAI).

    Args:
        base_url: the server's ".../v1" ("" = $OPENAI_BASE_URL, else http://127.0.0.1:8000/v1).
        model: the model to ask ("" = $OPENAI_MODEL, else the first one the server lists).
        api_key: "" = $OPENAI_API_KEY, else a placeholder that local servers ignore.
        retries, backoff_s, request_timeout_s, concurrency: as the synthesis backend's options.
    Raises:
        JudgeError: the openai package is missing, or (no model named) the server cannot be reached.
    """

    def __init__(self, base_url: str = "", model: str = "", api_key: str = "", *, retries: int = 4,
                 backoff_s: float = 1.0, request_timeout_s: float = 60.0, concurrency: int = 4) -> None:
        from livevlm.data.backends import BackendError, BackendOptions, OpenAIBackend

        options = BackendOptions(model=model, base_url=base_url, api_key=api_key, temperature=0.0,
                                 concurrency=concurrency, retries=retries, backoff_s=backoff_s,
                                 request_timeout_s=request_timeout_s)
        self.options = options
        try:
            self._backend = OpenAIBackend(options)
        except BackendError as error:
            raise JudgeError(_judge_message(error)) from None
        self.base_url = self._backend.base_url

    @property
    def identity(self) -> str:
        return f"openai:{self._backend.model}"

    def score(self, items: Sequence[JudgeItem]) -> list[int]:
        from livevlm.data.backends import BackendError, Request

        if not items:
            return []
        requests = [Request([{"role": "system", "content": INSTRUCTION}, {"role": "user", "content": prompt(item)}],
                            max_tokens=8) for item in items]
        try:
            completions = self._backend.complete(requests, time.monotonic() + self._time_limit(len(items)))
        except BackendError as error:
            raise JudgeError(_judge_message(error)) from None
        scores = [parse_score(completion.text) for completion in completions]
        for completion, found in zip(completions, scores, strict=True):
            if found is None:
                raise JudgeError(f"judge {self.identity} at {self.base_url} answered {completion.text[:80]!r}, not a "
                                 f"score {LOWEST}–{HIGHEST}; name a model that follows instructions (--judge-model)")
        return [found for found in scores if found is not None]

    def _time_limit(self, count: int) -> float:
        """Seconds for `count` items: every attempt of every wave of `concurrency` requests, with backoffs."""
        o = self.options
        waves = math.ceil(count / max(1, o.concurrency))
        return waves * (o.retries + 1) * o.request_timeout_s + o.backoff_s * 2 ** (o.retries + 1)

    def close(self) -> None:
        self._backend.close()


def _judge_message(error: Exception) -> str:
    return (f"the judge failed: {error} (the judge's server is set by --base-url, --judge-model and --api-key; "
            "--judge words needs none)")


JUDGES: dict[str, Callable[..., Judge]] = {
    "words": lambda **options: WordJudge(),
    "openai": LLMJudge,
}


def make_judge(name: str, **options: object) -> Judge:
    """The judge registered under `name`, built with `options` (LLMJudge's arguments for "openai").

    Raises:
        ValueError: an unknown name (listing the valid ones), or options the `words` judge does not take.
        JudgeError: the judge cannot start.
    """
    if name not in JUDGES:
        raise ValueError(f"unknown judge {name!r}; choose one of {', '.join(JUDGES)}")
    if name == "words" and any(options.values()):
        raise ValueError(f"the words judge takes no options, got {', '.join(k for k, v in options.items() if v)}")
    return JUDGES[name](**options)
