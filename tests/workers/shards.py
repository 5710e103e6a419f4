"""Store-level helpers for tests that drive shards by hand: admit a job, and commit a shard's
router stage as a worker would (claim, load, commit), with the outcomes a test chooses."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import Any

from schemas.requests import RequestLine
from schemas.stages import ItemResult, Outcome
from schemas.status import DriftPolicy, Stage, Status
from schemas.versions import VersionTuple

VERSIONS = VersionTuple(model="m", prompt="p", router="r", index="i", tool_schemas="t",
                        validators="v", decoding="d", runtime="rt")


def admit_answers(store_url: str, count: int, shard_size: int,
                  name: str = "job") -> tuple[str, list[Any]]:
    """A job of `count` answer requests (custom ids `name-0`...); its id and its router
    dispatches."""
    from workers.store.admission import admit_job
    from workers.store.engine import session_scope

    lines = [RequestLine.model_validate({
        "custom_id": f"{name}-{i}", "tenant": "acme", "grants": ["public"],
        "request": {"kind": "answer", "question": "How do I roll back a deploy?"}})
        for i in range(count)]
    with session_scope(store_url) as session:
        admitted = admit_job(session, name=f"{name}.jsonl", content=uuid.uuid4().bytes,
                             lines=lines, malformed=[], line_numbers=list(range(1, count + 1)),
                             versions=VERSIONS, drift_policy=DriftPolicy.FOLLOW,
                             shard_size=shard_size)
    return admitted.job_id, admitted.dispatches


def commit_router(store_url: str, dispatch: Any, outcome_of: Callable[[int], Outcome | None],
                  announce: bool = True, name_jobs: bool = True,
                  count: Callable[[Any], tuple[int, ...]] | None = None) -> tuple[int, ...]:
    """Commit the router stage of `dispatch`'s shard: its n-th request ends with
    `outcome_of(n)` (None: it goes on). The commit names the requests' jobs as a worker does,
    unless not `name_jobs` (as a stage that failed before loading them). With
    `count(session)`, a tuple of counters, return how much the commit's statements added to
    each, read in the commit's transaction."""
    return commit_stage(store_url, dispatch.hop, Stage.ROUTER,
                        lambda n, rid: ItemResult(request_id=rid, output={},
                                                  outcome=outcome_of(n)),
                        announce, name_jobs, count)


def commit_stage(store_url: str, hop: Any, stage: Stage,
                 result_of: Callable[[int, str], ItemResult], announce: bool = True,
                 name_jobs: bool = True,
                 count: Callable[[Any], tuple[int, ...]] | None = None) -> tuple[int, ...]:
    """Commit `stage` of `hop`'s shard as a worker would (claim, load, commit), its n-th
    request getting `result_of(n, request_id)`; see `commit_router`."""
    from workers.store.engine import session_scope
    from workers.store.stage_runs import StageCommit, commit

    key, owner, lease, states = claim_stage(store_url, hop, stage)
    results = [result_of(n, rid) for n, rid in enumerate(lease.request_ids)]
    jobs = frozenset(s.job_id for s in states.values()) if name_jobs else None
    queued = frozenset(rid for rid, s in states.items() if s.status == Status.QUEUED)
    with session_scope(store_url) as session:
        before = count(session) if count is not None else ()
        commit(session, StageCommit(key, owner, lease, results, [], {}, 0.1, queued, announce,
                                    jobs))
        after = count(session) if count is not None else ()
    return tuple(a - b for a, b in zip(after, before, strict=True))


def claim_stage(store_url: str, hop: Any, stage: Stage) -> tuple[Any, Any, Any, dict[str, Any]]:
    """Claim `stage` of `hop`'s shard and load its requests' states, as a worker does before
    it computes: (key, owner, lease, states)."""
    from workers.store.engine import session_scope
    from workers.store.stage_runs import LeaseOwner, StageKey, claim, load_shard

    key = StageKey(hop, stage)
    owner = LeaseOwner("host", 1, stage.value)
    with session_scope(store_url) as session:
        lease = claim(session, key, owner, lease_s=30).lease
        assert lease is not None
        states, _ = load_shard(session, lease.request_ids, key)
    return key, owner, lease, states
