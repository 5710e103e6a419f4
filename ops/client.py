"""The Python call for upstream systems: enqueue one request, then read its result.

    from ops.client import SluiceClient
    client = SluiceClient()                      # settings from SLUICE_* variables, store ready
    request_id = client.submit({"custom_id": "t-1", "tenant": "acme", "grants": ["public"],
                                "request": {"kind": "answer", "question": "..."},
                                "idempotency_key": "t-1"})
    result = client.wait(request_id, timeout_s=60)   # {"status": "succeeded", "output": ...}
"""

from __future__ import annotations

import time
from typing import Any

from pydantic import ValidationError

from schemas.requests import RequestLine, describe_validation_error
from schemas.status import Lane, Status
from workers.settings import Settings, settings_from_env
from workers.store.engine import session_scope
from workers.store.migrate import check_ready
from workers.store.models import Request
from workers.store.progress import Hearing, PollingOnly, hearing


class InvalidRequest(ValueError):
    """The submitted request does not meet the contract; the message says where."""


class SluiceClient:
    MIN_GAP_S = 0.02  # between two reads of one wait: news comes in bursts

    def __init__(self, settings: Settings | None = None) -> None:
        """Raises `ConfigurationError` for a bad SLUICE_* variable and `StoreNotReady` when
        the audit store is missing, unreachable or not migrated (`sluice db upgrade`): a
        client never creates a store."""
        self.settings = settings or settings_from_env()
        check_ready(self.settings.database_url)

    def submit(self, request: RequestLine | dict[str, Any], lane: Lane = Lane.ONLINE) -> str:
        """Admit one request (a shard of one) and enqueue it. A repeated idempotency key
        returns the first request's id and enqueues nothing; the key of a different request
        raises `workers.store.admission.AdmissionError`."""
        from workers.dispatch import enqueue_all
        from workers.runtime import pinned_versions_now
        from workers.store.admission import admit_one

        line = self._validated(request)
        with session_scope(self.settings.database_url) as session:
            request_id, dispatches = admit_one(session, line, pinned_versions_now(self.settings),
                                               self.settings.drift_policy, lane)
        enqueue_all(dispatches, self.settings)
        return request_id

    @staticmethod
    def _validated(request: RequestLine | dict[str, Any]) -> RequestLine:
        if isinstance(request, RequestLine):
            return request
        try:
            return RequestLine.model_validate(request)
        except ValidationError as exc:
            raise InvalidRequest(describe_validation_error(exc)) from None

    def result(self, request_id: str) -> dict[str, Any] | None:
        """The request's status and, once terminal, its outcome; None if unknown."""
        with session_scope(self.settings.database_url) as session:
            r = session.get(Request, request_id)
            if r is None:
                return None
            return {"request_id": r.id, "custom_id": r.custom_id, "job_id": r.job_id,
                    "status": r.status, "output": r.output, "citations": list(r.citations or []),
                    "error_class": r.error_class, "error_stage": r.error_stage,
                    "message": r.error_message, "run": r.run,
                    "tokens": {"prompt": r.prompt_tokens, "completion": r.completion_tokens}}

    def wait(self, request_id: str, timeout_s: float = 120,
             poll_s: float | None = None) -> dict[str, Any]:
        """Read the request until it is terminal; TimeoutError after `timeout_s`.

        On Postgres it reads again when a commit's news may concern the request (it names
        the request, or its job, or says nothing of whose), and at least every `poll_s`
        (default 5 s; 0.2 s where commits do not notify, `notify_ends` off). The waits of a
        process share one listening connection. On SQLite, which has no notifications, it
        reads every `poll_s` (default 0.2 s). Reads are at least `MIN_GAP_S` apart."""
        if poll_s is not None and poll_s <= 0:
            raise ValueError(f"poll_s must be above 0, got {poll_s}")
        deadline = time.monotonic() + timeout_s
        with hearing(self.settings.database_url) as ended:
            if poll_s is None:
                notified = self.settings.notify_ends and not isinstance(ended, PollingOnly)
                poll_s = 5.0 if notified else 0.2
            while True:
                read_at = time.monotonic()
                result = self.result(request_id)
                if result is None:
                    raise KeyError(f"no request with id {request_id!r}")
                if Status(result["status"]).is_terminal:
                    return result
                if read_at > deadline:
                    raise TimeoutError(f"{request_id} still {result['status']} after {timeout_s}s")
                self._until_news(ended, request_id, result["job_id"],
                                 min(deadline, read_at + poll_s))
                time.sleep(max(0.0, read_at + self.MIN_GAP_S - time.monotonic()))

    @staticmethod
    def _until_news(ended: Hearing, request_id: str, job_id: str | None, until: float) -> None:
        """Return on news that may concern the request, or at monotonic time `until`."""
        while (left := until - time.monotonic()) > 0:
            if any(n is None or n.may_concern(request_id, job_id) for n in ended.wait(left)):
                return
