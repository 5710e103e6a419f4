"""The audit store's tables (SQLAlchemy 2). Postgres in production, SQLite embedded."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    ForeignKeyConstraint,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    UniqueConstraint,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from workers.store.timeutil import utcnow

NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map = {dict[str, Any]: JSON, list[Any]: JSON}


Timestamp = DateTime(timezone=True)
# SQLite only autoincrements INTEGER primary keys; Postgres gets BIGINT.
AutoId = BigInteger().with_variant(Integer(), "sqlite")


class Tenant(Base):
    __tablename__ = "tenants"
    id: Mapped[str] = mapped_column(String(128), primary_key=True)
    created_at: Mapped[datetime] = mapped_column(Timestamp, default=utcnow)


class Job(Base):
    """A batch: one job file, admitted once and resumed by its content hash."""

    __tablename__ = "jobs"
    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    name: Mapped[str] = mapped_column(String(512))
    input_sha256: Mapped[str] = mapped_column(String(64))
    lane: Mapped[str] = mapped_column(String(16))
    total_lines: Mapped[int] = mapped_column(Integer)
    malformed: Mapped[list[Any]] = mapped_column(JSON, default=list)
    created_at: Mapped[datetime] = mapped_column(Timestamp, default=utcnow)
    cancelled_at: Mapped[datetime | None] = mapped_column(Timestamp)


_HAS_FAILED = text("failed_at IS NOT NULL")
# How full (percent) inserts fill each page of requests (Postgres): the rest is room for the
# new versions each row's status updates write into the same page (see Request).
REQUESTS_FILLFACTOR = 50


class Request(Base):
    """One request with its pinned versions and, once terminal, its outcome.

    The stage commits rewrite a request twice (queued -> running, running -> terminal). No
    index names a column those updates change (status, finished_at...: migrations 0008, 0012),
    not even in a partial index's predicate, and each page keeps free space: Postgres then
    writes each new version into the same page as a heap-only tuple and adds no index entry.
    Failures are found by `failed_at`, which only an update that fails the request sets.
    """

    __tablename__ = "requests"
    __table_args__ = (
        UniqueConstraint("tenant_id", "idempotency_key", name="uq_requests_tenant_idempotency"),
        Index("ix_requests_job", "job_id"),
        Index("ix_requests_failed_at", "failed_at", postgresql_where=_HAS_FAILED,
              sqlite_where=_HAS_FAILED),
        {"postgresql_with": {"fillfactor": REQUESTS_FILLFACTOR}},
    )
    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    # No foreign keys (migration 0013): admission, the only writer, holds the job's row and
    # has upserted the tenant in the same transaction; nothing deletes either.
    job_id: Mapped[str | None] = mapped_column(String(32))
    line_no: Mapped[int | None] = mapped_column(Integer)
    custom_id: Mapped[str] = mapped_column(String(128))
    tenant_id: Mapped[str] = mapped_column(String(128))
    grants: Mapped[list[Any]] = mapped_column(JSON)
    kind: Mapped[str] = mapped_column(String(32))
    payload: Mapped[dict[str, Any]] = mapped_column(JSON)
    lane: Mapped[str] = mapped_column(String(16))
    status: Mapped[str] = mapped_column(String(32))
    run: Mapped[int] = mapped_column(Integer, default=0)
    # The version tuple pinned at admission, by id (version_tuples, migration 0010).
    pinned_versions_id: Mapped[str] = mapped_column(String(32))
    drift_policy: Mapped[str] = mapped_column(String(16))
    deadline_at: Mapped[datetime | None] = mapped_column(Timestamp)
    idempotency_key: Mapped[str | None] = mapped_column(String(256))
    error_class: Mapped[str | None] = mapped_column(String(128))
    error_stage: Mapped[str | None] = mapped_column(String(32))
    error_message: Mapped[str | None] = mapped_column(Text)
    output: Mapped[str | None] = mapped_column(Text)
    citations: Mapped[list[Any]] = mapped_column(JSON, default=list)
    prompt_tokens: Mapped[int] = mapped_column(Integer, default=0)
    completion_tokens: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[datetime] = mapped_column(Timestamp, default=utcnow)
    admitted_at: Mapped[datetime] = mapped_column(Timestamp, default=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column(Timestamp)
    # When a run of the request last ended failed; null again once a later run ends otherwise.
    failed_at: Mapped[datetime | None] = mapped_column(Timestamp)


class Shard(Base):
    """Requests that travel one chain together for one run."""

    __tablename__ = "shards"
    id: Mapped[str] = mapped_column(String(48), primary_key=True)
    job_id: Mapped[str | None] = mapped_column(ForeignKey("jobs.id"), index=True)
    run: Mapped[int] = mapped_column(Integer)
    lane: Mapped[str] = mapped_column(String(16))
    start_stage: Mapped[str] = mapped_column(String(32))
    request_ids: Mapped[list[Any]] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(Timestamp, default=utcnow)


class ShardStage(Base):
    """One stage of one shard for one (run, round): the unit a message delivers and a lease
    covers. Pending until claimed, running under a lease, then done; `request_ids` are the
    items it takes (a repair round takes only the drafts sent back)."""

    __tablename__ = "shard_stages"
    __table_args__ = (
        UniqueConstraint("shard_id", "stage", "run", "round", name="uq_shard_stages_key"),
        Index("ix_shard_stages_status_lease", "status", "lease_expires_at"),  # the reconciler
    )
    id: Mapped[int] = mapped_column(AutoId, primary_key=True, autoincrement=True)
    shard_id: Mapped[str] = mapped_column(ForeignKey("shards.id"))
    stage: Mapped[str] = mapped_column(String(32))
    run: Mapped[int] = mapped_column(Integer)
    round: Mapped[int] = mapped_column(Integer, default=0)
    request_ids: Mapped[list[Any]] = mapped_column(JSON)
    status: Mapped[str] = mapped_column(String(16))
    deliveries: Mapped[int] = mapped_column(Integer, default=0)
    # The reconciler's re-drives of a pending shard stage back off: not again before
    # redrive_after.
    redrives: Mapped[int] = mapped_column(Integer, default=0)
    redrive_after: Mapped[datetime | None] = mapped_column(Timestamp)
    lease_owner: Mapped[str | None] = mapped_column(String(256))
    lease_expires_at: Mapped[datetime | None] = mapped_column(Timestamp)
    created_at: Mapped[datetime] = mapped_column(Timestamp, default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(Timestamp)
    finished_at: Mapped[datetime | None] = mapped_column(Timestamp)


class StageRun(Base):
    """What one stage did for one request in one (run, round), written once, when the
    stage commits (status `done`). The unique key is what makes effects exactly-once; the
    pending and leased states live in the shard's `ShardStage`."""

    __tablename__ = "stage_runs"
    __table_args__ = (
        UniqueConstraint("request_id", "stage", "run", "round", name="uq_stage_runs_key"),
    )
    id: Mapped[int] = mapped_column(AutoId, primary_key=True, autoincrement=True)
    # No foreign keys on the append-only rows (migration 0007): the stage commit writes them
    # for the shard stage it holds and the requests it just loaded; nothing deletes those.
    request_id: Mapped[str] = mapped_column(String(32))
    shard_id: Mapped[str] = mapped_column(String(48))
    stage: Mapped[str] = mapped_column(String(32))
    run: Mapped[int] = mapped_column(Integer)
    round: Mapped[int] = mapped_column(Integer, default=0)
    status: Mapped[str] = mapped_column(String(16))
    deliveries: Mapped[int] = mapped_column(Integer, default=0)  # of its shard stage
    created_at: Mapped[datetime] = mapped_column(Timestamp, default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(Timestamp)
    finished_at: Mapped[datetime | None] = mapped_column(Timestamp)
    duration_s: Mapped[float | None] = mapped_column(Float)
    # The version tuple that served it, by id (version_tuples, migration 0009): a shard
    # stage's runs share one, so each row carries 32 characters, not the tuple's JSON.
    served_versions_id: Mapped[str | None] = mapped_column(String(32))
    outcome_status: Mapped[str | None] = mapped_column(String(32))
    error_class: Mapped[str | None] = mapped_column(String(128))
    error_message: Mapped[str | None] = mapped_column(Text)
    output: Mapped[dict[str, Any] | None] = mapped_column(JSON)


class AuditEvent(Base):
    """Append-only: data reads, model calls, route decisions, verdicts, drift, replays."""

    __tablename__ = "audit_events"
    __table_args__ = (Index("ix_audit_events_request", "request_id", "id"),)
    id: Mapped[int] = mapped_column(AutoId, primary_key=True, autoincrement=True)
    request_id: Mapped[str] = mapped_column(String(32))  # no foreign key: see StageRun
    stage: Mapped[str | None] = mapped_column(String(32))
    run: Mapped[int] = mapped_column(Integer, default=0)
    round: Mapped[int] = mapped_column(Integer, default=0)
    kind: Mapped[str] = mapped_column(String(64))
    payload: Mapped[dict[str, Any]] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(Timestamp, default=utcnow)


class Document(Base):
    __tablename__ = "documents"
    __table_args__ = (Index("ix_documents_tenant_source", "tenant_id", "source"),)
    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id"), index=True)
    path: Mapped[str] = mapped_column(String(1024))
    title: Mapped[str] = mapped_column(String(512))
    acl: Mapped[list[Any]] = mapped_column(JSON)
    sha256: Mapped[str] = mapped_column(String(64))
    retired: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime] = mapped_column(Timestamp, default=utcnow)
    # The folder it was ingested from (resolved): `--prune` retires what that folder lost.
    source: Mapped[str | None] = mapped_column(String(1024))
    retired_at: Mapped[datetime | None] = mapped_column(Timestamp)
    updated_at: Mapped[datetime | None] = mapped_column(Timestamp)


class Chunk(Base):
    __tablename__ = "chunks"
    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    document_id: Mapped[str] = mapped_column(ForeignKey("documents.id"), index=True)
    tenant_id: Mapped[str] = mapped_column(String(128), index=True)
    ordinal: Mapped[int] = mapped_column(Integer)
    text: Mapped[str] = mapped_column(Text)
    acl: Mapped[list[Any]] = mapped_column(JSON)


class StoredVersionTuple(Base):
    """A version tuple, stored once, keyed by its content hash: requests name the one
    pinned at admission, stage runs the one that served them (workers.store.tuples)."""

    __tablename__ = "version_tuples"
    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    versions: Mapped[dict[str, Any]] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(Timestamp, default=utcnow)


class IndexVersion(Base):
    """A FAISS index built from the chunk table, named by its content hash."""

    __tablename__ = "index_versions"
    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    path: Mapped[str] = mapped_column(String(1024))
    embedder: Mapped[str] = mapped_column(String(256))
    chunk_count: Mapped[int] = mapped_column(Integer)
    params: Mapped[dict[str, Any]] = mapped_column(JSON)
    active: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime] = mapped_column(Timestamp, default=utcnow)


class IndexActivation(Base):
    """Append-only: which index became active when, replacing which (rollback reads it)."""

    __tablename__ = "index_activations"
    id: Mapped[int] = mapped_column(AutoId, primary_key=True, autoincrement=True)
    index_id: Mapped[str] = mapped_column(ForeignKey("index_versions.id"))
    previous_id: Mapped[str | None] = mapped_column(String(32))
    reason: Mapped[str] = mapped_column(String(32))  # build, activate, rollback
    activated_at: Mapped[datetime] = mapped_column(Timestamp, default=utcnow)


class Ticket(Base):
    """An incident ticket in the system of record the governed tools read, fresh on each call.

    Keyed by (tenant, id): two tenants may use the same id, and neither sees the other's.
    """

    __tablename__ = "tickets"
    __table_args__ = (Index("ix_tickets_tenant_status", "tenant_id", "status"),)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id"), primary_key=True)
    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    title: Mapped[str] = mapped_column(String(512))
    status: Mapped[str] = mapped_column(String(16))  # open, resolved
    severity: Mapped[str] = mapped_column(String(16))  # SEV1..SEV4, or unknown
    service: Mapped[str | None] = mapped_column(String(256))
    summary: Mapped[str] = mapped_column(Text, default="")
    opened_at: Mapped[datetime | None] = mapped_column(Timestamp)
    resolved_at: Mapped[datetime | None] = mapped_column(Timestamp)
    source: Mapped[str | None] = mapped_column(String(1024))  # the file it was seeded from
    updated_at: Mapped[datetime] = mapped_column(Timestamp, default=utcnow)
    # Labels a request's grants must all hold to read it (migration 0014), as for documents.
    acl: Mapped[list[str]] = mapped_column(JSON, default=list, server_default="[]")


class ToolCallRecord(Base):
    """One governed tool call by its stable call id. A side-effect call inserts its row in the
    transaction that runs it, so a redelivered task finds the row and gets the recorded
    result instead of running the tool again; a read-only call's row holds its last result."""

    __tablename__ = "tool_calls"
    __table_args__ = (
        UniqueConstraint("tenant_id", "idempotency_key", name="uq_tool_calls_tenant_idempotency"),
        Index("ix_tool_calls_tenant_tool", "tenant_id", "tool"),
    )
    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(String(128))
    tool: Mapped[str] = mapped_column(String(64))
    version: Mapped[str] = mapped_column(String(32))
    args: Mapped[dict[str, Any]] = mapped_column(JSON)
    idempotency_key: Mapped[str | None] = mapped_column(String(256))
    side_effects: Mapped[bool] = mapped_column(Boolean, default=False)
    outcome: Mapped[str] = mapped_column(String(16))  # pending (inside its transaction), ok, error
    error_class: Mapped[str | None] = mapped_column(String(128))
    result: Mapped[dict[str, Any] | None] = mapped_column(JSON)  # title, content, data
    result_hash: Mapped[str | None] = mapped_column(String(64))
    duration_s: Mapped[float | None] = mapped_column(Float)
    executions: Mapped[int] = mapped_column(Integer, default=0)  # times the tool really ran
    created_at: Mapped[datetime] = mapped_column(Timestamp, default=utcnow)
    executed_at: Mapped[datetime | None] = mapped_column(Timestamp)


class TicketNote(Base):
    """A note appended to a ticket by the `add_ticket_note` tool, linked to the call that wrote it."""

    __tablename__ = "ticket_notes"
    __table_args__ = (
        ForeignKeyConstraint(["tenant_id", "ticket_id"], ["tickets.tenant_id", "tickets.id"]),
        Index("ix_ticket_notes_ticket", "tenant_id", "ticket_id"),
    )
    id: Mapped[int] = mapped_column(AutoId, primary_key=True, autoincrement=True)
    tenant_id: Mapped[str] = mapped_column(String(128))
    ticket_id: Mapped[str] = mapped_column(String(32))
    note: Mapped[str] = mapped_column(Text)
    tool_call_id: Mapped[str] = mapped_column(ForeignKey("tool_calls.id"), unique=True)
    created_at: Mapped[datetime] = mapped_column(Timestamp, default=utcnow)


class EvalRun(Base):
    """One `sluice eval` run: the golden set it ran, the version tuple it ran under, its
    metrics and the job that carried its cases (whose requests hold the full audit trail)."""

    __tablename__ = "eval_runs"
    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    golden: Mapped[str] = mapped_column(String(1024))  # path and content hash
    job_id: Mapped[str | None] = mapped_column(ForeignKey("jobs.id"))
    versions: Mapped[dict[str, Any]] = mapped_column(JSON)
    metrics: Mapped[dict[str, Any]] = mapped_column(JSON)
    cases: Mapped[int] = mapped_column(Integer)
    gate: Mapped[str | None] = mapped_column(String(16))  # passed | failed | None: no baseline
    wall_s: Mapped[float] = mapped_column(Float)
    created_at: Mapped[datetime] = mapped_column(Timestamp, default=utcnow, index=True)
