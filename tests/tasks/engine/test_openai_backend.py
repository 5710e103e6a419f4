"""The `openai` backend against the repo's OpenAI-compatible server serving the real model.

The model is SmolLM2-135M-Instruct on CPU, greedy and a few tokens long. Between the backend
and the server sits `_FaultProxy`: it records what reached the server and injects the faults
(503s, a hang) that a healthy local server never produces.
"""

from __future__ import annotations

import json
import re
import socket
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest

from ops.openai_server import OpenAICompatibleServer, serve_in_thread
from tasks.engine.engine import BatchLimits, GenerationEngine
from tasks.engine.hf import TransformersBackend
from tasks.engine.openai_backend import OpenAIBackend
from tasks.engine.types import (
    BackendMisconfigured,
    BackendUnavailable,
    Completion,
    DecodingPolicy,
    GenerationRequest,
)

MODEL_DIR = Path.home() / ".cache" / "sluice" / "models" / "SmolLM2-135M-Instruct"
SERVED_NAME = "smollm2-test"
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


class _ReferenceBackend:
    """The real model behind the server: the batching engine over the transformers backend,
    recording every request that reaches it."""

    def __init__(self, engine: GenerationEngine) -> None:
        self.engine = engine
        self.kind, self.model_id = engine.kind, engine.model_id
        self.context_window = engine.context_window
        self.received: list[GenerationRequest] = []

    def warm_up(self) -> None:
        self.engine.warm_up()

    def count_prompt_tokens(self, messages: list[dict[str, str]]) -> int:
        return self.engine.backend.count_prompt_tokens(messages)

    def kv_bytes_per_token(self) -> int | None:
        return self.engine.backend.kv_bytes_per_token()

    def generate(self, batch: list[GenerationRequest]) -> list[Completion]:
        self.received.extend(batch)
        return self.engine.generate(batch)


class _FaultProxy:
    """Forwards to the real server and records every request; can inject faults: answer 503
    `fail_next` times, hold a request until `release` is set, wait until `gather` requests
    are in flight together before forwarding any (proof that they were sent concurrently), or
    `rewrite` the server's JSON answer (what other servers send)."""

    def __init__(self, upstream_url: str) -> None:
        self.upstream_root = upstream_url.removesuffix("/v1")
        self.requests: list[dict[str, Any]] = []
        self.fail_next = 0
        self.hang = False
        self.gather = 1
        self.peak_in_flight = 0
        self.release = threading.Event()
        self.rewrite: Callable[[dict[str, Any]], dict[str, Any]] | None = None
        self._in_flight = 0
        self._changed = threading.Condition()
        self._client = httpx.Client(timeout=60)
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _proxy_handler(self))
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}/v1"

    def posts(self) -> list[dict[str, Any]]:
        return [r for r in self.requests if r["method"] == "POST"]

    def relay(self, method: str, path: str, headers: dict[str, str], body: bytes) -> tuple[int, bytes]:
        with self._changed:
            self.requests.append({"method": method, "path": path, "headers": headers,
                                  "json": json.loads(body) if body else None})
            if self.fail_next > 0:
                self.fail_next -= 1
                return 503, b'{"error": {"message": "injected overload"}}'
            self._in_flight += 1
            self.peak_in_flight = max(self.peak_in_flight, self._in_flight)
            self._changed.notify_all()
            self._changed.wait_for(lambda: self._in_flight >= self.gather, timeout=10)
        try:
            if self.hang:
                self.release.wait(timeout=10)
                return 504, b'{"error": {"message": "injected hang"}}'
            response = self._client.request(method, self.upstream_root + path, content=body,
                                            headers={"Content-Type": "application/json"})
            if self.rewrite is not None and method == "POST" and response.status_code == 200:
                return 200, json.dumps(self.rewrite(response.json())).encode()
            return response.status_code, response.content
        finally:
            with self._changed:
                self._in_flight -= 1

    def close(self) -> None:
        self.release.set()
        self._server.shutdown()
        self._server.server_close()
        self._client.close()


def _proxy_handler(proxy: _FaultProxy) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self._relay("GET")

        def do_POST(self) -> None:
            self._relay("POST")

        def _relay(self, method: str) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            status, payload = proxy.relay(method, self.path, dict(self.headers), body)
            try:
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)
            except OSError:
                pass  # the client gave up on a held request: expected in the deadline test

        def log_message(self, format: str, *args: Any) -> None:
            pass

    return Handler


# --- fixtures ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def reference_backend(hf_backend: TransformersBackend) -> Iterator[_ReferenceBackend]:
    engine = GenerationEngine(hf_backend, BatchLimits(gather_s=0.01))
    engine.warm_up()
    yield _ReferenceBackend(engine)
    engine.close()


@pytest.fixture(scope="module")
def server(reference_backend: _ReferenceBackend) -> Iterator[OpenAICompatibleServer]:
    served, _ = serve_in_thread(reference_backend, model_name=SERVED_NAME)
    yield served
    served.shutdown()
    served.server_close()


@pytest.fixture
def proxy(server: OpenAICompatibleServer) -> Iterator[_FaultProxy]:
    fault_proxy = _FaultProxy(server.url)
    yield fault_proxy
    fault_proxy.close()


@pytest.fixture
def make_backend() -> Iterator[Callable[..., OpenAIBackend]]:
    made: list[OpenAIBackend] = []

    def make(base_url: str, model: str = SERVED_NAME, **settings: Any) -> OpenAIBackend:
        settings = {"timeout_s": 30, "max_retries": 3, "backoff_base_s": 0.05,
                    "backoff_cap_s": 0.2, **settings}
        made.append(OpenAIBackend(base_url, model, **settings))
        return made[-1]

    yield make
    for backend in made:
        backend.close()


def _request(request_id: str = "req-1", messages: list[dict[str, str]] | None = None,
             max_new_tokens: int = 12, **fields: Any) -> GenerationRequest:
    return GenerationRequest(request_id=request_id, messages=messages or QUESTION,
                             policy=DecodingPolicy(max_new_tokens=max_new_tokens), **fields)


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# --- through the real model -------------------------------------------------------------------

@pytest.mark.integration
def test_round_trip_returns_the_models_answer_and_its_accounting(
        proxy: _FaultProxy, make_backend: Callable[..., OpenAIBackend],
        reference_backend: _ReferenceBackend) -> None:
    backend = make_backend(proxy.url, tokenizer_path=str(MODEL_DIR))
    backend.warm_up()

    [completion] = backend.generate([_request(seed=7)])

    assert completion.request_id == "req-1"
    assert completion.text.strip()
    assert completion.finish_reason in ("stop", "length"), completion.error
    assert completion.prompt_tokens == reference_backend.count_prompt_tokens(QUESTION) \
        == backend.count_prompt_tokens(QUESTION)
    assert 0 < completion.completion_tokens <= 12
    assert completion.backend == "openai"
    assert completion.model == backend.model_id == f"openai:{SERVED_NAME}@{proxy.url}"
    assert completion.batch_size == 1 and not completion.constrained
    assert completion.compute_s > 0 and completion.queue_wait_s >= 0
    [sent] = proxy.posts()
    assert sent["json"] == {"model": SERVED_NAME, "messages": QUESTION, "temperature": 0.0,
                            "top_p": 1.0, "max_tokens": 12, "seed": 7}


@pytest.mark.integration
def test_a_batch_is_sent_concurrently_and_answered_in_order(
        proxy: _FaultProxy, make_backend: Callable[..., OpenAIBackend],
        reference_backend: _ReferenceBackend) -> None:
    # Given four different prompts, and a proxy that forwards none until all four are in flight
    topics = ["France", "Japan", "Italy", "Peru"]
    batch = [_request(f"req-{i}", [{"role": "user", "content": f"Name the capital of {topic}."}],
                      max_new_tokens=8) for i, topic in enumerate(topics)]
    proxy.gather = len(batch)

    # When the batch goes through the backend
    completions = make_backend(proxy.url, max_concurrency=4).generate(batch)

    # Then all four were in flight together, and each answer is its own prompt's greedy answer
    assert proxy.peak_in_flight == 4
    assert [c.request_id for c in completions] == [r.request_id for r in batch]
    assert all(c.batch_size == 4 and c.finish_reason in ("stop", "length") for c in completions)
    direct = reference_backend.generate([_request(r.request_id, r.messages, 8) for r in batch])
    assert [c.text for c in completions] == [d.text for d in direct]


@pytest.mark.integration
def test_max_tokens_caps_the_answer(proxy: _FaultProxy,
                                    make_backend: Callable[..., OpenAIBackend]) -> None:
    essay = [{"role": "user", "content": "Write a long essay about the history of Europe."}]

    [completion] = make_backend(proxy.url).generate([_request(messages=essay, max_new_tokens=4)])

    assert proxy.posts()[0]["json"]["max_tokens"] == 4
    assert completion.finish_reason == "length"
    assert 0 < completion.completion_tokens <= 4


@pytest.mark.integration
def test_json_schema_is_sent_as_a_strict_response_format(
        proxy: _FaultProxy, make_backend: Callable[..., OpenAIBackend],
        reference_backend: _ReferenceBackend) -> None:
    schema = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}

    [completion] = make_backend(proxy.url).generate(
        [_request("req-json", max_new_tokens=6, json_schema=schema)])

    assert proxy.posts()[0]["json"]["response_format"] == {
        "type": "json_schema", "json_schema": {"name": "output", "schema": schema, "strict": True}}
    assert reference_backend.received[-1].json_schema == schema  # the server parsed it back
    assert completion.constrained and completion.finish_reason in ("stop", "length")


@pytest.mark.integration
def test_an_answer_without_usage_counts_its_tokens_from_the_text(
        proxy: _FaultProxy, make_backend: Callable[..., OpenAIBackend]) -> None:
    proxy.rewrite = lambda answer: {k: v for k, v in answer.items() if k != "usage"}

    [completion] = make_backend(proxy.url, tokenizer_path=str(MODEL_DIR)).generate([_request()])

    assert completion.text and completion.completion_tokens > 0


@pytest.mark.integration
def test_a_refusal_from_the_servers_model_is_an_error_not_an_empty_answer(
        proxy: _FaultProxy, make_backend: Callable[..., OpenAIBackend]) -> None:
    def refused(answer: dict[str, Any]) -> dict[str, Any]:
        answer["choices"][0]["message"] |= {"content": None, "refusal": "I can't help with that."}
        return answer

    proxy.rewrite = refused
    [completion] = make_backend(proxy.url).generate([_request()])

    assert completion.finish_reason == "error"
    assert completion.error == "the server's model refused: I can't help with that."


@pytest.mark.integration
def test_a_policy_that_ignores_eos_says_so_to_the_server(
        proxy: _FaultProxy, make_backend: Callable[..., OpenAIBackend]) -> None:
    policy = DecodingPolicy(max_new_tokens=6, ignore_eos=True)
    request = GenerationRequest(request_id="req-eos", messages=QUESTION, policy=policy)

    [completion] = make_backend(proxy.url).generate([request])

    assert proxy.posts()[0]["json"]["ignore_eos"] is True
    assert completion.finish_reason == "length" and completion.completion_tokens == 6


@pytest.mark.integration
def test_503s_are_retried_until_the_server_answers(
        proxy: _FaultProxy, make_backend: Callable[..., OpenAIBackend]) -> None:
    proxy.fail_next = 2

    [completion] = make_backend(proxy.url, max_retries=3).generate([_request(max_new_tokens=4)])

    assert completion.finish_reason in ("stop", "length"), completion.error
    assert completion.text.strip()
    assert len(proxy.posts()) == 3


# --- failures that never reach the model ------------------------------------------------------

@pytest.mark.integration
def test_503s_beyond_max_retries_leave_the_backend_unavailable(
        proxy: _FaultProxy, make_backend: Callable[..., OpenAIBackend]) -> None:
    proxy.fail_next = 10

    [completion] = make_backend(proxy.url, max_retries=2).generate([_request()])

    assert completion.finish_reason == "unavailable"  # the server's trouble: the stage retries
    assert "gave up after 3 attempts" in completion.error and "injected overload" in completion.error
    assert len(proxy.posts()) == 3


@pytest.mark.integration
def test_a_4xx_is_an_error_completion_without_retries(
        proxy: _FaultProxy, make_backend: Callable[..., OpenAIBackend]) -> None:
    # Given a backend asking for a model the server does not serve
    backend = make_backend(proxy.url, model="no-such-model")

    [completion] = backend.generate([_request()])

    assert completion.finish_reason == "error"
    assert "HTTP 404" in completion.error and "does not exist" in completion.error
    assert len(proxy.posts()) == 1


@pytest.mark.integration
def test_warm_up_checks_the_model_and_sends_the_key(
        proxy: _FaultProxy, make_backend: Callable[..., OpenAIBackend]) -> None:
    make_backend(proxy.url, api_key="sk-test-secret").warm_up()
    assert proxy.requests[0]["headers"]["Authorization"] == "Bearer sk-test-secret"

    wrong = make_backend(proxy.url, model="no-such-model")  # an operator's to fix: not retried
    with pytest.raises(BackendMisconfigured,
                       match=rf"no-such-model.*{proxy.url}/models.*{SERVED_NAME}"):
        wrong.warm_up()


@pytest.mark.integration
def test_an_unreachable_server_fails_fast(make_backend: Callable[..., OpenAIBackend]) -> None:
    url = f"http://127.0.0.1:{_closed_port()}/v1"
    backend = make_backend(url, timeout_s=5, max_retries=2)

    started = time.monotonic()
    with pytest.raises(BackendUnavailable, match=url):
        backend.warm_up()
    [completion] = backend.generate([_request()])

    assert time.monotonic() - started < 5
    assert completion.finish_reason == "unavailable"
    assert "gave up after 3 attempts" in completion.error and "ConnectError" in completion.error


@pytest.mark.integration
def test_a_passed_deadline_sends_nothing(proxy: _FaultProxy,
                                         make_backend: Callable[..., OpenAIBackend]) -> None:
    [completion] = make_backend(proxy.url).generate([_request(deadline=time.monotonic() - 1)])

    assert completion.finish_reason == "deadline"
    assert "before the request was sent" in completion.error
    assert proxy.posts() == []


@pytest.mark.integration
def test_a_deadline_during_the_call_stops_the_wait(
        proxy: _FaultProxy, make_backend: Callable[..., OpenAIBackend]) -> None:
    # Given a server that hangs, and a request due in half a second
    proxy.hang = True
    deadline = time.monotonic() + 0.5

    [completion] = make_backend(proxy.url).generate([_request(deadline=deadline)])

    # Then the backend gave up at the deadline, not at its 30 s timeout
    assert completion.finish_reason == "deadline"
    assert time.monotonic() - deadline < 1.0
    assert len(proxy.posts()) == 1


@pytest.mark.integration
@pytest.mark.parametrize(("body", "status", "message"), [
    ({"model": SERVED_NAME}, 400, "messages must be a non-empty list"),
    ({"model": SERVED_NAME, "messages": QUESTION, "stream": True}, 400, "stream=true"),
    ({"model": SERVED_NAME, "messages": QUESTION, "temperature": -1}, 400, "temperature"),
    ({"model": "other", "messages": QUESTION}, 404, "does not exist"),
])
def test_the_server_rejects_bad_bodies_openai_style(server: OpenAICompatibleServer,
                                                    body: dict[str, Any], status: int,
                                                    message: str) -> None:
    response = httpx.post(f"{server.url}/chat/completions", json=body, timeout=10)

    assert response.status_code == status
    assert message in response.json()["error"]["message"]


# --- no server needed -------------------------------------------------------------------------

@pytest.mark.unit
@pytest.mark.parametrize(("settings", "message"), [
    ({"base_url": "localhost:8000"}, "base_url must be an http(s) URL"),
    ({"base_url": "http://127.0.0.1:8000/v1?key=x"}, "base_url must have no query"),
    ({"model": " "}, "model must be a non-empty name"),
    ({"timeout_s": 0}, "timeout_s must be > 0, got 0"),
    ({"max_retries": -1}, "max_retries must be >= 0, got -1"),
    ({"max_concurrency": 0}, "max_concurrency must be >= 1, got 0"),
    ({"context_window": 0}, "context_window must be >= 1, got 0"),
])
def test_bad_settings_are_refused_with_the_value(settings: dict[str, Any], message: str) -> None:
    arguments = {"base_url": "http://127.0.0.1:8000/v1", "model": "m", **settings}
    with pytest.raises(ValueError, match=re.escape(message)):
        OpenAIBackend(**arguments)


@pytest.mark.unit
def test_model_id_and_repr_carry_no_secrets() -> None:
    backend = OpenAIBackend("http://user:pw@example.test:8000/v1/", "m", api_key="sk-secret")

    assert backend.model_id == "openai:m@http://example.test:8000/v1"
    assert "sk-secret" not in repr(backend) and "pw" not in repr(backend)


@pytest.mark.unit
def test_without_a_tokenizer_the_prompt_estimate_is_conservative() -> None:
    backend = OpenAIBackend("http://127.0.0.1:8000/v1", "m")

    assert backend.count_prompt_tokens([{"role": "user", "content": "x" * 30}]) == 30 // 3 + 8
    assert backend.kv_bytes_per_token() is None
