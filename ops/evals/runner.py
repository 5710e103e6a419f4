"""`sluice eval`: golden cases through the real pipeline, outcomes read back from the audit
store, scored, reported, recorded, and gated against a baseline.

The cases become one job (custom id = case id), run like any job: embedded workers started
for the run, or the distributed workers already serving the queues. What each case did is
read from the store, never from the model's say-so: the route decision, the chunks read
(and whose they were), the tools called, the injection signals, the output and its citations.
"""

from __future__ import annotations

import hashlib
import json
import re
import tempfile
import time
import uuid
from collections import defaultdict
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pydantic import ValidationError
from sqlalchemy import select

from schemas.evals import CaseOutcome, CorpusLine, EvalReport, GoldenCase
from schemas.events import EventKind
from schemas.requests import RequestLine, describe_validation_error
from tasks.indexing import document_id
from tasks.validators.contract import ContractRegistry
from workers.settings import Settings
from workers.store.engine import session_scope
from workers.store.models import AuditEvent, Chunk, EvalRun, Request, StageRun
from workers.store.operators import job_requests
from workers.store.timeutil import as_utc
from workers.store.tuples import versions_by_id

NONCE_CHARS = 8  # of a run's nonce, which its cases' custom ids carry (`job_lines`)
DOCUMENT_ID = re.compile(r"^[0-9a-f]{16}$")
READ_EVENTS = (EventKind.ROUTE_DECISION, EventKind.DATA_READ, EventKind.TOOL_CALL,
               EventKind.INJECTION_SIGNAL, EventKind.MODEL_CALL)


class GoldenSetError(ValueError):
    """A golden file that does not parse; the message names the line."""


@dataclass(frozen=True)
class GoldenSet:
    path: Path
    cases: list[GoldenCase]
    corpus: dict[str, list[Path]]  # tenant -> folders holding <acl>/<files>; empty: default
    content_hash: str

    @property
    def label(self) -> str:
        return f"{self.path.name}#{self.content_hash}"


def load_golden(path: Path, tags: list[str] | None = None) -> GoldenSet:
    """The cases of a golden file (only those carrying every tag in `tags`, when given)."""
    if not path.is_file():
        raise GoldenSetError(f"golden file not found: {path}")
    raw = path.read_bytes()
    cases: list[GoldenCase] = []
    corpus: dict[str, list[Path]] = {}
    # By newline bytes, as job files are read: splitlines() would also cut a line at a
    # U+2028 inside a JSON string.
    for number, line in enumerate(raw.decode("utf-8").split("\n"), start=1):
        if not line.strip():
            continue
        try:
            data = json.loads(line)
            if not isinstance(data, dict):
                raise ValueError(f"a line must be a JSON object, got {type(data).__name__}")
            if "corpus" in data and "id" not in data:
                corpus = {t: [(path.parent / f).resolve() for f in folders]
                          for t, folders in CorpusLine.model_validate(data).corpus.items()}
            else:
                cases.append(_admissible(GoldenCase.model_validate(data)))
        except ValueError as exc:  # JSONDecodeError and ValidationError are ValueErrors
            raise GoldenSetError(f"{path}:{number}: {exc}") from exc
    duplicates = {c.id for c in cases if sum(d.id == c.id for d in cases) > 1}
    if duplicates:
        raise GoldenSetError(f"{path}: duplicate case ids {sorted(duplicates)}")
    if tags:
        cases = [c for c in cases if set(tags) <= set(c.tags)]
    if not cases:
        raise GoldenSetError(f"{path}: no cases{' tagged ' + ','.join(tags) if tags else ''}")
    return GoldenSet(path, cases, corpus, hashlib.sha256(raw).hexdigest()[:12])


def _admissible(case: GoldenCase) -> GoldenCase:
    """`case`, once the job line it becomes (`job_lines`) passes admission: a case the job
    would refuse as malformed has no outcome to measure."""
    line = json.loads(job_lines([case], "0" * NONCE_CHARS))
    try:
        RequestLine.model_validate(line)
    except ValidationError as exc:
        raise ValueError(f"case {case.id!r} would not be admitted: "
                         f"{describe_validation_error(exc)}") from None
    return case


def resolve_document(tenant: str, reference: str) -> str:
    """A document id from an id, or from '<tenant>/<acl>/<file>' as ingestion names it."""
    if DOCUMENT_ID.match(reference):
        return reference
    owner, _, relative = reference.partition("/")
    return document_id(owner if relative else tenant, relative or reference)


def resolved(case: GoldenCase) -> GoldenCase:
    expect = case.expect.model_copy(update={
        "must_cite_any": [resolve_document(case.tenant, r) for r in case.expect.must_cite_any],
        "must_not_cite": [resolve_document(case.tenant, r) for r in case.expect.must_not_cite]})
    return case.model_copy(update={"expect": expect})


def job_lines(cases: list[GoldenCase], nonce: str) -> str:
    """A job file of the cases; custom ids carry the run's nonce, so that each eval run is a
    new job (jobs are named by their content, and the same content would resume)."""
    return "".join(json.dumps({"custom_id": f"{c.id}:{nonce}", "tenant": c.tenant,
                               "grants": c.grants,
                               "request": c.request.model_dump(mode="json", exclude_none=True)})
                   + "\n" for c in cases)


def prepare_corpus(settings: Settings, golden: GoldenSet) -> str | None:
    """The golden file's own corpus when it names one, else the example corpus; returns the
    index built, or None when the active one already serves."""
    from ops.corpus import build_index, ensure_example_index, ingest_tenant_folder

    if not golden.corpus:
        return ensure_example_index(settings)
    for tenant, folders in golden.corpus.items():
        for folder in folders:
            ingest_tenant_folder(settings, tenant, folder)
    return build_index(settings)[0]


def run_cases(settings: Settings, golden: GoldenSet, spawn_workers: bool,
              on_progress: Any = None, timeout_s: float | None = None) -> tuple[str, float]:
    """Submit the cases as one job and wait for it; returns the job id and the wall time."""
    from ops.jobs import execute_job

    nonce = uuid.uuid4().hex[:NONCE_CHARS]
    with tempfile.TemporaryDirectory() as folder:
        job_file = Path(folder) / f"eval-{nonce}.jsonl"
        job_file.write_text(job_lines(golden.cases, nonce), encoding="utf-8")
        started = time.monotonic()
        admitted, done = execute_job(settings, job_file, spawn_workers,
                                     on_progress or (lambda d, t: None), timeout_s)
    if not done:
        raise TimeoutError(f"eval job {admitted.job_id} did not finish within {timeout_s}s")
    return admitted.job_id, time.monotonic() - started


def read_outcomes(settings: Settings, job_id: str, cases: list[GoldenCase]) -> list[CaseOutcome]:
    """What the pipeline did with each case, from the audit store."""
    with session_scope(settings.database_url) as session:
        requests = {r.custom_id.rsplit(":", 1)[0]: r for r in job_requests(session, job_id)}
        ids = [r.id for r in requests.values()]
        events: dict[str, list[AuditEvent]] = defaultdict(list)
        for event in session.scalars(select(AuditEvent).where(
                AuditEvent.request_id.in_(ids), AuditEvent.kind.in_(READ_EVENTS))
                .order_by(AuditEvent.id)):
            events[event.request_id].append(event)
        read = {c for evs in events.values() for e in evs if e.kind == EventKind.DATA_READ
                for c in e.payload.get("chunk_ids", [])}
        cited = {c for r in requests.values() for c in (r.citations or [])}
        chunks = {row.id: _ChunkRow(row.tenant_id, row.document_id, row.text)
                  for row in session.execute(
                      select(Chunk.id, Chunk.tenant_id, Chunk.document_id, Chunk.text)
                      .where(Chunk.id.in_(read | cited)))}
        drafts = _last_drafts(session, ids)
        return [_outcome(case, requests[case.id], events[requests[case.id].id], chunks,
                         drafts.get(requests[case.id].id)) for case in cases]


def _last_drafts(session: Any, request_ids: list[str]) -> dict[str, str]:
    """Each request's last generated draft (documents are schema-checked on it)."""
    rows = session.execute(select(StageRun.request_id, StageRun.output)
                           .where(StageRun.request_id.in_(request_ids),
                                  StageRun.stage == "generation", StageRun.output.is_not(None))
                           .order_by(StageRun.run, StageRun.round)).all()
    return {rid: str((output or {}).get("text", "")) for rid, output in rows}


@dataclass(frozen=True)
class _ChunkRow:
    tenant: str
    document_id: str
    text: str


def _outcome(case: GoldenCase, request: Request, events: list[AuditEvent],
             chunks: dict[str, _ChunkRow], draft: str | None) -> CaseOutcome:
    reads = [c for e in events if e.kind == EventKind.DATA_READ
             for c in e.payload.get("chunk_ids", [])]
    route = [e.payload for e in events if e.kind == EventKind.ROUTE_DECISION]
    calls = [e.payload for e in events if e.kind == EventKind.MODEL_CALL]
    finished = request.finished_at or request.admitted_at
    return CaseOutcome(
        case_id=case.id, area=case.area, request_id=request.id, status=request.status,
        answer_class=route[-1].get("answer_class") if route else None,
        output=request.output or "", error_class=request.error_class,
        cited_documents=sorted({chunks[c].document_id for c in request.citations or []
                                if c in chunks}),
        retrieved_documents=sorted({chunks[c].document_id for c in reads if c in chunks}),
        tools_called=[e.payload.get("tool", "") for e in events if e.kind == EventKind.TOOL_CALL],
        injection_signals=sum(e.kind == EventKind.INJECTION_SIGNAL for e in events),
        foreign_reads=sum(1 for c in reads if c in chunks and chunks[c].tenant != request.tenant_id),
        poisoned_reads=sum(1 for c in reads if c in chunks
                           and any(canary in chunks[c].text for canary in case.canaries)),
        schema_valid=_schema_valid(request, draft),
        latency_s=(as_utc(finished) - as_utc(request.admitted_at)).total_seconds(),
        prompt_tokens=request.prompt_tokens, completion_tokens=request.completion_tokens,
        cost_usd=sum(float(c.get("cost_usd", 0.0)) for c in calls))


def _schema_valid(request: Request, draft: str | None) -> bool | None:
    """Documents only: whether the last draft parses into its template's model."""
    if request.kind != "document" or draft is None:
        return None
    contract = ContractRegistry.default().contracts.get(str(request.payload.get("template")))
    return contract is not None and contract.check(draft)[0] is not None


def build_report(golden: GoldenSet, cases: list[GoldenCase], outcomes: list[CaseOutcome],
                 versions: dict[str, str], wall_s: float) -> EvalReport:
    from ops.evals.score import cost, latency, score

    return EvalReport(run_id=f"eval-{uuid.uuid4().hex[:12]}", golden=golden.label,
                      versions=versions, metrics=score(cases, outcomes),
                      latency_s=latency(outcomes), cost=cost(outcomes), outcomes=outcomes,
                      started_at=datetime.now(UTC).isoformat(timespec="seconds"),
                      wall_s=round(wall_s, 2))


def record_run(settings: Settings, report: EvalReport, job_id: str, gate: str | None) -> None:
    with session_scope(settings.database_url) as session:
        session.add(EvalRun(id=report.run_id, golden=report.golden, job_id=job_id,
                            versions=report.versions, cases=len(report.outcomes), gate=gate,
                            metrics={k: m.value for k, m in report.metrics.items()},
                            wall_s=report.wall_s))


def served_versions(settings: Settings, job_id: str) -> dict[str, str]:
    """The version tuple the job's requests were pinned to (one per run: the latest)."""
    with session_scope(settings.database_url) as session:
        pinned_id = session.scalars(select(Request.pinned_versions_id)
                                    .where(Request.job_id == job_id)).first()
        return dict(versions_by_id(session.connection(), [pinned_id]).get(pinned_id or "", {}))
