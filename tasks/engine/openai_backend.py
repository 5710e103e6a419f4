"""The `openai` backend: a model behind any OpenAI-compatible server (vLLM, TGI, llama.cpp).

The server batches and manages its own memory, so this backend only sends one
`POST /chat/completions` per request, concurrently, and turns every answer or failure into a
`Completion`. Nothing is loaded or connected in `__init__`: the HTTP client is made on first
use, so a backend built before a worker forks is safe to use in the child.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import httpx

from tasks.engine.chat import ChatTemplate
from tasks.engine.types import (
    BackendMisconfigured,
    BackendUnavailable,
    Completion,
    GenerationRequest,
    estimated_tokens,
)

log = logging.getLogger(__name__)

# Retried: the request never reached the model, or the server said to come back later.
# `RemoteProtocolError` is a server closing a kept-alive connection without answering.
# A read timeout is not retried: the server may still be generating, and a second send
# would double its load; the request's time budget is spent anyway.
RETRIED_TRANSPORT_ERRORS: tuple[type[httpx.TransportError], ...] = (
    httpx.ConnectError, httpx.ConnectTimeout, httpx.RemoteProtocolError)
RETRIED_STATUS = frozenset({429})  # and every 5xx; other 4xx are the request's own fault

# Text the server returned, as it reached `Completion.finish_reason`; anything else is an error.
FINISH_REASONS = {"stop": "stop", "eos": "stop", "eos_token": "stop", "stop_sequence": "stop",
                  "length": "length"}
SERVER_MESSAGE_CHARS = 500
TEMPLATE_TOKENS_PER_MESSAGE = 7  # a chat template's role markers around one message


@dataclass
class _Retry:
    """One attempt failed in a way worth repeating."""

    reason: str
    retry_after_s: float | None = None


class OpenAIBackend:
    """Chat completions from an OpenAI-compatible server.

    `count_prompt_tokens` uses the model's own tokenizer when `tokenizer_path` is given;
    without it, it estimates `estimated_tokens(content)` plus `TEMPLATE_TOKENS_PER_MESSAGE`
    per message (a chat template adds a few tokens per message), on the long side: the engine
    may refuse a prompt that would just have fit, rather than send one that overflows
    `context_window`.

    Timeouts: each attempt waits at most `timeout_s`, and never past `request.deadline`.
    httpx applies that limit to connecting and to each read, which for a non-streaming
    answer (sent whole once generated) bounds the call.
    """

    kind = "openai"

    def __init__(self, base_url: str, model: str, api_key: str | None = None,
                 timeout_s: float = 60, max_retries: int = 3, max_concurrency: int = 16,
                 context_window: int = 4096, tokenizer_path: str | None = None,
                 backoff_base_s: float = 0.5, backoff_cap_s: float = 8.0) -> None:
        self.base_url = _checked_base_url(base_url)
        _check_settings(model, api_key, timeout_s, max_retries, max_concurrency, context_window,
                        backoff_base_s, backoff_cap_s)
        self.model = model
        self.model_id = f"openai:{model}@{_without_credentials(self.base_url)}"
        self.timeout_s = float(timeout_s)
        self.max_retries = max_retries
        self.max_concurrency = max_concurrency
        self.context_window = context_window
        self.tokenizer_path = tokenizer_path
        self.backoff_base_s = backoff_base_s
        self.backoff_cap_s = backoff_cap_s
        self._api_key = api_key
        self._lock = threading.Lock()  # guards the lazily made client, pool and tokenizer
        self._warm_up_lock = threading.Lock()
        self._client: httpx.Client | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._tokenizer: Any = None
        self._chat: ChatTemplate | None = None
        self._ready = False

    def __repr__(self) -> str:
        return f"OpenAIBackend({self.model_id!r})"  # never the API key

    # --- lifecycle ---------------------------------------------------------------------------

    def warm_up(self) -> None:
        """Load the tokenizer (if any) and check the server lists `model`. Idempotent.

        Raises BackendUnavailable naming the URL when it does not answer (retried by the
        stage), BackendMisconfigured when it answers but does not serve `model` or refuses
        the request (an operator's to fix)."""
        if self._ready:
            return
        with self._warm_up_lock:
            if self._ready:
                return
            if self.tokenizer_path:
                self._loaded_tokenizer()
            offered = self._served_models()
            if self.model not in offered:
                raise BackendMisconfigured(
                    f"model {self.model!r} is not served at {self._public_url('/models')}; "
                    f"it offers {sorted(offered)}")
            self._ready = True

    def close(self) -> None:
        """Release the HTTP connections and worker threads; the backend can be used again."""
        with self._lock:
            executor, client = self._executor, self._client
            self._executor, self._client, self._ready = None, None, False
        if executor is not None:
            executor.shutdown(wait=True)
        if client is not None:
            client.close()

    def __enter__(self) -> OpenAIBackend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- Backend protocol --------------------------------------------------------------------

    def count_prompt_tokens(self, messages: list[dict[str, str]]) -> int:
        """The prompt's tokens with the chat template, or the conservative estimate (class doc)."""
        if not self.tokenizer_path:
            return sum(estimated_tokens(m.get("content") or "") + TEMPLATE_TOKENS_PER_MESSAGE
                       for m in messages)
        return len(self._loaded_chat().prompt_ids(messages))

    def kv_bytes_per_token(self) -> int | None:
        return None  # the server manages its own KV cache

    def _estimated_tokens(self, text: str) -> int:
        """A text's tokens, by the model's tokenizer when given, else estimated on the long
        side as a prompt's are (class doc)."""
        if not text:
            return 0
        if not self.tokenizer_path:
            return estimated_tokens(text)
        return len(self._loaded_tokenizer()(text, add_special_tokens=False)["input_ids"])

    def generate(self, batch: list[GenerationRequest]) -> list[Completion]:
        """One completion per request, in order; each request is its own HTTP call, sent
        concurrently (at most `max_concurrency` in flight across all callers)."""
        if not batch:
            return []
        executor = self._pool()
        futures = [executor.submit(self._complete_safely, request, len(batch)) for request in batch]
        return [future.result() for future in futures]

    # --- one request -------------------------------------------------------------------------

    def _complete_safely(self, request: GenerationRequest, batch_size: int) -> Completion:
        try:
            return self._complete(request, batch_size)
        except Exception as exc:  # a bug here must not lose the other requests of the batch
            log.exception("openai backend failed on request %s", request.request_id)
            return self._failed(request, batch_size, f"internal error: {exc!r}")

    def _complete(self, request: GenerationRequest, batch_size: int) -> Completion:
        body = self._body(request)
        queue_wait_s: float | None = None
        reason = "no attempt made"
        for attempt in range(self.max_retries + 1):
            if self._time_left_s(request) <= 0:
                return self._past_deadline(request, batch_size, queue_wait_s, reason)
            if queue_wait_s is None:
                queue_wait_s = max(0.0, time.monotonic() - request.submitted_at)
            outcome = self._attempt(request, body, batch_size, queue_wait_s)
            if isinstance(outcome, Completion):
                return outcome
            reason = outcome.reason
            if attempt < self.max_retries and not self._backoff(attempt, outcome, request):
                return self._past_deadline(request, batch_size, queue_wait_s, reason)
        return self._completion(request, batch_size, finish_reason="unavailable",
                                error=f"gave up after {self.max_retries + 1} attempts: {reason}",
                                queue_wait_s=queue_wait_s or 0.0)

    def _attempt(self, request: GenerationRequest, body: dict[str, Any], batch_size: int,
                 queue_wait_s: float) -> Completion | _Retry:
        url = f"{self.base_url}/chat/completions"
        timeout_s = self._time_left_s(request)
        started = time.monotonic()
        try:
            response = self._http().post(url, json=body, timeout=timeout_s)
        except RETRIED_TRANSPORT_ERRORS as exc:
            return _Retry(f"{type(exc).__name__} from {self._public_url('/chat/completions')}: {exc}")
        except httpx.TimeoutException:
            waited_s = time.monotonic() - started
            if request.deadline is not None and request.deadline - started <= self.timeout_s:
                return self._past_deadline(request, batch_size, queue_wait_s,
                                           f"no answer after {waited_s:.1f}s", waited_s)
            return self._failed(request, batch_size, f"no answer within timeout_s={self.timeout_s}",
                                queue_wait_s, waited_s)
        except httpx.HTTPError as exc:
            return self._failed(request, batch_size, f"{type(exc).__name__}: {exc}", queue_wait_s)
        compute_s = time.monotonic() - started
        status = response.status_code
        if status in RETRIED_STATUS or status >= 500:
            return _Retry(f"HTTP {status}: {_server_message(response)}", _retry_after_s(response))
        if status >= 400:
            return self._failed(request, batch_size, f"HTTP {status}: {_server_message(response)}",
                                queue_wait_s, compute_s)
        return self._parsed(request, batch_size, response, queue_wait_s, compute_s)

    def _body(self, request: GenerationRequest) -> dict[str, Any]:
        policy = request.policy
        body: dict[str, Any] = {
            "model": self.model, "messages": request.messages, "temperature": policy.temperature,
            "top_p": policy.top_p, "max_tokens": policy.max_new_tokens, "seed": request.seed}
        if policy.stop:
            body["stop"] = list(policy.stop)
        if policy.ignore_eos:  # vLLM's and TGI's extension; sent only when the policy asks
            body["ignore_eos"] = True
        if request.json_schema is not None:
            body["response_format"] = {"type": "json_schema", "json_schema": {
                "name": "output", "schema": request.json_schema, "strict": True}}
        return body

    def _parsed(self, request: GenerationRequest, batch_size: int, response: httpx.Response,
                queue_wait_s: float, compute_s: float) -> Completion:
        # A malformed answer is not retried: the same server would most likely send it again.
        try:
            data = response.json()
            choice = data["choices"][0]
            message = choice["message"]
            text = message["content"] or ""
            refusal = message.get("refusal")
            usage = data.get("usage") or {}
            prompt_tokens = int(usage.get("prompt_tokens") or request.prompt_tokens)
            # Without the server's count, the text's estimate: never 0 for text that came back
            completion_tokens = int(usage.get("completion_tokens")
                                    or self._estimated_tokens(text))
        except (ValueError, KeyError, IndexError, TypeError, AttributeError) as exc:
            return self._failed(request, batch_size, f"malformed response ({exc!r}): "
                                f"{response.text[:SERVER_MESSAGE_CHARS]}", queue_wait_s, compute_s)
        if refusal and not text:  # the server's model declined: not an empty answer
            return self._failed(request, batch_size, f"the server's model refused: "
                                f"{str(refusal)[:SERVER_MESSAGE_CHARS]}", queue_wait_s, compute_s)
        server_reason = choice.get("finish_reason") or "stop"
        finish_reason = FINISH_REASONS.get(server_reason, "error")
        error = None if finish_reason != "error" else f"server finish_reason {server_reason!r}"
        return self._completion(request, batch_size, text=text, finish_reason=finish_reason,
                                error=error, prompt_tokens=prompt_tokens,
                                completion_tokens=completion_tokens, queue_wait_s=queue_wait_s,
                                compute_s=compute_s)

    # --- completions that carry no answer ----------------------------------------------------

    def _failed(self, request: GenerationRequest, batch_size: int, error: str,
                queue_wait_s: float = 0.0, compute_s: float = 0.0) -> Completion:
        return self._completion(request, batch_size, finish_reason="error", error=error,
                                queue_wait_s=queue_wait_s, compute_s=compute_s)

    def _past_deadline(self, request: GenerationRequest, batch_size: int,
                       queue_wait_s: float | None, last_failure: str,
                       compute_s: float = 0.0) -> Completion:
        sent = "before the request was sent" if queue_wait_s is None else \
            f"before an answer came (last: {last_failure})"
        return self._completion(request, batch_size, finish_reason="deadline",
                                error=f"deadline passed {sent}", queue_wait_s=queue_wait_s or 0.0,
                                compute_s=compute_s)

    def _completion(self, request: GenerationRequest, batch_size: int, **fields: Any) -> Completion:
        return Completion(request_id=request.request_id, backend=self.kind, model=self.model_id,
                          batch_size=batch_size, constrained=request.json_schema is not None,
                          prompt_tokens=fields.pop("prompt_tokens", request.prompt_tokens), **fields)

    # --- timing and retries ------------------------------------------------------------------

    def _time_left_s(self, request: GenerationRequest) -> float:
        if request.deadline is None:
            return self.timeout_s
        return min(self.timeout_s, request.deadline - time.monotonic())

    def _backoff(self, attempt: int, retry: _Retry, request: GenerationRequest) -> bool:
        """Sleep before the next attempt: capped exponential backoff with full jitter, or longer
        if the server asked (Retry-After, capped too). False if that would pass the deadline."""
        delay_s = random.uniform(0, min(self.backoff_cap_s, self.backoff_base_s * 2 ** attempt))
        if retry.retry_after_s is not None:
            delay_s = max(delay_s, min(retry.retry_after_s, self.backoff_cap_s))
        if request.deadline is not None and time.monotonic() + delay_s >= request.deadline:
            return False
        log.info("retrying request %s in %.2fs: %s", request.request_id, delay_s, retry.reason)
        time.sleep(delay_s)
        return True

    def _served_models(self) -> set[str]:
        url = f"{self.base_url}/models"
        reason = "no attempt made"
        for attempt in range(self.max_retries + 1):
            try:
                response = self._http().get(url, timeout=self.timeout_s)
            except httpx.HTTPError as exc:
                reason = f"{type(exc).__name__}: {exc}"
            else:
                if response.status_code < 400:
                    return _model_ids(response, self._public_url("/models"))
                reason = f"HTTP {response.status_code}: {_server_message(response)}"
                if response.status_code not in RETRIED_STATUS and response.status_code < 500:
                    raise BackendMisconfigured(f"OpenAI-compatible server at "
                                               f"{self._public_url('/models')} refused: {reason}")
            if attempt < self.max_retries:
                time.sleep(random.uniform(0, min(self.backoff_cap_s,
                                                 self.backoff_base_s * 2 ** attempt)))
        raise BackendUnavailable(f"OpenAI-compatible server at {self._public_url('/models')} "
                                 f"did not answer: {reason}")

    # --- shared resources --------------------------------------------------------------------

    def _http(self) -> httpx.Client:
        client = self._client
        if client is None:
            with self._lock:
                if self._client is None:
                    headers = {"Authorization": f"Bearer {self._api_key}"} if self._api_key else {}
                    limits = httpx.Limits(max_connections=self.max_concurrency,
                                          max_keepalive_connections=self.max_concurrency)
                    self._client = httpx.Client(headers=headers, limits=limits,
                                                timeout=self.timeout_s)
                client = self._client
        return client

    def _pool(self) -> ThreadPoolExecutor:
        executor = self._executor
        if executor is None:
            with self._lock:
                if self._executor is None:
                    self._executor = ThreadPoolExecutor(self.max_concurrency,
                                                        thread_name_prefix="openai-backend")
                executor = self._executor
        return executor

    def _loaded_tokenizer(self) -> Any:
        if self._tokenizer is None:
            with self._lock:
                if self._tokenizer is None and self.tokenizer_path:
                    tokenizer = _load_tokenizer(self.tokenizer_path)
                    self._chat = ChatTemplate(tokenizer, self.tokenizer_path)
                    self._tokenizer = tokenizer
        return self._tokenizer

    def _loaded_chat(self) -> ChatTemplate:
        self._loaded_tokenizer()
        assert self._chat is not None, "a chat template needs tokenizer_path"
        return self._chat

    def _public_url(self, path: str) -> str:
        return _without_credentials(self.base_url) + path


def _checked_base_url(base_url: str) -> str:
    """`base_url` without a trailing slash; ValueError unless it is http(s) with a host."""
    parts = urlsplit(base_url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"base_url must be an http(s) URL such as http://127.0.0.1:8000/v1, "
                         f"got {base_url.rsplit('@', 1)[-1]!r}")
    if parts.query or parts.fragment:
        raise ValueError(f"base_url must have no query or fragment, got "
                         f"{_without_credentials(base_url)}?{parts.query}#{parts.fragment}")
    return urlunsplit((parts.scheme, parts.netloc, parts.path.rstrip("/"), "", ""))


def _check_settings(model: str, api_key: str | None, timeout_s: float, max_retries: int,
                    max_concurrency: int, context_window: int, backoff_base_s: float,
                    backoff_cap_s: float) -> None:
    problems = [
        (not model or not model.strip(), f"model must be a non-empty name, got {model!r}"),
        (api_key is not None and not api_key.strip(), "api_key must be None or non-empty"),
        (not timeout_s > 0, f"timeout_s must be > 0, got {timeout_s}"),
        (max_retries < 0, f"max_retries must be >= 0, got {max_retries}"),
        (max_concurrency < 1, f"max_concurrency must be >= 1, got {max_concurrency}"),
        (context_window < 1, f"context_window must be >= 1, got {context_window}"),
        (not backoff_base_s > 0, f"backoff_base_s must be > 0, got {backoff_base_s}"),
        (not backoff_cap_s >= backoff_base_s,
         f"backoff_cap_s must be >= backoff_base_s ({backoff_base_s}), got {backoff_cap_s}"),
    ]
    for failed, message in problems:
        if failed:
            raise ValueError(message)


def _without_credentials(url: str) -> str:
    """The URL without user:password@, query or fragment: fit for ids, logs and errors."""
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc.rsplit("@", 1)[-1], parts.path, "", ""))


def _server_message(response: httpx.Response) -> str:
    """The error text of an OpenAI, vLLM or TGI error body, else the raw body, shortened."""
    try:
        data = response.json()
    except ValueError:
        return response.text[:SERVER_MESSAGE_CHARS] or response.reason_phrase
    if isinstance(data, dict):
        error = data.get("error")
        message = error.get("message") if isinstance(error, dict) else error
        message = message or data.get("message") or data.get("detail")
        if message:
            return str(message)[:SERVER_MESSAGE_CHARS]
    return response.text[:SERVER_MESSAGE_CHARS]


def _retry_after_s(response: httpx.Response) -> float | None:
    try:
        return max(0.0, float(response.headers["retry-after"]))
    except (KeyError, ValueError):
        return None  # absent, or an HTTP date: full jitter alone decides


def _model_ids(response: httpx.Response, url: str) -> set[str]:
    try:
        return {str(entry["id"]) for entry in response.json()["data"]}
    except (ValueError, KeyError, TypeError) as exc:
        raise BackendUnavailable(f"{url} did not return an OpenAI model list ({exc!r}): "
                                 f"{response.text[:SERVER_MESSAGE_CHARS]}") from exc


def _load_tokenizer(path: str) -> Any:
    from transformers import AutoTokenizer  # heavy: only when a tokenizer path is configured

    return AutoTokenizer.from_pretrained(path)
