"""Running a job file: parse, admit, enqueue, wait, write results.jsonl and errors.jsonl."""

from __future__ import annotations

import json
import os
import signal
import statistics
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from schemas.documents import DocumentModel
from schemas.events import EventKind
from schemas.requests import MalformedLine, RequestLine, parse_request_line
from schemas.status import RESULT_STATUSES, Lane, Stage, Status
from tasks.render import SourceRef, render_document, render_markdown
from tasks.validators.contract import ContractRegistry
from workers.runtime import pinned_versions_now
from workers.settings import Settings
from workers.store.admission import (
    ADMIT_CHUNK_LINES,
    NEVER_ADMITTED,
    NOT_ADMITTED,
    AdmittedJob,
    admit_job_in_chunks,
    job_counts,
    stored_malformed,
)
from workers.store.engine import session_scope
from workers.store.models import AuditEvent, Document, Job, Request, StageRun
from workers.store.operators import ACTIVE, job_active, job_requests
from workers.store.progress import Ended, EndedListener
from workers.store.timeutil import as_utc
from workers.store.tuples import versions_by_id


@dataclass(frozen=True)
class ParsedJob:
    content: bytes
    lines: list[RequestLine]
    line_numbers: list[int]
    malformed: list[MalformedLine]


def parse_job_file(path: Path) -> ParsedJob:
    """Every non-blank line becomes a request or a malformed line; custom_ids, and a tenant's
    idempotency keys, must be unique within the file.

    Lines end at a newline byte only (a CR before it is dropped): JSON strings may hold
    U+2028 and the other separators `str.splitlines` would cut at. Each line must be UTF-8
    (a byte-order mark at the start of the file is skipped); one that is not is malformed,
    not silently repaired."""
    content = path.read_bytes()
    lines, numbers, malformed = [], [], []
    custom_ids: set[str] = set()
    keys: dict[tuple[str, str], int] = {}  # (tenant, idempotency key) -> its first line
    for line_no, raw in enumerate(_raw_lines(content), 1):
        parsed = _parse_raw_line(raw, line_no)
        if parsed is None:
            continue
        if isinstance(parsed, RequestLine):
            parsed = _repeated(parsed, line_no, custom_ids, keys)
        if isinstance(parsed, MalformedLine):
            malformed.append(parsed)
            continue
        custom_ids.add(parsed.custom_id)
        lines.append(parsed)
        numbers.append(line_no)
    return ParsedJob(content, lines, numbers, malformed)


def _raw_lines(content: bytes) -> list[bytes]:
    lines = content.removeprefix(b"\xef\xbb\xbf").split(b"\n")
    if lines and not lines[-1]:
        lines.pop()  # the file's last newline ends its last line, it starts none
    return [line.removesuffix(b"\r") for line in lines]


def _parse_raw_line(raw: bytes, line_no: int) -> RequestLine | MalformedLine | None:
    """The line's request, or why it is none; None for a blank line."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        return MalformedLine(line_no=line_no, reason=f"not UTF-8: byte 0x{raw[exc.start]:02x} "
                                                     f"at column {exc.start + 1}")
    return parse_request_line(text, line_no) if text.strip() else None


def _repeated(line: RequestLine, line_no: int, custom_ids: set[str],
              keys: dict[tuple[str, str], int]) -> RequestLine | MalformedLine:
    """The line, or malformed when it repeats an earlier line's custom_id or key."""
    if line.custom_id in custom_ids:
        return MalformedLine(line_no=line_no, custom_id=line.custom_id,
                             reason=f"custom_id {line.custom_id!r} repeats an earlier line")
    if line.idempotency_key is not None:
        key = (line.tenant, line.idempotency_key)
        if key in keys:
            return MalformedLine(line_no=line_no, custom_id=line.custom_id,
                                 reason=f"idempotency_key {line.idempotency_key!r} repeats "
                                        f"line {keys[key]} of tenant {line.tenant!r}")
        keys[key] = line_no
    return line


def submit_job(settings: Settings, path: Path, lane: Lane = Lane.BATCH,
               chunk_lines: int = ADMIT_CHUNK_LINES) -> AdmittedJob:
    """Admit (or resume) the job and put its unfinished shards on the queues, chunk by chunk
    (see `admit_job_in_chunks`)."""
    from workers.dispatch import enqueue_all

    parsed = parse_job_file(path)
    return admit_job_in_chunks(
        settings.database_url, name=path.name, content=parsed.content, lines=parsed.lines,
        malformed=parsed.malformed, line_numbers=parsed.line_numbers,
        versions=pinned_versions_now(settings), drift_policy=settings.drift_policy,
        shard_size=settings.shard_size, lane=lane,
        on_dispatch=lambda dispatches: enqueue_all(dispatches, settings),
        chunk_lines=chunk_lines)


def wait_for_job(settings: Settings, job_id: str, on_progress: Callable[[int, int], None],
                 timeout_s: float | None = None, poll_s: float = 0.5,
                 min_gap_s: float = 0.02) -> bool:
    """Wait until every line of the job is admitted and every request terminal; False on
    timeout. The job's requests are counted (and `on_progress` told) at least every
    `poll_s`. On Postgres each commit that ends requests also says whose and how many: the
    waiter takes them off what its last count left, tells `on_progress`, and counts again
    as soon as that reaches zero, reading nothing in between. Other jobs' news is ignored;
    news that does not say how many (a cancel, a stage that failed as a whole, an older
    worker) makes it look for a request of the job still active, at most once per
    `min_gap_s`."""
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    tally = _JobTally(job_id, on_progress)
    with EndedListener(settings.database_url, min_gap_s=0) as ended:
        while True:
            counting = tally.must_count(poll_s)
            if counting or tally.must_look(min_gap_s):
                with session_scope(settings.database_url) as session:
                    if counting or not job_active(session, job_id):
                        tally.count(job_counts(session, job_id))  # one GROUP BY status
                tally.read()
                if tally.left == 0:
                    return True
            wake_in = tally.next_read_in(poll_s, min_gap_s)
            if deadline is not None:
                if time.monotonic() > deadline:
                    return False
                wake_in = min(wake_in, deadline - time.monotonic())
            tally.hear(ended.wait(max(0.0, wake_in)))


class _JobTally:
    """What a job's waiter knows between two reads of the store: what its last count left,
    less what the commits' news says ended since; whether it must count again (none should
    be left, or `poll_s` has passed since the last count) or look (news that did not say
    how many)."""

    def __init__(self, job_id: str, on_progress: Callable[[int, int], None]) -> None:
        self.job_id = job_id
        self.on_progress = on_progress
        self.left = self.total = 0
        self.counted_at = self.read_at = float("-inf")
        self.recount, self.look = True, False

    def must_count(self, poll_s: float) -> bool:
        return self.recount or time.monotonic() - self.counted_at >= poll_s

    def must_look(self, min_gap_s: float) -> bool:
        return self.look and time.monotonic() - self.read_at >= min_gap_s

    def next_read_in(self, poll_s: float, min_gap_s: float) -> float:
        due = self.counted_at + poll_s
        if self.look:
            due = min(due, self.read_at + min_gap_s)
        return due - time.monotonic()

    def count(self, counts: dict[str, int]) -> None:
        self.counted_at = time.monotonic()
        self.left = sum(counts.get(status, 0) for status in (*ACTIVE, NOT_ADMITTED))
        self.total = sum(counts.values())
        self.on_progress(self.total - self.left, self.total)

    def read(self) -> None:
        self.read_at = time.monotonic()
        self.recount = self.look = False

    def hear(self, news: list[Ended | None]) -> None:
        ours = 0
        for item in news:
            if item is not None and item.job_id != self.job_id:
                continue  # another job's
            if item is None or item.count is None:
                self.look = True
            else:
                ours += item.count
        if ours:
            # News that was also in the first count can take left below zero: the recount
            # it triggers puts it right.
            self.left -= ours
            self.on_progress(self.total - max(self.left, 0), self.total)
            self.recount = self.recount or self.left <= 0


@dataclass
class GenerationCost:
    """What generation spent on one request, over all its model calls (repairs included)."""

    calls: int = 0
    compute_s: float = 0.0
    queue_wait_s: float = 0.0
    cost_usd: float = 0.0
    batch_sizes: list[int] = field(default_factory=list)

    def add(self, payload: dict[str, Any]) -> None:
        self.calls += 1
        self.compute_s += float(payload.get("compute_s", 0.0))
        self.queue_wait_s += float(payload.get("queue_wait_s", 0.0))
        self.cost_usd += float(payload.get("cost_usd", 0.0))
        self.batch_sizes.append(int(payload.get("batch_size", 1)))

    def merge(self, other: GenerationCost) -> None:
        self.calls += other.calls
        self.compute_s += other.compute_s
        self.queue_wait_s += other.queue_wait_s
        self.cost_usd += other.cost_usd
        self.batch_sizes += other.batch_sizes

    def as_dict(self) -> dict[str, Any]:
        return {"model_calls": self.calls, "compute_s": round(self.compute_s, 6),
                "queue_wait_s": round(self.queue_wait_s, 6), "cost_usd": round(self.cost_usd, 9),
                "batch_sizes": self.batch_sizes}


def generation_costs(session: Session, request_ids: list[str]) -> dict[str, GenerationCost]:
    """Per request, the accounting its model-call audit events recorded."""
    costs: dict[str, GenerationCost] = {rid: GenerationCost() for rid in request_ids}
    for start in range(0, len(request_ids), 500):
        rows = session.execute(select(AuditEvent.request_id, AuditEvent.payload).where(
            AuditEvent.request_id.in_(request_ids[start:start + 500]),
            AuditEvent.kind == EventKind.MODEL_CALL)).all()
        for request_id, payload in rows:
            costs[request_id].add(payload)
    return costs


def execute_job(settings: Settings, job_file: Path, spawn_workers: bool,
                on_progress: Callable[[int, int], None], timeout_s: float | None = None,
                on_admitted: Callable[[AdmittedJob], None] | None = None
                ) -> tuple[AdmittedJob, bool]:
    """Admit a job file and wait until every request is terminal (or the timeout), with one
    worker per queue started for the duration when `spawn_workers`, and a reconciler.
    Returns the admitted job and whether it finished. A worker that dies raises WorkerDied."""
    from ops.embedded import WorkerFleet
    from workers.reconciler import ReconcilerThread

    fleet = WorkerFleet(settings, settings.data_dir / "logs") if spawn_workers else None
    reconciler = ReconcilerThread(settings)
    with _exit_on_termination():  # so that `finally` stops the workers
        try:
            if fleet:
                fleet.start()
            admitted = submit_job(settings, job_file)
            if on_admitted:
                on_admitted(admitted)
            reconciler.start()

            def tick(done: int, total: int) -> None:
                on_progress(done, total)
                if fleet:
                    fleet.raise_if_dead()

            return admitted, wait_for_job(settings, admitted.job_id, tick, timeout_s=timeout_s)
        finally:
            reconciler.stop()
            if fleet:
                fleet.stop()


class Terminated(SystemExit):
    """SIGTERM or SIGHUP reached the command: it unwinds as from Ctrl-C, workers stopped."""


@contextmanager
def _exit_on_termination() -> Iterator[None]:
    """Within it, SIGTERM and SIGHUP raise `Terminated` (exit status 128 + the signal): by
    default they end the process without running `finally`, and its workers are left behind
    (a `timeout`, a cancelled CI job, a closed terminal). The main thread only: handlers
    cannot be set from others."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def terminate(signum: int, _frame: object) -> None:
        for ignored in previous:  # a second signal must not cut the cleanup short
            signal.signal(ignored, signal.SIG_IGN)
        raise Terminated(128 + signum)

    previous: dict[int, Any] = {}
    for signum in (signal.SIGTERM, signal.SIGHUP):
        previous[signum] = signal.signal(signum, terminate)
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def result_line(request: Request, versions: dict[str, Any], markdown: str | None = None,
                cost: GenerationCost | None = None) -> dict[str, Any]:
    """A request's line of results.jsonl; `versions` is the tuple it pins."""
    return {"custom_id": request.custom_id, "request_id": request.id, "status": request.status,
            "output": request.output, "citations": list(request.citations or []),
            "markdown": markdown, "versions": versions,
            "tokens": {"prompt": request.prompt_tokens, "completion": request.completion_tokens},
            "generation": (cost or GenerationCost()).as_dict(),
            "reason": request.error_message if request.status != Status.SUCCEEDED else None}


def rendered(session: Session, requests: list[Request]) -> dict[str, str]:
    """Markdown with numbered citations for each succeeded request: the labels of its last
    draft, the chunks its run read, and the documents those chunks belong to."""
    done = {r.id: r for r in requests if r.status == Status.SUCCEEDED}
    if not done:
        return {}
    rows = session.execute(
        select(StageRun.request_id, StageRun.stage, StageRun.run, StageRun.round, StageRun.output)
        .where(StageRun.request_id.in_(list(done)),
               StageRun.stage.in_([Stage.RETRIEVAL.value, Stage.GENERATION.value]),
               StageRun.status == "done").order_by(StageRun.round)).all()
    labels: dict[str, dict[str, str]] = {}
    chunks: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        if row.run != done[row.request_id].run or not row.output:
            continue
        if row.stage == Stage.GENERATION:
            labels[row.request_id] = dict(row.output.get("source_labels", {}))
        else:
            chunks[row.request_id] = list(row.output.get("chunks", []))
    document_ids = {c["document_id"] for cs in chunks.values() for c in cs}
    paths = dict(session.execute(select(Document.id, Document.tenant_id + "/" + Document.path)
                                 .where(Document.id.in_(document_ids))).all())
    out = {}
    contracts = ContractRegistry.default()
    for rid, request in done.items():
        sources = {c["chunk_id"]: SourceRef(c["document_id"], c["title"],
                                            paths.get(c["document_id"], c["document_id"]))
                   for c in chunks.get(rid, [])}
        out[rid] = render_output(request, labels.get(rid, {}), sources, contracts)
    return out


def render_output(request: Request, labels: dict[str, str], sources: dict[str, SourceRef],
                  contracts: ContractRegistry) -> str:
    """A document whose output has its template's shape renders with its title and section
    headings; any other output renders as cited text. The shape only: the content was judged
    by the validators the request was pinned to, and exporting it again under a later
    contract must not turn it into plain text."""
    text = request.output or ""
    template = (request.payload or {}).get("template") if request.kind == "document" else None
    contract = contracts.contracts.get(str(template)) if template else None
    if contract is not None and issubclass(contract.model, DocumentModel):
        try:
            document = contract.model.delivered(contract.parse(text))
        except ValueError:  # not JSON (json.JSONDecodeError is a ValueError)
            document = None
        if document is not None:
            return render_document(document, labels, sources)
    return render_markdown(text, labels, sources)


def error_line(request: Request) -> dict[str, Any]:
    return {"custom_id": request.custom_id, "request_id": request.id, "line": request.line_no,
            "status": request.status, "error_class": request.error_class,
            "stage": request.error_stage, "message": request.error_message}


def export_job(settings: Settings, job_id: str, out_dir: Path) -> tuple[Path, Path]:
    """Every input line lands in exactly one of results.jsonl and errors.jsonl."""
    out_dir.mkdir(parents=True, exist_ok=True)
    with session_scope(settings.database_url) as session:
        job = session.get(Job, job_id)
        if job is None:
            raise ValueError(f"no job with id {job_id!r}")
        counts = job_counts(session, job_id)
        if NOT_ADMITTED in counts:
            raise ValueError(f"{counts[NOT_ADMITTED]} line(s) of job {job_id} were never "
                             f"admitted (its admission was cut short): submit its file again")
        requests = job_requests(session, job_id)
        malformed = stored_malformed(session, job_id)
        markdown = rendered(session, requests)
        costs = generation_costs(session, [r.id for r in requests])
        pins = versions_by_id(session.connection(), {r.pinned_versions_id for r in requests})
    results_path, errors_path = out_dir / "results.jsonl", out_dir / "errors.jsonl"
    results = [result_line(r, pins[r.pinned_versions_id], markdown.get(r.id), costs[r.id])
               for r in requests
               if r.status in RESULT_STATUSES]
    errors = [{"custom_id": m.custom_id, "line": m.line_no, "status": "malformed",
               "error_class": m.error_class, "stage": "admission", "message": m.reason}
              for m in malformed]
    errors += [error_line(r) for r in requests if r.status not in RESULT_STATUSES]
    errors.sort(key=lambda e: e.get("line") or 0)
    if NEVER_ADMITTED in counts:  # the store never saw these lines: one line says how many
        errors.append({"custom_id": None, "line": None, "status": Status.FAILED.value,
                       "error_class": "Cancelled", "stage": "admission",
                       "message": f"{counts[NEVER_ADMITTED]} line(s) were never admitted: the "
                                  f"job was cancelled while its file was being admitted"})
    _write_jsonl_files({results_path: results, errors_path: errors})
    return results_path, errors_path


def _write_jsonl_files(files: dict[Path, list[dict[str, Any]]]) -> None:
    """Write each file in full to a new file of its own beside it (two exports into one
    folder do not share one; created as `open` creates files, under the umask), flushed to
    disk, and only then put them all in place: a crash leaves the earlier files, not a
    half-written one, and the two files of an export are replaced within microseconds of
    each other."""
    written: list[tuple[Path, Path]] = []
    try:
        for path, rows in files.items():
            tmp_path = path.with_name(f".{path.name}.{uuid.uuid4().hex}")
            written.append((tmp_path, path))
            with tmp_path.open("x", encoding="utf-8") as tmp:
                tmp.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
                tmp.flush()
                os.fsync(tmp.fileno())
        for tmp_path, path in written:
            tmp_path.replace(path)
    finally:
        for tmp_path, _ in written:
            tmp_path.unlink(missing_ok=True)
    for folder in {path.parent for path in files}:
        _sync_folder(folder)


def _sync_folder(folder: Path) -> None:
    """Make the renames in `folder` survive a crash."""
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


@dataclass(frozen=True)
class JobSummary:
    counts: dict[str, int]
    malformed: int
    latency_s: dict[str, float]
    prompt_tokens: int
    completion_tokens: int
    generation: GenerationCost


def summarize(settings: Settings, job_id: str) -> JobSummary:
    with session_scope(settings.database_url) as session:
        job = session.get(Job, job_id)
        requests = job_requests(session, job_id)
        costs = generation_costs(session, [r.id for r in requests])
    total = GenerationCost()
    for cost in costs.values():
        total.merge(cost)
    latencies = sorted(
        (as_utc(r.finished_at) - as_utc(r.admitted_at)).total_seconds()  # type: ignore[operator]
        for r in requests if r.finished_at is not None)
    counts: dict[str, int] = {}
    for r in requests:
        counts[r.status] = counts.get(r.status, 0) + 1
    return JobSummary(counts, len(job.malformed) if job else 0, percentiles(latencies),
                      sum(r.prompt_tokens for r in requests),
                      sum(r.completion_tokens for r in requests), total)


def percentiles(values: list[float]) -> dict[str, float]:
    """p50, p95 and p99 (inclusive quantiles); {} without values."""
    if not values:
        return {}
    if len(values) == 1:
        return {"p50": values[0], "p95": values[0], "p99": values[0]}
    cuts = statistics.quantiles(values, n=100, method="inclusive")
    return {"p50": cuts[49], "p95": cuts[94], "p99": cuts[98]}
