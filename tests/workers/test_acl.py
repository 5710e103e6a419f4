"""Access control inside the search: over many random queries, tenants and grant sets, no
request receives, and no data-read event names, a chunk outside its tenant and grants."""

from __future__ import annotations

import json
import random
import uuid
from pathlib import Path

import pytest
from sqlalchemy import select

from schemas.events import EventKind
from schemas.stages import ItemRecord

pytestmark = pytest.mark.integration

EVAL = Path(__file__).resolve().parents[2] / "ops" / "examples" / "retrieval_eval.jsonl"
LABELS = ["public", "engineering", "hr", "security"]


def test_no_request_ever_sees_or_audits_a_chunk_outside_its_tenant_and_grants(
        pipeline, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    from tasks.queue_tasks import compute_retrieval
    from workers.runtime import Runtime
    from workers.settings import Settings
    from workers.store.engine import session_scope
    from workers.store.models import Chunk

    monkeypatch.setenv("SLUICE_RETRIEVAL_CACHE", "off")  # every query searches the index
    runtime = Runtime(Settings())
    with session_scope(pipeline.settings.database_url) as session:
        visible = {c.id: (c.tenant_id, set(c.acl)) for c in session.scalars(select(Chunk))}
    questions = [json.loads(line)["question"] for line in EVAL.read_text().splitlines() if line]
    rng = random.Random(20261128)
    records = []
    for _ in range(160):
        grants = rng.sample(LABELS, rng.randint(0, len(LABELS)))
        records.append(ItemRecord(
            request_id=f"req-{uuid.uuid4().hex[:12]}", tenant=rng.choice(["acme", "globex"]),
            grants=grants, kind="answer",
            payload={"kind": "answer", "question": rng.choice(questions)}))
    seen = 0
    for start in range(0, len(records), 32):
        shard = records[start:start + 32]
        results, events = compute_retrieval(runtime, shard, None)
        scope = {r.request_id: r for r in shard}
        for result in results:
            record = scope[result.request_id]
            for chunk in result.output["chunks"]:
                tenant, acl = visible[chunk["chunk_id"]]
                assert tenant == record.tenant and acl <= set(record.grants), chunk["chunk_id"]
                seen += 1
            if not record.grants:
                assert result.outcome is not None and result.outcome.error_class == "NoEvidence"
        for event in (e for e in events if e.kind == EventKind.DATA_READ):
            record = scope[event.request_id]
            assert event.payload["tenant"] == record.tenant
            assert event.payload["grants"] == record.grants
            for chunk_id in event.payload["chunk_ids"]:
                tenant, acl = visible[chunk_id]
                assert tenant == record.tenant and acl <= set(record.grants)
    assert seen > 300  # the property was exercised, not vacuously true
