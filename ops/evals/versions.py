"""Which version tuples served traffic in a window, and how their requests and eval runs did."""

from __future__ import annotations

import hashlib
import json
import statistics
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import select

from workers.settings import Settings
from workers.store.engine import session_scope
from workers.store.models import EvalRun, Request
from workers.store.timeutil import as_utc
from workers.store.tuples import versions_by_id


def tuple_key(versions: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(versions, sort_keys=True).encode()).hexdigest()[:12]


@dataclass
class TupleTraffic:
    key: str
    versions: dict[str, str]
    requests: int = 0
    statuses: dict[str, int] = field(default_factory=dict)
    latencies: list[float] = field(default_factory=list)
    tokens: int = 0
    first: datetime | None = None
    last: datetime | None = None

    @property
    def success_rate(self) -> float:
        return self.statuses.get("succeeded", 0) / self.requests if self.requests else 0.0

    @property
    def p50_s(self) -> float:
        return statistics.median(self.latencies) if self.latencies else 0.0

    @property
    def tokens_per_request(self) -> float:
        return self.tokens / self.requests if self.requests else 0.0


def traffic_by_tuple(settings: Settings, since: datetime) -> list[TupleTraffic]:
    """Requests admitted since `since`, grouped by pinned tuple, most recent tuple first."""
    groups: dict[str, TupleTraffic] = {}
    with session_scope(settings.database_url) as session:
        rows = session.execute(select(Request.pinned_versions_id, Request.status,
                                      Request.admitted_at, Request.finished_at,
                                      Request.prompt_tokens, Request.completion_tokens)
                               .where(Request.admitted_at >= since)).all()
        tuples = versions_by_id(session.connection(), {row.pinned_versions_id for row in rows})
    for pinned_id, status, admitted, finished, prompt, completion in rows:
        pinned = tuples[pinned_id]
        key = tuple_key(pinned)
        group = groups.setdefault(key, TupleTraffic(key, dict(pinned)))
        admitted = as_utc(admitted)
        group.requests += 1
        group.statuses[status] = group.statuses.get(status, 0) + 1
        group.tokens += prompt + completion
        group.first = min(group.first or admitted, admitted)
        group.last = max(group.last or admitted, admitted)
        if finished is not None:
            group.latencies.append((as_utc(finished) - admitted).total_seconds())
    return sorted(groups.values(), key=lambda g: g.last or since, reverse=True)


def eval_runs_by_tuple(settings: Settings) -> dict[str, list[EvalRun]]:
    runs: dict[str, list[EvalRun]] = defaultdict(list)
    with session_scope(settings.database_url) as session:
        for run in session.scalars(select(EvalRun).order_by(EvalRun.created_at)):
            session.expunge(run)
            runs[tuple_key(run.versions)].append(run)
    return runs
