"""The generation engine: one per worker process, shared by every task the process runs.

Tasks submit prompts and block on futures; one scheduler thread gathers what arrives within
a few milliseconds (less once the waiting requests fill a batch's rows) into batches
bounded by a KV-cache token budget and a row cap, runs them on the backend, and splits a
batch that runs out of memory until every item is served.
Requests that could never fit are refused before they reach the device.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass

from tasks.engine.types import (
    AcceleratorOutOfMemory,
    Backend,
    Completion,
    EngineError,
    GenerationRequest,
    RequestRejected,
)

log = logging.getLogger(__name__)
# How long past its deadline a caller waits for its batch to say so itself (a row checks its
# deadline at each step; a batch that has not started does before it starts).
DEADLINE_GRACE_S = 1.0


class TokenBudgetExceeded(EngineError):
    """A request whose prompt plus output cap can never fit."""


@dataclass(frozen=True)
class BatchLimits:
    """How big a batch may grow: KV-cache bytes the operator allows, and rows."""

    kv_budget_bytes: int | None = None  # None: the backend manages memory (a remote server)
    max_batch_size: int = 32
    gather_s: float = 0.005  # how long the scheduler waits for a batch's rows to fill

    def __post_init__(self) -> None:
        if self.max_batch_size <= 0:
            raise ValueError(f"max_batch_size must be > 0, got {self.max_batch_size}")
        if self.kv_budget_bytes is not None and self.kv_budget_bytes <= 0:
            raise ValueError(f"kv_budget_bytes must be > 0, got {self.kv_budget_bytes}")


@dataclass
class _Pending:
    request: GenerationRequest
    future: Future[Completion]


class GenerationEngine:
    """Batches concurrent callers' requests onto one backend."""

    def __init__(self, backend: Backend, limits: BatchLimits | None = None) -> None:
        self.backend = backend
        self.limits = limits or BatchLimits()
        self._queue: deque[_Pending] = deque()
        self._wake = threading.Condition()
        self._thread: threading.Thread | None = None
        self._closed = False
        self._kv_bytes: int | None = None
        self.batches_run = 0

    @property
    def kind(self) -> str:
        return self.backend.kind

    @property
    def model_id(self) -> str:
        return self.backend.model_id

    @property
    def context_window(self) -> int:
        return self.backend.context_window

    def warm_up(self) -> None:
        """Load the backend and start the scheduler; idempotent."""
        if self._thread is not None:
            return
        self.backend.warm_up()
        self._kv_bytes = self.backend.kv_bytes_per_token()
        self._thread = threading.Thread(target=self._schedule, name="generation-engine",
                                        daemon=True)
        self._thread.start()

    def close(self) -> None:
        with self._wake:
            self._closed = True
            self._wake.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=30)

    # -- callers -----------------------------------------------------------------------------

    def generate(self, requests: list[GenerationRequest]) -> list[Completion]:
        """Submit and wait: one completion per request, in order. A request with a deadline
        is waited for until then (and `DEADLINE_GRACE_S`): a batch it shares with longer
        rows, or one running ahead of it, does not hold its caller past it."""
        futures = self.submit(requests)
        return [self._awaited(request, future) for request, future in zip(requests, futures,
                                                                         strict=True)]

    def _awaited(self, request: GenerationRequest, future: Future[Completion]) -> Completion:
        if request.deadline is None:
            return future.result()
        try:
            return future.result(timeout=max(0.0, request.deadline - time.monotonic())
                                 + DEADLINE_GRACE_S)
        except FutureTimeout:
            # Its batch goes on (and its late result is dropped): rows cannot leave a batch
            # mid-step, but their callers can stop waiting.
            return self._ended(request, "deadline", "deadline passed while its batch ran")

    def submit(self, requests: list[GenerationRequest]) -> list[Future[Completion]]:
        self.warm_up()
        futures = []
        accepted = []
        for request in requests:
            future: Future[Completion] = Future()
            futures.append(future)
            try:
                request.prompt_tokens = len(request.prompt_ids) \
                    if request.prompt_ids is not None \
                    else self.backend.count_prompt_tokens(request.messages)
            except RequestRejected as exc:  # this request's trouble, not its neighbours'
                future.set_result(self._ended(request, "error", str(exc)))
                continue
            refusal = self._refusal(request)
            if refusal is not None:
                future.set_result(self._ended(request, "refused", refusal))
            else:
                accepted.append(_Pending(request, future))
        with self._wake:
            if self._closed:
                raise EngineError("the generation engine is closed")
            self._queue.extend(accepted)
            self._wake.notify()
        return futures

    def token_budget(self) -> int | None:
        """The KV-cache tokens one batch may hold, from the memory the operator allows."""
        if self._kv_bytes is None or self.limits.kv_budget_bytes is None:
            return None
        return self.limits.kv_budget_bytes // self._kv_bytes

    def _refusal(self, request: GenerationRequest) -> str | None:
        need = request.prompt_tokens + request.policy.max_new_tokens
        window = self.backend.context_window
        if window and need > window:
            return (f"TokenBudgetExceeded: prompt {request.prompt_tokens} + max_new_tokens "
                    f"{request.policy.max_new_tokens} = {need} tokens exceeds the model's "
                    f"context window of {window}")
        budget = self.token_budget()
        if budget is not None and need > budget:
            return (f"TokenBudgetExceeded: {need} tokens exceed the KV-cache budget of {budget} "
                    f"tokens ({self.limits.kv_budget_bytes} bytes at {self._kv_bytes} per token)")
        return None

    # -- the scheduler thread ------------------------------------------------------------------

    def _schedule(self) -> None:
        while True:
            with self._wake:
                while not self._queue and not self._closed:
                    self._wake.wait()
                if self._closed and not self._queue:
                    return
                # Let concurrent callers join this batch, but not past the moment enough
                # requests wait to fill its rows (a shard's own submission often does at
                # once); a batch the token budget fills first still waits out gather_s.
                self._wake.wait_for(self._batch_full, timeout=self.limits.gather_s)
            batch = self._take_batch()
            if batch:
                self._run(batch)

    def _batch_full(self) -> bool:
        return self._closed or len(self._queue) >= self.limits.max_batch_size

    def _take_batch(self) -> list[_Pending]:
        """The oldest request, and the waiting ones closest to it in prompt length (less left
        padding), as many as the row cap and the token budget allow. The budget counts every
        row at the batch's longest prompt plus its largest output cap."""
        budget = self.token_budget()
        with self._wake:
            waiting = [p for p in self._queue if not p.future.cancelled()]
            if not waiting:
                self._queue.clear()
                return []
            oldest = waiting[0]
            nearest = sorted(waiting[1:self.limits.max_batch_size * 8], key=lambda p: abs(
                p.request.prompt_tokens - oldest.request.prompt_tokens))
            batch = [oldest]
            prompt, output = oldest.request.prompt_tokens, oldest.request.policy.max_new_tokens
            for pending in nearest:
                if len(batch) == self.limits.max_batch_size:
                    break
                wider = (max(prompt, pending.request.prompt_tokens),
                         max(output, pending.request.policy.max_new_tokens))
                if budget is not None and sum(wider) * (len(batch) + 1) > budget:
                    continue
                batch.append(pending)
                prompt, output = wider
            chosen = {id(p) for p in batch}
            self._queue = deque(p for p in waiting if id(p) not in chosen)
        now = time.monotonic()
        late = [p for p in batch if p.request.deadline is not None and p.request.deadline <= now]
        for pending in late:
            pending.future.set_result(self._ended(pending.request, "deadline",
                                                  "deadline passed before the batch started"))
        return [p for p in batch if p not in late]

    def _run(self, batch: list[_Pending]) -> None:
        """Run a batch; out of memory splits it in halves and retries each, down to one row."""
        try:
            completions = self.backend.generate([p.request for p in batch])
            self.batches_run += 1
        except AcceleratorOutOfMemory as exc:
            if len(batch) == 1:  # a row that does not fit alone will not fit next time either
                batch[0].future.set_result(self._ended(batch[0].request, "error", str(exc)))
                return
            log.warning("out of memory on a batch of %d; splitting it", len(batch))
            half = len(batch) // 2
            self._run(batch[:half])
            self._run(batch[half:])
            return
        except Exception as exc:  # noqa: BLE001 - the callers get it, the thread lives on
            for pending in batch:
                pending.future.set_exception(exc)
            return
        for pending, completion in zip(batch, completions, strict=True):
            pending.future.set_result(completion)

    def _ended(self, request: GenerationRequest, reason: str, error: str) -> Completion:
        return Completion(request_id=request.request_id, finish_reason=reason, error=error,
                          prompt_tokens=request.prompt_tokens, backend=self.backend.kind,
                          model=self.backend.model_id,
                          queue_wait_s=max(0.0, time.monotonic() - request.submitted_at))
