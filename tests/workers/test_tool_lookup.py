"""A tool lookup through the queues: the router's class, a planned tool call on the system of
record (fresh data, scoped to the tenant and the request's grants), the call on the record,
its result cited as evidence."""

from __future__ import annotations

import pytest
from sqlalchemy import select, update

from schemas.events import EventKind
from schemas.status import Stage, Status
from tests.services import Pipeline

pytestmark = pytest.mark.integration


def _lookup(client, tenant: str, question: str,  # type: ignore[no-untyped-def]
            grants: tuple[str, ...] = ("public", "engineering")) -> str:
    return client.submit({"custom_id": f"lookup-{tenant}-{'-'.join(grants)}-"
                                       f"{abs(hash(question)) % 10**8}",
                          "tenant": tenant, "grants": list(grants),
                          "request": {"kind": "answer", "question": question,
                                      "answer_class": "tool_lookup"}})


def test_a_ticket_lookup_reads_fresh_tenant_scoped_data_and_is_audited(
        pipeline: Pipeline) -> None:
    from ops.client import SluiceClient
    from workers.store.engine import session_scope
    from workers.store.models import AuditEvent, StageRun, Ticket

    settings = pipeline.settings
    client = SluiceClient(settings)  # type: ignore[arg-type]
    with session_scope(settings.database_url) as session:  # type: ignore[attr-defined]
        session.execute(update(Ticket).where(Ticket.id == "INC-2057")
                        .values(status="open"))  # fresh data: the tool must see this change
    mine = _lookup(client, "acme", "What is the status of ticket INC-2057 right now?")
    theirs = _lookup(client, "globex", "What is the status of ticket INC-2057 right now?")
    # INC-2057 is filed under engineering: a request granted only public may not read it
    narrow = _lookup(client, "acme", "What is the status of ticket INC-2057 right now?",
                     grants=("public",))
    results = {rid: client.wait(rid, timeout_s=600) for rid in (mine, theirs, narrow)}
    assert all(Status(r["status"]).is_terminal for r in results.values())

    with session_scope(settings.database_url) as session:  # type: ignore[attr-defined]
        calls = {rid: session.scalars(select(AuditEvent.payload).where(
            AuditEvent.request_id == rid, AuditEvent.kind == EventKind.TOOL_CALL)).all()
            for rid in (mine, theirs, narrow)}
        evidence = {rid: session.scalar(select(StageRun.output).where(
            StageRun.request_id == rid, StageRun.stage == Stage.RETRIEVAL))
            for rid in (mine, theirs, narrow)}
        reads = session.scalar(select(AuditEvent.id).where(
            AuditEvent.request_id.in_([mine, theirs]), AuditEvent.kind == EventKind.DATA_READ))
    assert reads is None  # a lookup calls its tool; it does not search the corpus
    for rid in (mine, theirs, narrow):
        assert len(calls[rid]) == 1
        call = calls[rid][0]
        assert call["tool"] == "get_ticket" and call["args"] == {"ticket_id": "INC-2057"}
        assert call["outcome"] == "ok" and call["result_hash"]
        [chunk] = evidence[rid]["chunks"]
        assert chunk["chunk_id"].startswith("tool:")
    assert "open" in evidence[mine]["chunks"][0]["text"].lower()
    assert "no ticket" in evidence[theirs]["chunks"][0]["text"].lower()  # another tenant's
    assert "no ticket" in evidence[narrow]["chunks"][0]["text"].lower()  # not under its grants
    if results[mine]["status"] == Status.SUCCEEDED:
        assert results[mine]["citations"] == [evidence[mine]["chunks"][0]["chunk_id"]]
