"""The Python call for upstream systems: enqueue one request, then read its result.

    from ops.client import SluiceClient
    client = SluiceClient()                      # settings from SLUICE_* variables
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
from workers.settings import Settings
from workers.store.engine import session_scope
from workers.store.models import Request
from workers.store.progress import EndedListener


class InvalidRequest(ValueError):
    """The submitted request does not meet the contract; the message says where."""


class SluiceClient:
    def __init__(self, settings: Settings | None = None) -> None:
        self.settings = settings or Settings()

    def submit(self, request: RequestLine | dict[str, Any], lane: Lane = Lane.ONLINE) -> str:
        """Admit one request (a shard of one) and enqueue it. A repeated idempotency key
        returns the first request's id and enqueues nothing."""
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
            return {"request_id": r.id, "custom_id": r.custom_id, "status": r.status,
                    "output": r.output, "citations": list(r.citations or []),
                    "error_class": r.error_class, "error_stage": r.error_stage,
                    "message": r.error_message, "run": r.run,
                    "tokens": {"prompt": r.prompt_tokens, "completion": r.completion_tokens}}

    def wait(self, request_id: str, timeout_s: float = 120, poll_s: float = 0.2) -> dict[str, Any]:
        """Read the request until it is terminal: on Postgres again as soon as a commit ends
        requests, and at least every `poll_s`; TimeoutError otherwise."""
        deadline = time.monotonic() + timeout_s
        with EndedListener(self.settings.database_url) as ended:
            while True:
                result = self.result(request_id)
                if result is None:
                    raise KeyError(f"no request with id {request_id!r}")
                if Status(result["status"]).is_terminal:
                    return result
                left = deadline - time.monotonic()
                if left < 0:
                    raise TimeoutError(f"{request_id} still {result['status']} after {timeout_s}s")
                ended.wait(min(poll_s, left))
