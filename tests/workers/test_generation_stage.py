"""The generation stage around its engine: a backend that is unavailable (a model server
down, a device out of memory on one row) sends the shard back to the retry policy, and only
on the last attempt ends its drafts as failed, keeping the rest of the shard's."""

from __future__ import annotations

from pathlib import Path

import pytest

from schemas.stages import ItemRecord
from schemas.status import Stage, Status
from tasks.engine.engine import BatchLimits, GenerationEngine
from tasks.engine.types import Completion, GenerationRequest
from tasks.generation import NullBackend
from workers.runtime import Runtime
from workers.settings import Settings

pytestmark = pytest.mark.unit


class UnavailableFor(NullBackend):
    """An injected fault: the null generator, but the requests named here find the backend
    unavailable."""

    def __init__(self, request_ids: set[str]) -> None:
        self.request_ids = request_ids

    def generate(self, batch: list[GenerationRequest]) -> list[Completion]:
        done = super().generate(batch)
        return [c.model_copy(update={"finish_reason": "unavailable", "text": "",
                                     "error": "injected: server down"})
                if c.request_id in self.request_ids else c for c in done]


def _record(request_id: str) -> ItemRecord:
    return ItemRecord(request_id=request_id, tenant="acme", grants=["public"], kind="answer",
                      payload={"question": "How do I roll back a deploy?"}, previous={
                          Stage.ROUTER: {"answer_class": "grounded_answer",
                                         "model_variant": "small",
                                         "decoding_policy": "grounded-greedy"},
                          Stage.RETRIEVAL: {"chunks": [{
                              "chunk_id": "c1", "document_id": "d1", "title": "Deploys",
                              "text": "Roll back with deployctl rollback.", "score": 0.9}]}})


@pytest.fixture
def runtime(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Runtime:
    runtime = Runtime(Settings(generator_backend="null", data_dir=tmp_path))
    engine = GenerationEngine(UnavailableFor({"down"}), BatchLimits(gather_s=0.0))
    monkeypatch.setattr(runtime, "engine", lambda _variant=None: engine)
    yield runtime
    engine.close()


def test_an_unavailable_backend_sends_the_shard_back_to_the_retry_policy(
        runtime: Runtime) -> None:
    from tasks.queue_tasks import compute_generation
    from workers.base import LAST_ATTEMPT, TransientError

    token = LAST_ATTEMPT.set(False)
    try:
        with pytest.raises(TransientError, match="1 of 2 drafts found the backend unavailable: "
                                                  "injected: server down"):
            compute_generation(runtime, [_record("up"), _record("down")], None)
    finally:
        LAST_ATTEMPT.reset(token)


def test_on_the_last_attempt_only_the_unavailable_drafts_fail(runtime: Runtime) -> None:
    from tasks.queue_tasks import compute_generation

    results, _ = compute_generation(runtime, [_record("up"), _record("down")], None)

    outcomes = {r.request_id: r.outcome for r in results}
    assert outcomes["up"] is None  # on to validation
    assert outcomes["down"] is not None and outcomes["down"].status == Status.FAILED
    assert outcomes["down"].error_class == "BackendUnavailable"
