"""The one task base class: every stage's I/O, leases, versions, deadlines and retries.

A stage task body is one line: `return self.execute(stage, hop, compute)`. This class
claims the message's shard stage under a lease, loads the active records in one query,
decides what ends before the stage runs (poison, cancelled, deadline, strict drift), calls
the stage, and commits outputs, request outcomes and audit events in one transaction. Only
transient trouble raises; it is retried with capped exponential backoff and full jitter.
"""

from __future__ import annotations

import atexit
import gc
import logging
import os
import random
import socket
import time
from collections.abc import Callable
from contextvars import ContextVar
from datetime import datetime
from typing import Any

from celery import Task
from celery.exceptions import Ignore, SoftTimeLimitExceeded
from kombu.exceptions import OperationalError as BrokerError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeout
from sqlalchemy.exc import DisconnectionError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout

from schemas.events import EventKind
from schemas.stages import AuditRecord, Hop, ItemRecord, ItemResult, Outcome
from schemas.status import DriftPolicy, Lane, Stage, Status
from schemas.versions import VersionTuple
from tasks.engine.types import BackendUnavailable
from workers.runtime import Runtime, get_runtime, wait_for_libraries
from workers.store import stage_runs as runs
from workers.store.engine import session_scope
from workers.store.timeutil import as_utc, utcnow

log = logging.getLogger("sluice.stage")

Results = tuple[list[ItemResult], list[AuditRecord]]
Compute = Callable[[Runtime, list[ItemRecord], float | None], Results]


class TransientError(RuntimeError):
    """Trouble that a later attempt may not meet (accelerator out of memory, a busy dependency)."""


# Whether this delivery is the last one the retry policy allows (True outside a task): a
# stage then records as failed the trouble it would otherwise raise as transient, and keeps
# the results it has for the rest of its shard.
LAST_ATTEMPT: ContextVar[bool] = ContextVar("sluice_last_attempt", default=True)


# Retried with backoff. Everything else is permanent and ends the claimed items as failed.
# The driver's timeouts are not the built-in TimeoutError: a Redis socket timeout, a
# connection pool with none free in time, a connection lost on checkout. A model server
# that a worker warming up cannot reach (BackendUnavailable) may be restarting.
TRANSIENT_ERRORS: tuple[type[BaseException], ...] = (
    OperationalError, DisconnectionError, PoolTimeout, RedisConnectionError, RedisTimeout,
    BrokerError, TimeoutError, ConnectionError, SoftTimeLimitExceeded, TransientError,
    BackendUnavailable,
)
# Seconds a stage needs at least; a request whose deadline is nearer ends before it starts.
MIN_STAGE_S = {Stage.ROUTER: 0.0, Stage.RETRIEVAL: 0.05, Stage.GENERATION: 0.5,
               Stage.VALIDATION: 0.0}


class StageTask(Task):  # type: ignore[misc]
    """Base of the four stage tasks. Idempotent on (request, stage, run, round)."""

    acks_late = True
    reject_on_worker_lost = True

    def execute(self, stage: Stage, hop_data: dict[str, Any], compute: Compute) -> dict[str, Any]:
        runtime = get_runtime()
        last = LAST_ATTEMPT.set(self._last_attempt(runtime))
        try:
            return self._execute(runtime, stage, hop_data, compute)
        finally:
            LAST_ATTEMPT.reset(last)

    def _last_attempt(self, runtime: Runtime) -> bool:
        """Whether the retry policy allows no delivery after this one."""
        return bool(self.request.retries >= runtime.settings.max_retries)

    def _execute(self, runtime: Runtime, stage: Stage, hop_data: dict[str, Any],
                 compute: Compute) -> dict[str, Any]:
        key = runs.StageKey(Hop.model_validate(hop_data), stage)
        owner = runs.LeaseOwner(socket.gethostname(), os.getpid(), self.request.id or "direct")
        try:
            with session_scope(runtime.settings.database_url) as session:
                claim = runs.claim(session, key, owner, runtime.settings.lease_s)
            if claim.state == runs.ClaimState.DONE:
                return self._forward(runtime, key, hop_data)
        except TRANSIENT_ERRORS as exc:  # nothing claimed yet: just try the message again
            raise self.retry(exc=exc, countdown=self._backoff_s(runtime),
                             max_retries=runtime.settings.max_retries) from exc
        lease = claim.lease  # set exactly when CLAIMED
        if lease is None:
            raise Ignore()  # another live delivery computes, or nothing is left
        try:
            self._run_claimed(runtime, key, owner, lease, compute)
            _freeze_warm_heap()
        except runs.LeaseLost:
            log.warning("lease lost on %s %s; the other delivery commits", stage, key.hop)
            raise Ignore() from None
        except TRANSIENT_ERRORS as exc:
            self._retry_or_fail(runtime, key, owner, lease, exc)
        except Exception as exc:  # permanent: a bug or bad state must not loop forever
            log.exception("%s failed permanently on shard %s", stage, key.hop.shard_id)
            self._fail_claimed(runtime, key, owner, lease, exc)
        return hop_data

    def _backoff_s(self, runtime: Runtime) -> float:
        """Capped exponential backoff with full jitter."""
        ceiling = min(runtime.settings.retry_backoff_max_s, 2.0 ** self.request.retries)
        return random.uniform(0, ceiling)

    def _forward(self, runtime: Runtime, key: runs.StageKey, hop_data: dict[str, Any]) -> dict[str, Any]:
        """A redelivery of a committed stage: pass the recorded output on, compute nothing.
        A validation that sent drafts back, redelivered because its process died before it
        enqueued them, sends them now."""
        with session_scope(runtime.settings.database_url) as session:
            waiting = runs.next_stage_waiting(session, key)
            repair = runs.repair_waiting(session, key)
        if repair is not None:
            lane, count = repair
            self._send_back(runtime, key, Lane(lane), count)
        if not waiting:
            raise Ignore()
        return hop_data

    def _run_claimed(self, runtime: Runtime, key: runs.StageKey, owner: runs.LeaseOwner,
                     lease: runs.Lease, compute: Compute) -> None:
        settings = runtime.settings
        ids = lease.request_ids
        started = time.monotonic()
        # The lease is renewed from the claim on: warm-up and hashing count as work too.
        with runtime.leases.holding(settings.database_url, lease.id, owner, settings.lease_s):
            wait_for_libraries()
            with session_scope(settings.database_url) as session:
                states, records = runs.load_shard(session, ids, key)
            served = runtime.served_versions(key.stage)
            decided, events = _decide_before_stage(key.stage, key.hop.run, states,
                                                   lease.deliveries, served,
                                                   settings.max_deliveries)
            active = [r for r in records if r.request_id not in decided]
            results: list[ItemResult] = []
            if active:
                budget = _budget_s([states[r.request_id].deadline_at for r in active])
                results, stage_events = compute(runtime, active, budget)
                events += stage_events
            queued = frozenset(rid for rid, s in states.items() if s.status == Status.QUEUED)
            work = runs.StageCommit(key, owner, lease, list(decided.values()) + results,
                                    events, served.model_dump(), time.monotonic() - started,
                                    queued, settings.notify_ends,
                                    frozenset(s.job_id for s in states.values()))
            with session_scope(settings.database_url) as session:
                committed = runs.commit(session, work)
                lane = runs.shard_lane(session, key.hop.shard_id) if committed.repair else None
        if lane is not None:
            self._send_back(runtime, key, Lane(lane), len(committed.repair))

    @staticmethod
    def _send_back(runtime: Runtime, key: runs.StageKey, lane: Lane, count: int) -> None:
        """Drafts that failed validation go through generation again in the next round. The
        shard stage is committed; if this enqueue fails, the reconciler re-drives it."""
        from workers.dispatch import enqueue
        from workers.store.admission import Dispatch

        hop = key.hop.model_copy(update={"round": key.hop.round + 1})
        try:
            enqueue(Dispatch(hop, Stage.GENERATION, lane), runtime.settings)
        except Exception:
            log.exception("could not enqueue the repair round %s of shard %s (%d items); "
                          "the reconciler will", hop.round, hop.shard_id, count)

    def _retry_or_fail(self, runtime: Runtime, key: runs.StageKey, owner: runs.LeaseOwner,
                       lease: runs.Lease, exc: BaseException) -> None:
        settings = runtime.settings
        if self._last_attempt(runtime):
            self._fail_claimed(runtime, key, owner, lease, exc)
            return
        with session_scope(settings.database_url) as session:
            runs.release(session, lease.id, owner)
        raise self.retry(exc=exc, countdown=self._backoff_s(runtime),
                         max_retries=settings.max_retries)

    def _fail_claimed(self, runtime: Runtime, key: runs.StageKey, owner: runs.LeaseOwner,
                      lease: runs.Lease, exc: BaseException) -> None:
        """End every claimed item still active as failed at this stage, with the error's
        class and text."""
        outcome = Outcome(status=Status.FAILED, error_class=type(exc).__name__,
                          message=str(exc)[:2000] or type(exc).__name__)
        with session_scope(runtime.settings.database_url) as session:
            runs.fail_claimed(session, key, owner, lease, outcome,
                              runtime.settings.notify_ends)


_heap_frozen = False
# Allocations (less deallocations) between two young-generation collections. A stage builds
# and drops a few hundred containers per item (rows, outputs, events), nearly none of them in
# a cycle: at the default 700 a shard of 64 sets off dozens of collections that each find
# nothing to free and push what is still in use into the older generations, which then get
# walked too. Measured in-process on the warm benchmark: collections cost 0.028 ms of CPU per
# item at 700, 0.004 at this value.
YOUNG_GC_ALLOCATIONS = 20_000


def _freeze_warm_heap() -> None:
    """Once a process has computed a stage, what it loaded for it (models, index, rules) lives
    as long as the process: collect once, then move every object out of the collector's
    generations (`gc.freeze`), so later full collections walk only what tasks allocate; and
    collect the young generation less often (see YOUNG_GC_ALLOCATIONS)."""
    global _heap_frozen
    if not _heap_frozen:
        _heap_frozen = True
        gc.collect()
        gc.freeze()
        _, older, oldest = gc.get_threshold()
        gc.set_threshold(YOUNG_GC_ALLOCATIONS, older, oldest)
        # Frozen objects are never collected, not even at exit, where extension modules
        # would then report them as leaked.
        atexit.register(gc.unfreeze)


def _decide_before_stage(stage: Stage, run: int, states: dict[str, runs.RequestState],
                         deliveries: int, served: VersionTuple,
                         max_deliveries: int) -> tuple[dict[str, ItemResult], list[AuditRecord]]:
    """Outcomes settled without running the stage, and the drift events of `follow`."""
    decided: dict[str, ItemResult] = {}
    events: list[AuditRecord] = []
    now = utcnow()
    drifts = _DriftOf(served, stage)
    for rid, state in states.items():
        result, event = _gate_one(stage, run, rid, state, deliveries, drifts,
                                  max_deliveries, now)
        if result is not None:
            decided[rid] = result
        if event is not None:
            events.append(event)
    return decided, events


class _DriftOf:
    """A pin's drift from what serves the stage, worked out once per distinct pin: a shard's
    requests mostly share one (their job's)."""

    def __init__(self, served: VersionTuple, stage: Stage) -> None:
        self.served = served
        self.stage = stage
        self.known: dict[str, dict[str, tuple[str, str]]] = {}

    def __call__(self, state: runs.RequestState) -> dict[str, tuple[str, str]]:
        drift = self.known.get(state.pinned_versions_id)
        if drift is None:
            drift = VersionTuple.model_validate(state.pinned_versions).drift(self.served,
                                                                             self.stage)
            self.known[state.pinned_versions_id] = drift
        return drift


def _gate_one(stage: Stage, run: int, rid: str, state: runs.RequestState, deliveries: int,
              drift_of: _DriftOf, max_deliveries: int,
              now: datetime) -> tuple[ItemResult | None, AuditRecord | None]:
    if runs.rides_along(state.status, state.run, run):
        return runs.ride_along(rid, state.status, state.run), None
    if deliveries > max_deliveries:
        return _ended(rid, Status.FAILED, "PoisonMessage",
                      f"delivered {deliveries} times, more than {max_deliveries}",
                      EventKind.POISON_MESSAGE)
    deadline = as_utc(state.deadline_at)
    if deadline is not None and (deadline - now).total_seconds() < MIN_STAGE_S[stage]:
        return _ended(rid, Status.FAILED, "DeadlineExceeded",
                      f"deadline {deadline.isoformat()} leaves no time for {stage}",
                      EventKind.DEADLINE_EXCEEDED)
    drift = drift_of(state)
    if not drift:
        return None, None
    detail = {name: {"pinned": pinned, "served": now_} for name, (pinned, now_) in drift.items()}
    if state.drift_policy == DriftPolicy.STRICT:
        return _ended(rid, Status.FAILED, "VersionDrift",
                      f"strict pin differs from what serves {stage}: {detail}", EventKind.DRIFT,
                      {"policy": "strict", "components": detail})
    return None, AuditRecord(request_id=rid, kind=EventKind.DRIFT,
                             payload={"policy": "follow", "components": detail})


def _ended(rid: str, status: Status, error_class: str, message: str, kind: EventKind,
           payload: dict[str, Any] | None = None) -> tuple[ItemResult, AuditRecord]:
    outcome = Outcome(status=status, error_class=error_class, message=message)
    event = AuditRecord(request_id=rid, kind=kind,
                        payload=payload or outcome.model_dump(mode="json"))
    return ItemResult(request_id=rid, output={"ended": outcome.model_dump()},
                      outcome=outcome), event


def _budget_s(deadlines: list[datetime | None]) -> float | None:
    """The time the engine may spend on the shard: the latest deadline, and only when every
    item has one. One item's short deadline must not cut its neighbours' outputs short;
    each item's own deadline is checked again at every stage boundary."""
    if not deadlines or any(d is None for d in deadlines):
        return None
    latest = max(as_utc(d) for d in deadlines if d is not None)
    return max(0.0, (latest - utcnow()).total_seconds())
