"""The ticket system of record, the governed tools over it, and their executor.

`execute` is the only way a tool runs: it takes a `ToolCall`, has the registry validate it
(tool, allowlist, arguments, idempotency key), runs the tool in a savepoint under its timeout,
and records the call in `tool_calls` in the caller's transaction. A side-effect call claims
its `tool_calls` row before it runs, in the same transaction as its effect, so a redelivered
task gets the recorded result back and the effect happens once.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta, tzinfo
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from sqlalchemy import select, text
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session

from tasks.tools import (
    AddTicketNoteArgs,
    GetTicketArgs,
    ListOpenTicketsArgs,
    ServedFrom,
    ToolArgumentError,
    ToolCall,
    ToolError,
    ToolFailed,
    ToolOutput,
    ToolRegistry,
    ToolResult,
    ValidatedCall,
    error_result,
    ok_result,
)
from workers.store.admission import ensure_tenants
from workers.store.bulk import upsert
from workers.store.models import Ticket, TicketNote, ToolCallRecord
from workers.store.timeutil import as_utc, utcnow

OPEN, RESOLVED = "open", "resolved"
NOTES_SHOWN = 5
PG_QUERY_CANCELED = "57014"  # SQLSTATE of a statement cancelled by statement_timeout


@dataclass(frozen=True)
class ToolContext:
    """What every tool implementation gets besides its arguments."""

    tenant: str
    grants: frozenset[str]  # the calling request's: a ticket needs all its ACL's labels
    call_id: str
    now: datetime

    def may_read(self, ticket: Ticket) -> bool:
        return readable_by(ticket, self.grants)


def readable_by(ticket: Ticket, grants: frozenset[str]) -> bool:
    """A ticket is readable by grants that hold every label of its ACL, as a chunk is."""
    return set(ticket.acl or ()) <= grants


ToolImplementation = Callable[[Session, ToolContext, Any], ToolOutput]


# -- the tools ------------------------------------------------------------------------


def get_ticket(session: Session, ctx: ToolContext, args: GetTicketArgs) -> ToolOutput:
    """One ticket of the caller's tenant as it stands now; another tenant's, or one the
    caller's grants do not cover, is not found."""
    ticket = _ticket(session, ctx, args.ticket_id)
    if ticket is None:
        return ToolOutput(title=f"Ticket {args.ticket_id}",
                          content=f"As of {_iso(ctx.now)}, the ticket system has no ticket "
                                  f"{args.ticket_id}.",
                          data={"ticket_id": args.ticket_id, "found": False})
    notes = _notes(session, ticket)
    view = {**_ticket_view(ticket), "notes": notes}
    return ToolOutput(title=f"Ticket {ticket.id}: {ticket.title}",
                      content=f"As of {_iso(ctx.now)}, {_describe(ticket)}{_notes_text(notes)}",
                      data={"ticket_id": ticket.id, "found": True, "ticket": view})


def list_open_tickets(session: Session, ctx: ToolContext, args: ListOpenTicketsArgs) -> ToolOutput:
    """The tenant's open tickets that the caller's grants cover, most severe first, then
    newest. (A tenant's open tickets are few: the ACL is checked on each row here.)"""
    readable = [t for t in session.scalars(
        select(Ticket).where(Ticket.tenant_id == ctx.tenant, Ticket.status == OPEN)
        .order_by(Ticket.severity, Ticket.opened_at.desc().nulls_last(), Ticket.id)
        .execution_options(populate_existing=True)) if ctx.may_read(t)]
    total, rows = len(readable), readable[:args.limit]
    shown = f", the {len(rows)} most severe and newest below" if total > len(rows) else ""
    lines = [f"- {t.id} ({t.severity}, {t.service or 'no service'}, opened "
             f"{_iso(t.opened_at)}): {t.title}" for t in rows]
    content = (f"As of {_iso(ctx.now)}, there are {total} open tickets{shown}."
               + "".join(f"\n{line}" for line in lines))
    return ToolOutput(title="Open tickets", content=content,
                      data={"total_open": total, "limit": args.limit,
                            "tickets": [_ticket_view(t) for t in rows]})


def current_time(session: Session, ctx: ToolContext, args: Any) -> ToolOutput:
    """The current time in UTC (ISO 8601), with the date, weekday and ISO week."""
    now = ctx.now.astimezone(UTC)
    week = now.isocalendar().week
    return ToolOutput(title="Current time (UTC)",
                      content=f"The current time is {_iso(now)} (UTC), {now:%A} {now:%Y-%m-%d}, "
                              f"ISO week {week}.",
                      data={"utc": _iso(now), "date": now.date().isoformat(),
                            "weekday": f"{now:%A}", "iso_week": week,
                            "unix_s": int(now.timestamp())})


def add_ticket_note(session: Session, ctx: ToolContext, args: AddTicketNoteArgs) -> ToolOutput:
    """Append a note to one of the tenant's tickets that the caller may read (a side
    effect: runs once per key)."""
    ticket = _ticket(session, ctx, args.ticket_id)
    if ticket is None:
        raise ToolFailed("TicketNotFound", f"the ticket system has no ticket {args.ticket_id}")
    note = TicketNote(tenant_id=ctx.tenant, ticket_id=ticket.id, note=args.note,
                      tool_call_id=ctx.call_id, created_at=ctx.now)
    session.add(note)
    ticket.updated_at = ctx.now
    session.flush()
    return ToolOutput(title=f"Note added to {ticket.id}",
                      content=f"At {_iso(ctx.now)}, a note was added to ticket {ticket.id}: "
                              f"{args.note}",
                      data={"ticket_id": ticket.id, "note_id": note.id, "note": args.note})


TOOL_IMPLEMENTATIONS: dict[str, ToolImplementation] = {
    "get_ticket": get_ticket,
    "list_open_tickets": list_open_tickets,
    "current_time": current_time,
    "add_ticket_note": add_ticket_note,
}


def _ticket(session: Session, ctx: ToolContext, ticket_id: str) -> Ticket | None:
    """The ticket, if the caller's tenant holds it and its grants cover it: one it may not
    read is not found, as one that does not exist (its existence is not told either)."""
    ticket = session.scalar(select(Ticket).where(Ticket.tenant_id == ctx.tenant,
                                                 Ticket.id == ticket_id)
                            .execution_options(populate_existing=True))
    return ticket if ticket is not None and ctx.may_read(ticket) else None


def _notes(session: Session, ticket: Ticket) -> list[dict[str, str]]:
    rows = session.scalars(select(TicketNote).where(TicketNote.tenant_id == ticket.tenant_id,
                                                    TicketNote.ticket_id == ticket.id)
                           .order_by(TicketNote.id.desc()).limit(NOTES_SHOWN)).all()
    return [{"note": n.note, "added_at": _iso(n.created_at)} for n in reversed(rows)]


def _ticket_view(ticket: Ticket) -> dict[str, Any]:
    return {"id": ticket.id, "title": ticket.title, "status": ticket.status,
            "severity": ticket.severity, "service": ticket.service,
            "opened_at": _iso(ticket.opened_at), "resolved_at": _iso(ticket.resolved_at),
            "updated_at": _iso(ticket.updated_at), "summary": ticket.summary}


def _describe(ticket: Ticket) -> str:
    resolved = f" (resolved {_iso(ticket.resolved_at)})" if ticket.resolved_at else ""
    parts = [f"ticket {ticket.id} is {ticket.status}{resolved}: {ticket.title}.",
             f"Severity: {ticket.severity}.", f"Service: {ticket.service or 'not recorded'}.",
             f"Opened: {_iso(ticket.opened_at) or 'not recorded'}.",
             f"Last updated: {_iso(ticket.updated_at)}."]
    if ticket.summary:
        parts.append(f"Impact: {ticket.summary}")
    return " ".join(parts)


def _notes_text(notes: list[dict[str, str]]) -> str:
    return "".join(f"\nNote ({n['added_at']}): {n['note']}" for n in notes)


def _iso(value: datetime | None) -> str | None:
    moment = as_utc(value)
    if moment is None:
        return None
    return moment.astimezone(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


# -- the executor ---------------------------------------------------------------------


class _OverTime(Exception):
    """The tool finished after its timeout: its writes are rolled back."""


def execute(session: Session, registry: ToolRegistry, tenant: str, call: ToolCall, *,
            grants: Iterable[str],
            implementations: Mapping[str, ToolImplementation] = TOOL_IMPLEMENTATIONS) -> ToolResult:
    """Validate `call` for `tenant` with the calling request's `grants`, run it once under
    its timeout, record it, return the result.

    Raises `UnknownTool`, `ToolNotAllowed` or `ToolArgumentError` before anything runs (and
    `ToolArgumentError` when a side-effect call reuses a key of a different call). A tool's
    own failure or timeout is an `error` result, recorded like any other. The caller's
    transaction commits the record together with the tool's effects.
    """
    planned = registry.validate(tenant, call, grants)
    run = implementations.get(planned.spec.name)
    if run is None:
        raise ToolError(f"tool {planned.spec.name!r} is registered but has no implementation")
    now = utcnow()
    if planned.spec.side_effects:
        return _execute_once(session, planned, run, now)
    cached = _cached(session, planned, now)
    if cached is not None:
        return cached
    result = _run(session, planned, run, now)
    _record(session, planned, result, now)
    return result


def _execute_once(session: Session, call: ValidatedCall, run: ToolImplementation,
                  now: datetime) -> ToolResult:
    claimed = _claim(session, call, now)
    row = session.scalar(select(ToolCallRecord).where(ToolCallRecord.id == call.call_id)
                         .with_for_update().execution_options(populate_existing=True))
    if row is None:
        raise ToolArgumentError(f"idempotency key {call.idempotency_key!r} of tenant "
                                f"{call.tenant!r} was already used for a different call")
    if not claimed and row.outcome == "ok":
        return _from_row(row, "recorded")
    # A first run, or a retry of a call whose earlier run ended in an error.
    result = _run(session, call, run, now)
    _fill(row, result, now)
    session.flush()
    return result


def _claim(session: Session, call: ValidatedCall, now: datetime) -> bool:
    """Insert the call's row unless it (or its key) exists; Postgres waits here for a
    concurrent claim to commit, SQLite's write lock already serializes them."""
    values = {**_identity(call), "outcome": "pending", "executions": 0, "created_at": now}
    claim = upsert(session, ToolCallRecord).values(**values).on_conflict_do_nothing()
    inserted = session.execute(claim.returning(ToolCallRecord.id))
    return inserted.first() is not None


def _cached(session: Session, call: ValidatedCall, now: datetime) -> ToolResult | None:
    if call.spec.cache_ttl_s <= 0:
        return None
    row = session.scalar(select(ToolCallRecord).where(ToolCallRecord.id == call.call_id,
                                                      ToolCallRecord.outcome == "ok")
                         .execution_options(populate_existing=True))
    executed = as_utc(row.executed_at) if row is not None else None
    if row is None or executed is None or now - executed > timedelta(seconds=call.spec.cache_ttl_s):
        return None
    return _from_row(row, "cache")


def _run(session: Session, call: ValidatedCall, run: ToolImplementation,
         now: datetime) -> ToolResult:
    """Run the tool in a savepoint; an error or a late finish rolls its writes back."""
    timeout_s = call.spec.timeout_s
    start = time.perf_counter()
    try:
        with session.begin_nested(), _statement_timeout(session, timeout_s):
            output = run(session, ToolContext(call.tenant, call.grants, call.call_id, now),
                         call.args)
            session.flush()
            if time.perf_counter() - start > timeout_s:
                raise _OverTime
    except ToolFailed as exc:
        return error_result(call, exc.error_class, str(exc), time.perf_counter() - start)
    except (_OverTime, OperationalError) as exc:
        if isinstance(exc, OperationalError) and not _cancelled(exc):
            raise
        elapsed = time.perf_counter() - start
        return error_result(call, "ToolTimeout", f"{call.spec.name} did not finish within its "
                            f"timeout of {timeout_s} s (took {elapsed:.3f} s)", elapsed)
    return ok_result(call, output, time.perf_counter() - start)


@contextmanager
def _statement_timeout(session: Session, timeout_s: float) -> Iterator[None]:
    """On Postgres, cancel the tool's own statements past its timeout (a lock wait too);
    SQLite has no statement timeout, there the duration check alone applies."""
    if session.get_bind().dialect.name != "postgresql":
        yield
        return
    previous = session.scalar(text("SELECT current_setting('statement_timeout')"))
    session.execute(text("SELECT set_config('statement_timeout', :v, true)"),
                    {"v": str(max(1, math.ceil(timeout_s * 1000)))})
    yield
    # Only reached without an error; a rolled-back savepoint undoes the setting by itself.
    session.execute(text("SELECT set_config('statement_timeout', :v, true)"), {"v": previous})


def _cancelled(exc: OperationalError) -> bool:
    return getattr(exc.orig, "sqlstate", None) == PG_QUERY_CANCELED


def _record(session: Session, call: ValidatedCall, result: ToolResult, now: datetime) -> None:
    """Upsert a read-only call's row with its latest result."""
    latest = _result_values(result, now)
    statement = upsert(session, ToolCallRecord).values(**_identity(call), **latest,
                                                        executions=1, created_at=now)
    session.execute(statement.on_conflict_do_update(
        index_elements=["id"],
        set_={**latest, "executions": ToolCallRecord.__table__.c.executions + 1}))


def _fill(row: ToolCallRecord, result: ToolResult, now: datetime) -> None:
    for name, value in _result_values(result, now).items():
        setattr(row, name, value)
    row.executions += 1


def _identity(call: ValidatedCall) -> dict[str, Any]:
    return {"id": call.call_id, "tenant_id": call.tenant, "tool": call.spec.name,
            "version": call.spec.version, "args": call.args_json,
            "idempotency_key": call.idempotency_key, "side_effects": call.spec.side_effects}


def _result_values(result: ToolResult, now: datetime) -> dict[str, Any]:
    return {"outcome": result.outcome, "error_class": result.error_class,
            "result": {"title": result.title, "content": result.content, "data": result.data},
            "result_hash": result.result_hash, "duration_s": result.duration_s,
            "executed_at": now}


def _from_row(row: ToolCallRecord, served_from: ServedFrom) -> ToolResult:
    stored = row.result or {}
    return ToolResult.model_validate({
        "call_id": row.id, "tool": row.tool, "version": row.version, "tenant": row.tenant_id,
        "args": row.args, "idempotency_key": row.idempotency_key,
        "title": stored.get("title", ""), "content": stored.get("content", ""),
        "data": stored.get("data", {}), "result_hash": row.result_hash or "",
        "duration_s": row.duration_s or 0.0, "outcome": row.outcome,
        "error_class": row.error_class, "served_from": served_from})


# -- seeding the system of record from the example incident tickets --------------------


@dataclass(frozen=True)
class SeedReport:
    found: int  # ticket files parsed
    inserted: int  # new rows; tickets already in the store are left as they are
    skipped: list[str] = field(default_factory=list)  # files without a ticket id, or repeats


_TICKET_ID = re.compile(r"\bINC-\d{3,8}\b", re.IGNORECASE)
_HEADING = re.compile(r"^#\s+(.+?)\s*$", re.MULTILINE)
_FIELD = re.compile(r"^\s*[-*]\s*\*\*(?P<key>[^*\n]+?)\s*:?\s*\*\*\s*:?\s*(?P<value>.*?)\s*$",
                    re.MULTILINE)
_SEVERITY = re.compile(r"\bSEV\s*-?\s*(\d)\b", re.IGNORECASE)
_DATE = re.compile(r"\b(\d{4}-\d{2}-\d{2})\b")
_SAME_DAY = re.compile(r"(\d{1,2}:\d{2})\s*[–—-]\s*(\d{1,2}:\d{2})\s*([A-Z]{2,4})?\)")
_DATED = re.compile(r"(\d{4}-\d{2}-\d{2})\s+(\d{1,2}:\d{2})\s*([A-Z]{2,4})?\s+to\s+"
                    r"(\d{4}-\d{2}-\d{2})\s+(\d{1,2}:\d{2})")
_ZONES = {"ET": "America/New_York", "EST": "America/New_York", "EDT": "America/New_York",
          "CT": "America/Chicago", "CST": "America/Chicago", "CDT": "America/Chicago",
          "MT": "America/Denver", "PT": "America/Los_Angeles"}


def seed_tickets(session: Session, corpus_dir: Path) -> SeedReport:
    """Load `<corpus_dir>/<tenant>/**/inc-*.md` into `tickets`, each with the ACL of its
    folder (`<tenant>/<acl>/...`, as ingest labels documents); tickets already present are
    kept (the store, not the files, is the system of record), so seeding again is a no-op."""
    tickets: dict[tuple[str, str], dict[str, Any]] = {}
    skipped: list[str] = []
    for path in sorted(corpus_dir.rglob("*.md")):
        parts = path.relative_to(corpus_dir).parts
        if len(parts) < 2 or not path.name.lower().startswith("inc-"):
            continue
        # Readable as the documents of its folder are: `<tenant>/<acl>/...`.
        ticket = parse_ticket(parts[0], path.read_text(encoding="utf-8", errors="replace"), path,
                              acl=[parts[1]] if len(parts) > 2 else [])
        if ticket is None or (ticket["tenant_id"], ticket["id"]) in tickets:
            skipped.append(str(path))
            continue
        tickets[(ticket["tenant_id"], ticket["id"])] = ticket
    if not tickets:
        return SeedReport(0, 0, skipped)
    ensure_tenants(session, {tenant for tenant, _ in tickets})
    inserted = session.execute(upsert(session, Ticket).values(list(tickets.values()))
                               .on_conflict_do_nothing(index_elements=["tenant_id", "id"])
                               .returning(Ticket.id)).all()
    return SeedReport(len(tickets), len(inserted), skipped)


def parse_ticket(tenant: str, body: str, path: Path,
                 acl: list[str] | None = None) -> dict[str, Any] | None:
    """A `tickets` row from an incident write-up's Markdown, or None without a ticket id.

    Reads the `- **Field:** value` summary lines (Ticket, Severity, Service, Date, Duration,
    Impact, and Status when present); without a Status line, "Incident resolved" in the
    timeline marks it resolved.
    """
    fields = {m["key"].strip().lower(): m["value"] for m in _FIELD.finditer(body)}
    heading = next(iter(_HEADING.findall(body)), "")
    found = (_TICKET_ID.search(fields.get("ticket", "")) or _TICKET_ID.search(heading)
             or _TICKET_ID.search(path.name))
    if found is None:
        return None
    ticket_id = found.group(0).upper()
    status = _status(fields.get("status"), body)
    opened_at, ended_at = _span(fields.get("date", ""), fields.get("duration", ""))
    title = re.sub(r"^INC-\d+\s*[:—–-]\s*", "", heading, flags=re.IGNORECASE).strip()
    severity = _SEVERITY.search(fields.get("severity", ""))
    return {"tenant_id": tenant, "id": ticket_id, "title": (title or ticket_id)[:512],
            "status": status, "severity": f"SEV{severity.group(1)}" if severity else "unknown",
            "service": _plain(re.sub(r"\s*\(.*\)\s*$", "", fields.get("service", "")))[:256] or None,
            "summary": _plain(fields.get("impact", ""))[:2000], "opened_at": opened_at,
            "resolved_at": ended_at if status == RESOLVED else None, "source": str(path)[:1024],
            "updated_at": ended_at or opened_at or utcnow(), "acl": acl or []}


def _status(declared: str | None, body: str) -> str:
    if declared:
        return RESOLVED if re.search(r"resolved|closed|done|fixed", declared, re.I) else OPEN
    return RESOLVED if re.search(r"\bincident\s+(?:was\s+)?resolved\b", body, re.I) else OPEN


def _plain(value: str) -> str:
    return re.sub(r"[*`]", "", value).strip()


def _span(date_text: str, duration: str) -> tuple[datetime | None, datetime | None]:
    """Start and end of the incident from its Date and Duration lines (local zone to UTC);
    the date at midnight UTC when the times cannot be read."""
    dated = _DATED.search(duration)
    if dated:
        zone = _zone(dated[3])
        return _at(dated[1], dated[2], zone), _at(dated[4], dated[5], zone)
    day = _DATE.search(date_text)
    if day is None:
        return None, None
    same_day = _SAME_DAY.search(duration)
    if same_day is None:
        return _at(day[1], "00:00", UTC), None
    zone = _zone(same_day[3])
    start, end = _at(day[1], same_day[1], zone), _at(day[1], same_day[2], zone)
    return start, (end + timedelta(days=1) if end < start else end)


def _zone(name: str | None) -> tzinfo:
    if name is None or name not in _ZONES:
        return UTC
    try:
        return ZoneInfo(_ZONES[name])
    except ZoneInfoNotFoundError:  # no tz database on this machine
        return UTC


def _at(day: str, clock: str, zone: tzinfo) -> datetime:
    local = datetime.strptime(f"{day} {clock}", "%Y-%m-%d %H:%M").replace(tzinfo=zone)
    return local.astimezone(UTC)


def is_ticket_id(value: str) -> bool:
    """Whether `value` has the shape of this system of record's ids (`INC-2057`)."""
    return _TICKET_ID.fullmatch(value) is not None


def unheld_record_ids(session: Session, tenant: str, grants: Iterable[str],
                      candidates: list[str]) -> set[str]:
    """Of `candidates`, the ticket ids `tenant` does not hold or `grants` do not cover,
    whether another tenant holds them or none does: what other tenants hold, and which of
    its own tickets a caller may not read, is never told apart from what does not exist."""
    if not candidates:
        return set()
    granted = frozenset(grants)
    readable = {t.id for t in session.scalars(select(Ticket).where(
        Ticket.tenant_id == tenant, Ticket.id.in_(candidates))) if readable_by(t, granted)}
    return set(candidates) - readable
