"""A small OpenAI-compatible HTTP server in front of any engine `Backend`.

It lets the `openai` backend be tested against a real model, and serves a local model to
OpenAI clients during development:

    python -m ops.openai_server --model ~/.cache/sluice/models/SmolLM2-135M-Instruct --port 8000

Endpoints: `GET /v1/models` and non-streaming `POST /v1/chat/completions`. Each HTTP request
runs on its own thread and calls `backend.generate([request])`; a batching engine behind the
`Backend` protocol gathers concurrent calls into batches itself.
"""

from __future__ import annotations

import argparse
import json
import logging
import threading
import time
import uuid
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from pydantic import ValidationError

from tasks.engine.types import (
    AcceleratorOutOfMemory,
    Backend,
    Completion,
    DecodingPolicy,
    GenerationRequest,
)

log = logging.getLogger(__name__)

DEFAULT_MAX_TOKENS = 128
MAX_BODY_BYTES = 8 * 1024 * 1024


class RequestRejected(ValueError):
    """A request body the server will not run; becomes an OpenAI-style error response."""

    def __init__(self, message: str, status: HTTPStatus = HTTPStatus.BAD_REQUEST,
                 error_type: str = "invalid_request_error", param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.error_type, self.param = status, error_type, param


class OpenAICompatibleServer(ThreadingHTTPServer):
    """Serves one backend under one model name."""

    daemon_threads = True

    def __init__(self, address: tuple[str, int], backend: Backend, model_name: str) -> None:
        super().__init__(address, _Handler)
        self.backend = backend
        self.model_name = model_name
        self.created = int(time.time())

    @property
    def url(self) -> str:
        """The OpenAI base URL, ending in /v1."""
        host, port = self.server_address[:2]
        return f"http://{host!s}:{port}/v1"


def serve_in_thread(backend: Backend, host: str = "127.0.0.1", port: int = 0,
                    model_name: str | None = None) -> tuple[OpenAICompatibleServer, str]:
    """Start serving `backend` on a daemon thread; returns the server and its /v1 base URL.

    `port=0` takes a free port. The model is served as `model_name`, by default the backend's
    `model_id`. Stop it with `server.shutdown(); server.server_close()`."""
    server = OpenAICompatibleServer((host, port), backend, model_name or backend.model_id)
    thread = threading.Thread(target=server.serve_forever, name="openai-server", daemon=True)
    thread.start()
    return server, server.url


class _Handler(BaseHTTPRequestHandler):
    server: OpenAICompatibleServer
    protocol_version = "HTTP/1.1"  # keep-alive, as OpenAI clients expect

    def do_GET(self) -> None:
        if self.path.rstrip("/") != "/v1/models":
            self._send_error(RequestRejected(f"no route GET {self.path}", HTTPStatus.NOT_FOUND,
                                             "not_found_error"))
            return
        entry = {"id": self.server.model_name, "object": "model", "created": self.server.created,
                 "owned_by": "sluice"}
        self._send_json(HTTPStatus.OK, {"object": "list", "data": [entry]})

    def do_POST(self) -> None:
        try:
            if self.path.rstrip("/") != "/v1/chat/completions":
                raise RequestRejected(f"no route POST {self.path}", HTTPStatus.NOT_FOUND,
                                      "not_found_error")
            body = self._read_json()
            request = generation_request(body, self.server.model_name)
            completion = self._generate(request)
            self._send_json(HTTPStatus.OK, chat_completion(completion, self.server.model_name))
        except RequestRejected as exc:
            self._send_error(exc)

    def _read_json(self) -> dict[str, Any]:
        try:
            length = int(self.headers.get("Content-Length", ""))
        except ValueError:
            raise RequestRejected("Content-Length is required", HTTPStatus.LENGTH_REQUIRED) from None
        if not 0 < length <= MAX_BODY_BYTES:
            raise RequestRejected(f"body must be 1 to {MAX_BODY_BYTES} bytes, got {length}")
        try:
            body = json.loads(self.rfile.read(length))
        except ValueError as exc:
            raise RequestRejected(f"body is not JSON: {exc}") from None
        if not isinstance(body, dict):
            raise RequestRejected(f"body must be a JSON object, got {type(body).__name__}")
        return body

    def _generate(self, request: GenerationRequest) -> Completion:
        try:
            [completion] = self.server.backend.generate([request])
        except AcceleratorOutOfMemory as exc:
            raise RequestRejected(f"out of accelerator memory: {exc}", HTTPStatus.SERVICE_UNAVAILABLE,
                                  "server_error") from None
        except Exception as exc:
            log.exception("backend failed on %s", request.request_id)
            raise RequestRejected(f"backend failed: {exc!r}", HTTPStatus.INTERNAL_SERVER_ERROR,
                                  "server_error") from None
        if completion.finish_reason == "refused":  # e.g. the prompt does not fit the context
            raise RequestRejected(completion.error or "refused")
        if completion.finish_reason == "error":
            raise RequestRejected(completion.error or "error", HTTPStatus.INTERNAL_SERVER_ERROR,
                                  "server_error")
        return completion

    def _send_error(self, exc: RequestRejected) -> None:
        self.close_connection = True  # the body may be unread: the connection cannot be reused
        error = {"message": str(exc), "type": exc.error_type, "param": exc.param,
                 "code": exc.status.value}
        self._send_json(exc.status, {"error": error})

    def _send_json(self, status: HTTPStatus, payload: dict[str, Any]) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s " + format, self.address_string(), *args)


def generation_request(body: dict[str, Any], model_name: str) -> GenerationRequest:
    """The engine request for one chat-completions body; RequestRejected if it cannot run."""
    if not body.get("model"):
        raise RequestRejected("model is required", param="model")
    if body.get("model") != model_name:
        raise RequestRejected(f"The model {body.get('model')!r} does not exist; this server "
                              f"serves {model_name!r}", HTTPStatus.NOT_FOUND, "model_not_found", "model")
    if body.get("stream"):
        raise RequestRejected("stream=true is not supported", param="stream")
    if body.get("n", 1) != 1:
        raise RequestRejected(f"n must be 1, got {body.get('n')!r}", param="n")
    seed = body.get("seed")
    if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)):
        raise RequestRejected(f"seed must be an integer, got {seed!r}", param="seed")
    return GenerationRequest(request_id=f"chatcmpl-{uuid.uuid4().hex}",
                             messages=_messages(body.get("messages")), policy=_policy(body),
                             seed=seed or 0, json_schema=_json_schema(body.get("response_format")))


def _messages(messages: Any) -> list[dict[str, str]]:
    if not isinstance(messages, list) or not messages:
        raise RequestRejected("messages must be a non-empty list", param="messages")
    for index, message in enumerate(messages):
        if not (isinstance(message, dict) and isinstance(message.get("role"), str)
                and isinstance(message.get("content"), str)):
            raise RequestRejected(f"messages[{index}] must have a string role and string content",
                                  param="messages")
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def _policy(body: dict[str, Any]) -> DecodingPolicy:
    stop = body.get("stop") or ()
    stop = (stop,) if isinstance(stop, str) else stop
    max_tokens = body.get("max_tokens") or body.get("max_completion_tokens") or DEFAULT_MAX_TOKENS
    fields = {"temperature": body.get("temperature", 0.0), "top_p": body.get("top_p", 1.0),
              "max_new_tokens": max_tokens, "stop": stop,
              "ignore_eos": body.get("ignore_eos")}  # vLLM's extension, as vLLM reads it
    try:
        return DecodingPolicy(**{k: v for k, v in fields.items() if v is not None})
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        raise RequestRejected(f"bad decoding parameters: {problems}") from None


def _json_schema(response_format: Any) -> dict[str, Any] | None:
    if response_format is None:
        return None
    kind = response_format.get("type") if isinstance(response_format, dict) else None
    if kind == "text":
        return None
    if kind == "json_object":
        return {"type": "object"}
    schema = (response_format.get("json_schema") or {}).get("schema") if kind == "json_schema" else None
    if not isinstance(schema, dict):
        raise RequestRejected("response_format must be {'type': 'text' | 'json_object'} or "
                              "{'type': 'json_schema', 'json_schema': {'schema': {...}}}",
                              param="response_format")
    return schema


def chat_completion(completion: Completion, model_name: str) -> dict[str, Any]:
    """The OpenAI chat.completion object for one engine completion."""
    # The server sets no deadline, so "deadline" only comes from a backend's own limit:
    # the answer was cut short, which OpenAI clients know as "length".
    finish_reason = "stop" if completion.finish_reason == "stop" else "length"
    usage = {"prompt_tokens": completion.prompt_tokens,
             "completion_tokens": completion.completion_tokens,
             "total_tokens": completion.prompt_tokens + completion.completion_tokens}
    return {"id": completion.request_id, "object": "chat.completion", "created": int(time.time()),
            "model": model_name, "usage": usage,
            "choices": [{"index": 0, "finish_reason": finish_reason,
                         "message": {"role": "assistant", "content": completion.text}}]}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="a local Hugging Face model folder")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--served-model-name", help="the model name clients send (default: model_id)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    from tasks.engine.engine import GenerationEngine
    from tasks.engine.hf import TransformersBackend  # heavy, and only this path needs it

    # Concurrent HTTP requests are batched by the engine, as in a generation worker.
    backend = GenerationEngine(TransformersBackend(args.model))
    backend.warm_up()
    server = OpenAICompatibleServer((args.host, args.port), backend,
                                    args.served_model_name or backend.model_id)
    log.info("serving %s at %s", server.model_name, server.url)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


if __name__ == "__main__":
    main()
