"""The four Celery tasks: thin adapters from a queue message to a stage function."""

from __future__ import annotations

import json
from typing import Any

from celery.signals import worker_process_init

from schemas.events import EventKind
from schemas.stages import (
    AuditRecord,
    GenerationItem,
    GenerationOutput,
    ItemRecord,
    ItemResult,
    Outcome,
    RetrievalOutput,
    RetrievalResult,
    RetrievedChunk,
)
from schemas.status import AnswerClass, Stage, Status
from tasks import adapters
from tasks.generation import generate
from tasks.retrieval import Retriever
from tasks.router import route
from tasks.sanitize import sanitize_chunks
from tasks.tools import ToolCall, ToolError, refusal_payload
from tasks.validation import validate
from tasks.validators.policy import record_identifiers
from workers.app import app
from workers.base import LAST_ATTEMPT, Results, StageTask, TransientError
from workers.cache import cache_key
from workers.queues import TASK_NAMES
from workers.runtime import Runtime, preload_libraries
from workers.store.engine import session_scope
from workers.store.records import execute, is_ticket_id, unheld_record_ids
from workers.versions import sanitize_policy


@worker_process_init.connect
def _start_preloading(**_: Any) -> None:
    """A pool process starts importing the model libraries as it starts (in a thread: this
    signal's handlers must return within seconds)."""
    preload_libraries()


def compute_route(runtime: Runtime, records: list[ItemRecord], _budget: float | None) -> Results:
    output = route(adapters.router_input(records), runtime.rules(), runtime.count_tokens,
                   runtime.settings.max_input_tokens, classifier=runtime.router_classifier())
    return adapters.router_results(output)


def compute_retrieval(runtime: Runtime, records: list[ItemRecord],
                      _budget: float | None) -> Results:
    """Tool lookups call their planned tool; everything else searches the index."""
    lookups = [r for r in records
               if r.previous.get(Stage.ROUTER, {}).get("answer_class") == AnswerClass.TOOL_LOOKUP]
    looked_up = {r.request_id for r in lookups}
    searches = [r for r in records if r.request_id not in looked_up]
    results, events = _search(runtime, searches) if searches else ([], [])
    if lookups:
        tool_results, tool_events = _call_tools(runtime, lookups)
        results, events = results + tool_results, events + tool_events
    return results, events


def _call_tools(runtime: Runtime, records: list[ItemRecord]) -> Results:
    """Fresh data from the system of record, by the plan the request text maps to (never by
    what retrieved text or a model says); each call an audit event, its result evidence."""
    registry = runtime.tools()
    policy = sanitize_policy(runtime.settings)
    results, events = [], []
    with session_scope(runtime.settings.database_url) as session:
        for record in records:
            # The router planned it (and ended the request when nothing fit).
            call = ToolCall.model_validate(record.previous[Stage.ROUTER]["tool_call"])
            try:
                result = execute(session, registry, record.tenant, call, grants=record.grants)
            except ToolError as exc:
                # Refused before it ran, and on the record all the same
                events.append(AuditRecord(request_id=record.request_id,
                                          kind=EventKind.TOOL_CALL,
                                          payload=refusal_payload(call, exc)))
                outcome = Outcome(status=Status.FAILED, error_class=type(exc).__name__,
                                  message=str(exc))
                results.append(ItemResult(request_id=record.request_id,
                                          output={"tool_error": outcome.model_dump()},
                                          outcome=outcome))
                continue
            events.append(AuditRecord(request_id=record.request_id, kind=EventKind.TOOL_CALL,
                                      payload=result.audit_payload()))
            outcome = None if result.outcome == "ok" else Outcome(
                status=Status.FAILED, error_class=result.error_class or "ToolFailed",
                message=result.content[:500])
            # A record's free text (a summary, a note anyone may add) is untrusted like a
            # corpus chunk: the same sanitization, the same audit of what it flagged.
            kept, detections = sanitize_chunks([RetrievedChunk(**result.as_evidence())], policy)
            events += adapters.injection_events(record.request_id, detections, policy)
            evidence = RetrievalResult(request_id=record.request_id,
                                       index_id=f"tools:{registry.version}", chunks=kept)
            results.append(ItemResult(request_id=record.request_id,
                                      output=evidence.model_dump(mode="json"), outcome=outcome))
    return results, events


def _search(runtime: Runtime, records: list[ItemRecord]) -> Results:
    """Cached results first; one embedding call and search for the misses only."""
    retriever: Retriever = runtime.retriever()
    cache = runtime.retrieval_cache()
    batch = adapters.retrieval_input(records, runtime.settings.top_k)
    keys = {item.request_id: cache_key(retriever.index_id, item.tenant, item.grants, batch.top_k,
                                       item.query) for item in batch.items}
    found = cache.get_many(list(keys.values()))
    misses = [item for item in batch.items if keys[item.request_id] not in found]
    fresh = {r.request_id: r for r in retriever.retrieve(
        batch.model_copy(update={"items": misses})).results} if misses else {}
    cache.put_many({keys[rid]: r.model_dump(mode="json", exclude={"request_id", "cached"})
                    for rid, r in fresh.items() if r.outcome is None})
    cache.count(hits=len(batch.items) - len(misses), misses=len(misses))
    output = RetrievalOutput(results=[
        fresh.get(item.request_id) or RetrievalResult.model_validate(
            {**found[keys[item.request_id]], "request_id": item.request_id, "cached": True})
        for item in batch.items])
    # The cache holds what the index returned; the policy of the day sanitizes it.
    return adapters.retrieval_results(output, records, sanitize_policy(runtime.settings))


def compute_generation(runtime: Runtime, records: list[ItemRecord],
                       budget: float | None) -> Results:
    """Items go to the engine of the model variant the router chose; the engine batches them
    with whatever other tasks of this worker submit at the same time. Its threads pool
    enforces no Celery time limit, so the stage's soft limit caps the deadline here."""
    soft_limit_s, _ = runtime.settings.limits.for_stage(Stage.GENERATION)
    budget = soft_limit_s if budget is None else min(budget, soft_limit_s)
    batch = adapters.generation_input(records, budget)
    by_variant: dict[str | None, list[GenerationItem]] = {}
    for item in batch.items:
        by_variant.setdefault(item.model_variant, []).append(item)
    drafts = []
    for variant, items in by_variant.items():
        drafts += generate(batch.model_copy(update={"items": items}), runtime.engine(variant),
                           runtime.prompt_templates(), runtime.decoding_policies(),
                           constrain=runtime.settings.constrain_documents).drafts
    unavailable = [d for d in drafts if d.finish_reason == "unavailable"]
    if unavailable and not LAST_ATTEMPT.get():
        # The backend's trouble (a model server that kept failing), not the requests': the
        # shard goes back to the retry policy instead of failing for good.
        first = unavailable[0].outcome
        raise TransientError(f"{len(unavailable)} of {len(drafts)} drafts found the backend "
                             f"unavailable: {first.message if first else ''}")
    return adapters.generation_results(GenerationOutput(drafts=drafts), records,
                                       runtime.settings.accelerator_hour_usd)


def compute_validation(runtime: Runtime, records: list[ItemRecord],
                       _budget: float | None) -> Results:
    verdicts = validate(adapters.validation_input(records, _unheld_ids(runtime, records)),
                        runtime.validators())
    results, events = adapters.validation_results(verdicts, records)
    return adapters.send_back_for_repair(results, events, records,
                                         runtime.settings.max_repair_rounds)


def _unheld_ids(runtime: Runtime, records: list[ItemRecord]) -> dict[str, list[str]]:
    """Per request, the ticket ids its draft names that are neither in the request itself
    (an answer may repeat what was asked about) nor records its tenant and grants may read."""
    named = {r.request_id: _ticket_ids_added(r) for r in records}
    if not any(named.values()):
        return {}
    with session_scope(runtime.settings.database_url) as session:
        return {r.request_id: sorted(unheld_record_ids(session, r.tenant, r.grants,
                                                       named[r.request_id]))
                for r in records if named[r.request_id]}


def _ticket_ids_added(record: ItemRecord) -> list[str]:
    asked = set(record_identifiers(json.dumps(record.payload, ensure_ascii=False)))
    draft = str(record.previous[Stage.GENERATION].get("text", ""))
    return [i for i in record_identifiers(draft) if is_ticket_id(i) and i not in asked]


@app.task(bind=True, base=StageTask, name=TASK_NAMES[Stage.ROUTER])
def route_shard(self: StageTask, hop: dict[str, Any]) -> dict[str, Any]:
    return self.execute(Stage.ROUTER, hop, compute_route)


@app.task(bind=True, base=StageTask, name=TASK_NAMES[Stage.RETRIEVAL])
def retrieve_shard(self: StageTask, hop: dict[str, Any]) -> dict[str, Any]:
    return self.execute(Stage.RETRIEVAL, hop, compute_retrieval)


@app.task(bind=True, base=StageTask, name=TASK_NAMES[Stage.GENERATION])
def generate_shard(self: StageTask, hop: dict[str, Any]) -> dict[str, Any]:
    return self.execute(Stage.GENERATION, hop, compute_generation)


@app.task(bind=True, base=StageTask, name=TASK_NAMES[Stage.VALIDATION])
def validate_shard(self: StageTask, hop: dict[str, Any]) -> dict[str, Any]:
    return self.execute(Stage.VALIDATION, hop, compute_validation)
