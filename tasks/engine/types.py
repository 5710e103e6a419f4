"""What the generation engine takes and returns, and what every backend implements."""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field
from typing import Any, Protocol

from pydantic import BaseModel, ConfigDict, Field, model_validator

# Chat models average about four characters a token in English: one token per three errs
# on the long side, so that a prompt estimated to fit does.
CHARS_PER_TOKEN_LOW = 3


def estimated_tokens(text: str) -> int:
    """`text`'s tokens without its tokenizer, on the long side."""
    return len(text) // CHARS_PER_TOKEN_LOW + 1


class EngineError(RuntimeError):
    """Base of the engine's own errors."""


class AcceleratorOutOfMemory(EngineError):
    """A batch did not fit in device memory. The engine splits the batch and retries."""


class BackendUnavailable(EngineError):
    """A remote backend could not be reached or kept failing within its retries: it may be
    restarting, and the stage's retry policy tries again."""


class RequestRejected(EngineError):
    """The request itself cannot run on this backend (messages its chat template refuses, a
    schema its grammar compiler cannot take): it ends in `error` alone, never its batch."""


class BackendMisconfigured(EngineError):
    """A remote backend answers but cannot serve this configuration (the model is not among
    those it serves, the key is refused): no retry will help."""


class DecodingPolicy(BaseModel):
    """How one class of answers is decoded. Part of the product's behaviour, so part of the
    version tuple. `temperature == 0` is greedy decoding; above it, tokens are sampled with a
    generator seeded per request, never from a shared global one."""

    model_config = ConfigDict(frozen=True)
    name: str = "default"
    temperature: float = Field(default=0.0, ge=0, le=5)
    top_p: float = Field(default=1.0, gt=0, le=1)
    max_new_tokens: int = Field(default=128, gt=0, le=32_768)
    stop: tuple[str, ...] = ()
    seed: int = 0  # mixed with the request id: the per-request seed
    ignore_eos: bool = False  # decode to max_new_tokens (throughput benchmarks)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def version(self) -> str:
        mode = "greedy" if self.greedy else f"t{self.temperature}-p{self.top_p}-s{self.seed}"
        stop = "-stop" + hashlib.sha256("\x00".join(self.stop).encode()).hexdigest()[:6] \
            if self.stop else ""
        eos = "-noeos" if self.ignore_eos else ""
        return f"{self.name}:{mode}-max{self.max_new_tokens}{stop}{eos}"

    def request_seed(self, request_key: str) -> int:
        """The seed of one request's sampler: the same request and policy, the same seed."""
        digest = hashlib.sha256(f"{self.seed}:{request_key}".encode()).digest()
        return int.from_bytes(digest[:8], "big") & ((1 << 63) - 1)


@dataclass
class GenerationRequest:
    """One prompt for the engine: chat messages already rendered into channels."""

    request_id: str
    messages: list[dict[str, str]]
    policy: DecodingPolicy = field(default_factory=DecodingPolicy)
    seed: int = 0
    json_schema: dict[str, Any] | None = None  # constrain the output to this JSON schema
    deadline: float | None = None  # time.monotonic() after which no more tokens are made
    submitted_at: float = field(default_factory=time.monotonic)
    prompt_tokens: int = 0  # filled by the engine from the backend's tokenizer
    prompt_ids: list[int] | None = None  # already tokenized (benchmarks): messages unused


class Completion(BaseModel):
    """One request's output and its accounting."""

    request_id: str
    text: str = ""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    # stop | length | deadline | refused (never sent to the device) | error (this request's
    # trouble, out of memory on its row alone included) | unavailable (the backend's: a
    # server that kept failing; a later attempt may succeed)
    finish_reason: str
    backend: str
    model: str
    queue_wait_s: float = 0.0  # submitted until its batch started
    batch_size: int = 1
    compute_s: float = 0.0  # the device time of its batch, shared equally among its rows
    constrained: bool = False  # decoded under a JSON-schema constraint
    error: str | None = None

    @model_validator(mode="after")
    def _error_has_reason(self) -> Completion:
        if self.finish_reason in ("refused", "error", "unavailable") and not self.error:
            raise ValueError(f"finish_reason {self.finish_reason!r} needs an error message")
        return self


class Backend(Protocol):
    """One way of running a model: in this process (`transformers`) or over HTTP (`openai`)."""

    kind: str  # "transformers" | "openai"
    model_id: str  # what served the request, as the version tuple names it
    context_window: int  # prompt plus output, in tokens

    def warm_up(self) -> None:
        """Load the model or check the server; idempotent."""

    def count_prompt_tokens(self, messages: list[dict[str, str]]) -> int:
        """The prompt's length in tokens, chat template included."""

    def kv_bytes_per_token(self) -> int | None:
        """KV-cache bytes one token of one sequence takes; None when a server manages memory."""

    def generate(self, batch: list[GenerationRequest]) -> list[Completion]:
        """One completion per request, in order. Raises AcceleratorOutOfMemory when the batch
        does not fit; any other per-request trouble is a Completion with finish_reason error."""
