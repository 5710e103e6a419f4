"""The pipeline on real Redis, Postgres, Celery workers and models."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select

from schemas.events import EventKind
from schemas.requests import RequestLine
from schemas.status import DriftPolicy, Lane, ShardStageStatus, Stage, Status
from tests.services import Pipeline, wait_until

pytestmark = [pytest.mark.integration]

EXAMPLES = Path(__file__).resolve().parents[2] / "ops" / "examples" / "jobs"
QUESTIONS = [
    "How long is GPS telemetry kept?",
    "When does the on-call handoff happen?",
    "How often are service account passwords rotated?",
    "What is the expense report deadline?",
    "How do I enable the greedy fallback in the route planner?",
    "What is the severity of an outage that stops dispatch?",
    "Who approves production deploys?",
    "How long are database backups kept?",
]


def _job_file(tmp_path: Path, name: str, count: int, tag: str) -> Path:
    lines = [json.dumps({"custom_id": f"{tag}-{i}", "tenant": "acme",
                         "grants": ["public", "engineering"],
                         "request": {"kind": "answer", "question": QUESTIONS[i % len(QUESTIONS)]}})
             for i in range(count)]
    path = tmp_path / name
    path.write_text("\n".join(lines) + "\n")
    return path


def _events(settings, kind: str) -> Counter[tuple[str, int]]:  # type: ignore[no-untyped-def]
    from workers.store.engine import session_scope
    from workers.store.models import AuditEvent

    with session_scope(settings.database_url) as session:
        rows = session.execute(select(AuditEvent.request_id, AuditEvent.run)
                               .where(AuditEvent.kind == kind)).all()
    return Counter((r.request_id, r.run) for r in rows)


def _requests(settings, job_id: str):  # type: ignore[no-untyped-def]
    from workers.store.engine import session_scope
    from workers.store.operators import job_requests

    with session_scope(settings.database_url) as session:
        return job_requests(session, job_id)


def _run_job(pipeline: Pipeline, path: Path, timeout_s: float = 600) -> str:
    from ops.jobs import submit_job, wait_for_job

    admitted = submit_job(pipeline.settings, path)  # type: ignore[arg-type]
    assert wait_for_job(pipeline.settings, admitted.job_id, lambda d, t: None,  # type: ignore[arg-type]
                        timeout_s=timeout_s), "job did not finish"
    return admitted.job_id


def test_small_job_reaches_one_terminal_status_per_line_with_its_audit_rows(
        pipeline: Pipeline, tmp_path: Path) -> None:
    from ops.jobs import export_job

    # Given the example job: answers, a refusal, a document, and a malformed line
    source = EXAMPLES / "small.jsonl"
    # When it runs through the four queues
    job_id = _run_job(pipeline, source)
    results, errors = export_job(pipeline.settings, job_id, tmp_path / "out")  # type: ignore[arg-type]
    # Then every input line appears exactly once in the two output files
    out_lines = [json.loads(x) for p in (results, errors) for x in p.read_text().splitlines()]
    input_lines = [x for x in source.read_text().splitlines() if x.strip()]
    assert len(out_lines) == len(input_lines)
    ids = [x["custom_id"] for x in out_lines if x["custom_id"]]
    assert len(ids) == len(set(ids))
    assert sum(1 for x in out_lines if x["status"] == "malformed") == 1
    by_status = Counter(x["status"] for x in out_lines)
    assert by_status["refused"] == 1
    for line in out_lines:
        if line["status"] == "succeeded":
            assert line["citations"], "a success must cite retrieved chunks"
            assert line["tokens"]["completion"] > 0
            assert line["versions"]["index"].startswith("idx-")
            # Rendered: numbered citations resolving to the source documents
            assert "**Sources**" in line["markdown"] and "[1]" in line["markdown"]
            assert all(f"`{c}`" in line["markdown"] for c in line["citations"])
    # And the audit trail records route decisions, data reads, model calls and verdicts
    requests = _requests(pipeline.settings, job_id)
    assert all(Status(r.status).is_terminal for r in requests)
    routed = _events(pipeline.settings, EventKind.ROUTE_DECISION)
    reads = _events(pipeline.settings, EventKind.DATA_READ)
    calls = _events(pipeline.settings, EventKind.MODEL_CALL)
    verdicts = _events(pipeline.settings, EventKind.VALIDATOR_VERDICT)
    repairs = _events(pipeline.settings, EventKind.REPAIR_REQUESTED)
    rounds = 1 + pipeline.settings.max_repair_rounds  # type: ignore[attr-defined]
    for r in requests:
        key = (r.id, 0)
        assert routed[key] == 1
        if r.status == Status.REFUSED or reads[key] == 0:  # ended at the router
            assert calls[key] == verdicts[key] == 0
            continue
        # One read; one model call and one verdict per attempt, each repair on the record.
        assert reads[key] == 1
        assert 1 <= calls[key] == verdicts[key] <= rounds
        assert repairs[key] == calls[key] - 1
    assert sum(1 for r in requests if reads[(r.id, 0)]) >= 3
    _assert_data_reads_name_chunks(pipeline, requests)


def _assert_data_reads_name_chunks(pipeline: Pipeline, requests) -> None:  # type: ignore[no-untyped-def]
    from workers.store.engine import session_scope
    from workers.store.models import AuditEvent, Chunk

    with session_scope(pipeline.settings.database_url) as session:  # type: ignore[attr-defined]
        for event in session.scalars(select(AuditEvent).where(
                AuditEvent.kind == EventKind.DATA_READ,
                AuditEvent.request_id.in_([r.id for r in requests]))):
            chunk_ids = event.payload["chunk_ids"]
            assert chunk_ids and event.payload["index_id"].startswith("idx-")
            tenants = set(session.scalars(select(Chunk.tenant_id).where(Chunk.id.in_(chunk_ids))))
            assert tenants == {event.payload["tenant"]}


def _admit_shard(pipeline: Pipeline, tag: str, count: int):  # type: ignore[no-untyped-def]
    from workers.runtime import pinned_versions_now
    from workers.store.admission import admit_job
    from workers.store.engine import session_scope

    lines = [RequestLine.model_validate(
        {"custom_id": f"{tag}-{i}", "tenant": "acme", "grants": ["public"],
         "request": {"kind": "answer", "question": QUESTIONS[i]}}) for i in range(count)]
    settings = pipeline.settings
    with session_scope(settings.database_url) as session:  # type: ignore[attr-defined]
        admitted = admit_job(session, name=tag, content=tag.encode(), lines=lines, malformed=[],
                             line_numbers=list(range(1, count + 1)),
                             versions=pinned_versions_now(settings),  # type: ignore[arg-type]
                             drift_policy=DriftPolicy.FOLLOW, shard_size=count)
    return admitted.dispatches[0].hop.model_dump()


def _router_rows(pipeline: Pipeline, shard_id: str):  # type: ignore[no-untyped-def]
    from workers.store.engine import session_scope
    from workers.store.models import StageRun

    with session_scope(pipeline.settings.database_url) as session:  # type: ignore[attr-defined]
        return session.execute(select(StageRun.request_id, StageRun.status, StageRun.deliveries,
                                      StageRun.output).where(StageRun.shard_id == shard_id,
                                                             StageRun.stage == Stage.ROUTER)).all()


def test_a_stage_delivered_twice_commits_once(pipeline: Pipeline) -> None:
    from tasks.queue_tasks import route_shard

    # Given a shard admitted but not yet routed
    hop = _admit_shard(pipeline, "twice", 3)
    # When the router message is delivered twice, one after the other
    route_shard.apply(args=(hop,))
    route_shard.apply(args=(hop,))
    # Then one output per request and one set of route decisions
    rows = _router_rows(pipeline, hop["shard_id"])
    assert len(rows) == 3 and all(r.status == ShardStageStatus.DONE for r in rows)
    assert all(r.deliveries == 1 for r in rows)
    decisions = _events(pipeline.settings, EventKind.ROUTE_DECISION)
    assert all(decisions[(r.request_id, 0)] == 1 for r in rows)


def test_two_concurrent_deliveries_compute_once(pipeline: Pipeline) -> None:
    from tasks.queue_tasks import route_shard

    hop = _admit_shard(pipeline, "concurrent", 3)
    barrier = threading.Barrier(2)

    def deliver() -> None:
        barrier.wait()
        route_shard.apply(args=(hop,))

    threads = [threading.Thread(target=deliver) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    rows = _router_rows(pipeline, hop["shard_id"])
    decisions = _events(pipeline.settings, EventKind.ROUTE_DECISION)
    assert len(rows) == 3
    assert all(decisions[(r.request_id, 0)] == 1 for r in rows)
    assert sum(r.deliveries for r in rows) == 3  # the losing delivery claimed nothing


def _running_generation(pipeline: Pipeline, job_id: str) -> list[str]:
    from workers.store.engine import session_scope
    from workers.store.models import Shard, ShardStage

    with session_scope(pipeline.settings.database_url) as session:  # type: ignore[attr-defined]
        return list(session.scalars(
            select(ShardStage.lease_owner).join(Shard, Shard.id == ShardStage.shard_id)
            .where(Shard.job_id == job_id, ShardStage.stage == Stage.GENERATION,
                   ShardStage.status == ShardStageStatus.RUNNING)))


def _claims_after(pipeline: Pipeline, job_id: str, moment: float) -> float | None:
    """Seconds from `moment` to the first generation claim that started after it."""
    from workers.store.engine import session_scope
    from workers.store.models import Shard, ShardStage
    from workers.store.timeutil import as_utc

    with session_scope(pipeline.settings.database_url) as session:  # type: ignore[attr-defined]
        starts = session.scalars(  # a shard stage's started_at is its latest claim's
            select(ShardStage.started_at).join(Shard, Shard.id == ShardStage.shard_id)
            .where(Shard.job_id == job_id, ShardStage.stage == Stage.GENERATION)).all()
    later = [as_utc(s).timestamp() for s in starts if s and as_utc(s).timestamp() > moment]  # type: ignore[union-attr]
    return min(later) - moment if later else None


def _assert_completed_exactly_once(pipeline: Pipeline, job_id: str) -> None:
    from ops.jobs import wait_for_job

    assert wait_for_job(pipeline.settings, job_id, lambda d, t: None, timeout_s=600)  # type: ignore[arg-type]
    requests = _requests(pipeline.settings, job_id)
    assert requests and all(Status(r.status).is_terminal for r in requests)
    ids = {r.id for r in requests}
    for kind in (EventKind.MODEL_CALL, EventKind.VALIDATOR_VERDICT):
        twice = {key: n for key, n in _events_by_round(pipeline.settings, kind).items()
                 if key[0] in ids and n > 1}
        assert not twice, f"{kind} recorded more than once for one attempt: {twice}"


def test_a_job_admitted_in_chunks_runs_every_line_once(pipeline: Pipeline,
                                                        tmp_path: Path) -> None:
    from ops.jobs import parse_job_file, submit_job
    from workers.dispatch import enqueue_all
    from workers.runtime import pinned_versions_now
    from workers.store.admission import admit_job_in_chunks, job_id_for

    # Given a job of five lines, shards of two and admission chunks of two lines
    settings = pipeline.settings.model_copy(update={"shard_size": 2})  # type: ignore[attr-defined]
    path = _job_file(tmp_path, "chunks.jsonl", 5, "chunks")
    parsed = parse_job_file(path)
    stored: list[int] = []

    def send(dispatches: list[Any]) -> None:
        stored.append(len(_requests(settings, job_id_for(parsed.content))))
        enqueue_all(dispatches, settings)

    # When it is admitted, each chunk's shard enqueued when its transaction commits
    admitted = admit_job_in_chunks(
        settings.database_url, name=path.name, content=parsed.content, lines=parsed.lines,
        malformed=[], line_numbers=parsed.line_numbers, versions=pinned_versions_now(settings),
        drift_policy=settings.drift_policy, shard_size=2, lane=Lane.BATCH, on_dispatch=send,
        chunk_lines=2)
    # Then the shards went out one chunk at a time and every line ends once
    assert stored == [0, 2, 4, 5]
    assert admitted.created and len(admitted.dispatches) == 3
    _assert_completed_exactly_once(pipeline, admitted.job_id)
    assert sorted(r.line_no for r in _requests(settings, admitted.job_id)) == [1, 2, 3, 4, 5]
    # And submitting it again admits nothing and dispatches nothing
    assert submit_job(settings, path, chunk_lines=2).dispatches == []


def _events_by_round(settings, kind: str) -> Counter[tuple[str, int, int]]:  # type: ignore[no-untyped-def]
    from workers.store.engine import session_scope
    from workers.store.models import AuditEvent

    with session_scope(settings.database_url) as session:
        rows = session.execute(select(AuditEvent.request_id, AuditEvent.run, AuditEvent.round)
                               .where(AuditEvent.kind == kind)).all()
    return Counter((r.request_id, r.run, r.round) for r in rows)


def _submit(pipeline: Pipeline, path: Path) -> str:
    from ops.jobs import submit_job

    return submit_job(pipeline.settings, path).job_id  # type: ignore[arg-type]


@pytest.mark.slow
def test_sigkill_of_the_generation_worker_main_process_loses_nothing(
        pipeline: Pipeline, tmp_path: Path) -> None:
    # Given a job with several shards, generating
    job_id = _submit(pipeline, _job_file(tmp_path, "kill-main.jsonl", 8, "kill-main"))
    wait_until(lambda: _running_generation(pipeline, job_id), 300, what="generation to start")
    # When the generation worker's main process is killed, and a supervisor starts another
    victim = pipeline.fleet.processes[Stage.GENERATION]  # type: ignore[attr-defined]
    killed_at = time.time()
    os.kill(victim.pid, signal.SIGKILL)
    victim.wait()
    pipeline.restart(Stage.GENERATION)
    # Then the job completes, every request terminal once, nothing committed twice
    _assert_completed_exactly_once(pipeline, job_id)
    recovery = _claims_after(pipeline, job_id, killed_at)
    print(f"\nrecovery after SIGKILL of the generation main process: {recovery:.1f}s")
    assert recovery is not None and recovery < 30


def _pool_children(pid: int) -> list[int]:
    children: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        text = (task / "children").read_text().split()
        children.extend(int(c) for c in text)
    return children


@pytest.mark.slow
def test_generation_runs_on_threads_of_the_worker_process(
        pipeline: Pipeline, tmp_path: Path) -> None:
    # The generation worker runs a threads pool, so that concurrent shards share one engine:
    # its shards are leased by the worker process itself, which has no pool children to lose
    # (killing that process is the fault the test above recovers from).
    job_id = _submit(pipeline, _job_file(tmp_path, "threads.jsonl", 8, "threads"))
    owners = wait_until(lambda: _running_generation(pipeline, job_id), 300,
                        what="generation to start")
    owner_pid = int(str(list(owners)[0]).split(":")[1])  # type: ignore[call-overload]
    main_pid = pipeline.fleet.processes[Stage.GENERATION].pid  # type: ignore[attr-defined]
    assert owner_pid == main_pid
    assert _pool_children(main_pid) == []
    _assert_completed_exactly_once(pipeline, job_id)


def test_later_stages_workers_run_at_a_higher_cpu_priority(pipeline: Pipeline) -> None:
    # Downstream first: each stage's worker (and its pool children) is niced one step below
    # the next stage's, so the machine finishes work in flight before it starts more.
    settings = pipeline.settings
    step = settings.stage_nice_step  # type: ignore[attr-defined]
    assert step > 0  # the default
    processes = pipeline.fleet.processes  # type: ignore[attr-defined]
    nice = {stage: os.getpriority(os.PRIO_PROCESS, processes[stage].pid) for stage in Stage}
    base = nice[Stage.VALIDATION]
    assert [nice[s] - base for s in Stage] == [3 * step, 2 * step, step, 0]
    for stage in Stage:
        for child in _pool_children(processes[stage].pid):
            assert os.getpriority(os.PRIO_PROCESS, child) == nice[stage]


@pytest.mark.slow
def test_an_online_request_overtakes_a_running_batch(pipeline: Pipeline, tmp_path: Path) -> None:
    from ops.client import SluiceClient

    # Given a batch of single-request shards, already generating
    settings = pipeline.settings.model_copy(update={"shard_size": 1})  # type: ignore[attr-defined]
    from ops.jobs import submit_job, wait_for_job

    job_id = submit_job(settings, _job_file(tmp_path, "batch.jsonl", 8, "batch")).job_id
    wait_until(lambda: _running_generation(pipeline, job_id), 300, what="the batch to generate")
    # When an upstream system submits one online request
    client = SluiceClient(settings)
    request_id = client.submit({"custom_id": "online-1", "tenant": "acme", "grants": ["public"],
                                "request": {"kind": "answer", "question": QUESTIONS[0]}})
    online = client.wait(request_id, timeout_s=600)
    assert wait_for_job(settings, job_id, lambda d, t: None, timeout_s=600)
    # Then it finished before the batch did
    batch = _requests(settings, job_id)
    online_row = _request_row(settings, request_id)
    assert Status(online["status"]).is_terminal
    assert online_row.finished_at < max(r.finished_at for r in batch)


def _request_row(settings, request_id: str):  # type: ignore[no-untyped-def]
    from workers.store.engine import session_scope
    from workers.store.models import Request

    with session_scope(settings.database_url) as session:
        return session.get(Request, request_id)


def _admit_pinned(pipeline: Pipeline, custom_id: str, question: str, policy: DriftPolicy,
                  **pin_changes: str) -> str:
    from workers.dispatch import enqueue_all
    from workers.runtime import pinned_versions_now
    from workers.store.admission import admit_one
    from workers.store.engine import session_scope

    settings = pipeline.settings
    pin = pinned_versions_now(settings).model_copy(update=pin_changes)  # type: ignore[arg-type]
    line = RequestLine.model_validate({"custom_id": custom_id, "tenant": "acme",
                                       "grants": ["public"],
                                       "request": {"kind": "answer", "question": question}})
    with session_scope(settings.database_url) as session:  # type: ignore[attr-defined]
        request_id, dispatches = admit_one(session, line, pin, policy, Lane.ONLINE)
    enqueue_all(dispatches, settings)  # type: ignore[arg-type]
    return request_id


def test_version_drift_is_refused_under_strict_and_recorded_under_follow(
        pipeline: Pipeline) -> None:
    from ops.client import SluiceClient

    client = SluiceClient(pipeline.settings)  # type: ignore[arg-type]
    strict = _admit_pinned(pipeline, "drift-strict", QUESTIONS[0], DriftPolicy.STRICT,
                           prompt="prompt-retired")
    follow = _admit_pinned(pipeline, "drift-follow", QUESTIONS[0], DriftPolicy.FOLLOW,
                           prompt="prompt-retired")
    strict_result = client.wait(strict, timeout_s=300)
    follow_result = client.wait(follow, timeout_s=300)
    assert strict_result["status"] == Status.FAILED
    assert strict_result["error_class"] == "VersionDrift"
    assert strict_result["error_stage"] == Stage.GENERATION
    assert follow_result["error_class"] != "VersionDrift"
    drift = _events(pipeline.settings, EventKind.DRIFT)
    follow_calls = _events(pipeline.settings, EventKind.MODEL_CALL)[(follow, 0)]
    assert follow_calls >= 1
    assert drift[(follow, 0)] == follow_calls  # recorded at every attempt, repairs included
    assert drift[(strict, 0)] == 1
    assert _events(pipeline.settings, EventKind.MODEL_CALL)[(strict, 0)] == 0


def test_replay_of_a_failed_request_succeeds_and_is_audited(pipeline: Pipeline) -> None:
    from ops.client import SluiceClient
    from workers.dispatch import enqueue
    from workers.runtime import pinned_versions_now
    from workers.store.engine import session_scope
    from workers.store.operators import replay

    settings = pipeline.settings
    client = SluiceClient(settings)  # type: ignore[arg-type]
    # Given a request that failed on a retired router version under a strict pin
    request_id = _admit_pinned(pipeline, "replay-me", "What is the root password of the vault?",
                               DriftPolicy.STRICT, router="router-retired")
    assert client.wait(request_id, timeout_s=300)["error_class"] == "VersionDrift"
    # When an operator replays it strictly, it fails the same way
    with session_scope(settings.database_url) as session:  # type: ignore[attr-defined]
        enqueue(replay(session, request_id, Stage.ROUTER, pinned_versions_now(settings), False), settings)  # type: ignore[arg-type]
    again = wait_until(lambda: _finished_run(client, request_id, 1), 300, what="strict replay")
    assert again["status"] == Status.FAILED and again["error_class"] == "VersionDrift"  # type: ignore[index]
    # And replayed following the current versions, it reaches the right outcome
    with session_scope(settings.database_url) as session:  # type: ignore[attr-defined]
        enqueue(replay(session, request_id, Stage.ROUTER, pinned_versions_now(settings), True), settings)  # type: ignore[arg-type]
    final = wait_until(lambda: _finished_run(client, request_id, 2), 300, what="replay")
    assert final["status"] == Status.REFUSED  # type: ignore[index]
    replays = _events(settings, EventKind.REPLAY)
    assert replays[(request_id, 1)] == 1 and replays[(request_id, 2)] == 1
    routed = _events(settings, EventKind.ROUTE_DECISION)
    assert routed[(request_id, 2)] == 1
    # And a replay cannot skip the router's refusal by starting after it
    from workers.store.admission import AdmissionError

    with pytest.raises(AdmissionError, match="never reached retrieval"), \
            session_scope(settings.database_url) as session:  # type: ignore[attr-defined]
        replay(session, request_id, Stage.RETRIEVAL, pinned_versions_now(settings), True)  # type: ignore[arg-type]


def _finished_run(client, request_id: str, run: int):  # type: ignore[no-untyped-def]
    result = client.result(request_id)
    if result and result["run"] == run and Status(result["status"]).is_terminal:
        return result
    return None


def test_cancel_stops_a_jobs_remaining_work(pipeline: Pipeline, tmp_path: Path) -> None:
    from workers.store.engine import session_scope
    from workers.store.models import Request
    from workers.store.operators import cancel_job

    settings = pipeline.settings
    job_id = _submit(pipeline, _job_file(tmp_path, "cancel.jsonl", 8, "cancel"))
    with session_scope(settings.database_url) as session:  # type: ignore[attr-defined]
        cancelled = cancel_job(session, job_id)
    assert cancelled > 0
    with session_scope(settings.database_url) as session:  # type: ignore[attr-defined]
        counts = dict(session.execute(select(Request.error_class, func.count())
                                      .where(Request.job_id == job_id)
                                      .group_by(Request.error_class)).all())
    assert counts.get("Cancelled") == cancelled
    wait_until(lambda: not _running_generation(pipeline, job_id), 300, what="workers to drain")
    requests = _requests(settings, job_id)
    assert sum(1 for r in requests if r.error_class == "Cancelled") == cancelled


def test_a_newly_activated_index_is_served_without_a_restart_and_rolled_back(
        pipeline: Pipeline) -> None:
    """Activation reaches the running retrieval worker; a strict request pinned to the index
    it replaced fails with a clear VersionDrift; rollback restores the previous index."""
    import shutil

    from ops.client import SluiceClient
    from ops.corpus import activate_index, rollback_index
    from workers.runtime import ACTIVE_INDEX_TTL_S, active_index
    from workers.store.engine import session_scope
    from workers.store.models import AuditEvent, IndexVersion

    settings = pipeline.settings
    old = active_index(settings)  # type: ignore[arg-type]
    assert old is not None
    copy_id = "idx-activation-test"
    copy_path = Path(old.path).parent / copy_id
    shutil.copytree(old.path, copy_path)
    with session_scope(settings.database_url) as session:  # type: ignore[attr-defined]
        session.add(IndexVersion(id=copy_id, path=str(copy_path), embedder=old.embedder,
                                 chunk_count=old.chunk_count, params=dict(old.params)))
    client = SluiceClient(settings)  # type: ignore[arg-type]
    try:
        assert activate_index(settings, copy_id) == old.id  # type: ignore[arg-type]
        # The promise is pickup within the workers' re-read interval, not at once: a request
        # that reaches retrieval sooner may still be served by the index it replaced.
        time.sleep(ACTIVE_INDEX_TTL_S + 0.5)
        pinned_old = _admit_pinned(pipeline, "index-pinned-old", QUESTIONS[1], DriftPolicy.STRICT,
                                   index=old.id)
        fresh = client.submit({"custom_id": "index-fresh", "tenant": "acme",
                               "grants": ["public", "engineering"],
                               "request": {"kind": "answer", "question": QUESTIONS[1]}})
        stale = client.wait(pinned_old, timeout_s=300)
        client.wait(fresh, timeout_s=300)
        with session_scope(settings.database_url) as session:  # type: ignore[attr-defined]
            read = session.scalars(select(AuditEvent.payload).where(
                AuditEvent.request_id == fresh, AuditEvent.kind == EventKind.DATA_READ)).one()
        assert read["index_id"] == copy_id  # no worker restart in between
        assert (stale["status"], stale["error_class"], stale["error_stage"]) == (
            Status.FAILED, "VersionDrift", Stage.RETRIEVAL)
        assert old.id in stale["message"] and copy_id in stale["message"]
    finally:
        assert rollback_index(settings) == (copy_id, old.id)  # type: ignore[arg-type]
    assert active_index(settings).id == old.id  # type: ignore[arg-type,union-attr]
