"""Between the store's records and each stage's typed contract: pure functions, no I/O.

Each adapter turns the active records of a shard into the stage's input, and the stage's
output into per-item results (what to store, what ended) and the audit events to append.
"""

from __future__ import annotations

from schemas.events import EventKind
from schemas.stages import (
    AuditRecord,
    GenerationInput,
    GenerationItem,
    GenerationOutput,
    ItemRecord,
    ItemResult,
    RetrievalInput,
    RetrievalItem,
    RetrievalOutput,
    RetrievedChunk,
    RouteItem,
    RouterInput,
    RouterOutput,
    ValidationInput,
    ValidationItem,
    ValidationOutput,
)
from schemas.status import AnswerClass, Stage
from tasks.files import TEMPLATES_PATH, load_yaml
from tasks.sanitize import SanitizePolicy, sanitize_chunks

Results = tuple[list[ItemResult], list[AuditRecord]]


def router_input(records: list[ItemRecord]) -> RouterInput:
    return RouterInput(items=[RouteItem(
        request_id=r.request_id, kind=r.kind, text=_request_text(r),
        template=r.payload.get("template"), inputs=r.payload.get("inputs") or {})
        for r in records])


def _request_text(record: ItemRecord) -> str:
    if record.kind == "document":
        values = " ".join(str(v) for v in (record.payload.get("inputs") or {}).values())
        return f"{record.payload.get('topic', '')} {values}".strip()
    return str(record.payload.get("question", ""))


def router_results(output: RouterOutput) -> Results:
    results = [ItemResult(request_id=d.request_id, output=d.model_dump(mode="json"),
                          outcome=d.outcome) for d in output.decisions]
    events = [AuditRecord(request_id=d.request_id, kind=EventKind.ROUTE_DECISION,
                          payload=d.model_dump(mode="json", exclude={"request_id"}))
              for d in output.decisions]
    return results, events


def retrieval_input(records: list[ItemRecord], top_k: int) -> RetrievalInput:
    return RetrievalInput(top_k=top_k, items=[RetrievalItem(
        request_id=r.request_id, tenant=r.tenant, grants=r.grants, query=_request_text(r))
        for r in records])


def retrieval_results(output: RetrievalOutput, records: list[ItemRecord],
                      policy: SanitizePolicy) -> Results:
    """What was read is audited as read; what generation gets is what sanitization kept."""
    scope = {r.request_id: r for r in records}
    results, events = [], []
    for res in output.results:
        record = scope[res.request_id]
        events.append(AuditRecord(request_id=res.request_id, kind=EventKind.DATA_READ, payload={
            "index_id": res.index_id, "tenant": record.tenant, "grants": record.grants,
            "chunk_ids": [c.chunk_id for c in res.chunks],
            "document_ids": sorted({c.document_id for c in res.chunks}),
            "scores": [round(c.score, 4) for c in res.chunks], "cached": res.cached}))
        kept, detections = sanitize_chunks(res.chunks, policy)
        events.extend(AuditRecord(request_id=res.request_id, kind=EventKind.INJECTION_SIGNAL,
                                  payload={**d.model_dump(mode="json"), "policy": policy.version})
                      for d in detections)
        clean = res.model_copy(update={"chunks": kept})
        results.append(ItemResult(request_id=res.request_id, output=clean.model_dump(mode="json"),
                                  outcome=res.outcome))
    return results, events


def generation_input(records: list[ItemRecord], deadline_s: float | None) -> GenerationInput:
    return GenerationInput(deadline_s=deadline_s, items=[_generation_item(r) for r in records])


def _generation_item(record: ItemRecord) -> GenerationItem:
    route = record.previous[Stage.ROUTER]
    chunks = [RetrievedChunk.model_validate(c)
              for c in record.previous[Stage.RETRIEVAL].get("chunks", [])]
    return GenerationItem(request_id=record.request_id,
                          answer_class=AnswerClass(route["answer_class"]),
                          instruction=_instruction(record), chunks=chunks)


def _instruction(record: ItemRecord) -> str:
    if record.kind != "document":
        return str(record.payload.get("question", ""))
    template = load_yaml(TEMPLATES_PATH)[record.payload["template"]]
    fields = {**(record.payload.get("inputs") or {}), "topic": record.payload.get("topic", "")}
    return str(template["instruction"]).format(**fields)


def generation_results(output: GenerationOutput, decoding: str) -> Results:
    results = [ItemResult(request_id=d.request_id, output=d.model_dump(mode="json"),
                          outcome=d.outcome, prompt_tokens=d.prompt_tokens,
                          completion_tokens=d.completion_tokens) for d in output.drafts]
    events = [AuditRecord(request_id=d.request_id, kind=EventKind.MODEL_CALL, payload={
        "model": d.model, "prompt_tokens": d.prompt_tokens,
        "completion_tokens": d.completion_tokens, "finish_reason": d.finish_reason,
        "decoding": decoding}) for d in output.drafts]
    return results, events


def validation_input(records: list[ItemRecord]) -> ValidationInput:
    items = []
    for r in records:
        draft = r.previous[Stage.GENERATION]
        chunks = r.previous[Stage.RETRIEVAL].get("chunks", [])
        items.append(ValidationItem(
            request_id=r.request_id, answer_class=AnswerClass(r.previous[Stage.ROUTER]["answer_class"]),
            draft=draft.get("text", ""), source_labels=draft.get("source_labels", {}),
            retrieved_chunk_ids=[c["chunk_id"] for c in chunks]))
    return ValidationInput(items=items)


def validation_results(output: ValidationOutput, records: list[ItemRecord]) -> Results:
    drafts = {r.request_id: r.previous[Stage.GENERATION] for r in records}
    results = [ItemResult(request_id=v.request_id, output=v.model_dump(mode="json"),
                          outcome=v.outcome, final_text=v.output, citations=v.citations,
                          prompt_tokens=int(drafts[v.request_id].get("prompt_tokens", 0)),
                          completion_tokens=int(drafts[v.request_id].get("completion_tokens", 0)))
               for v in output.verdicts]
    events = [AuditRecord(request_id=v.request_id, kind=EventKind.VALIDATOR_VERDICT, payload={
        "validator_version": v.validator_version, "status": v.outcome.status.value,
        "error_class": v.outcome.error_class, "citations": v.citations, "reasons": v.reasons})
        for v in output.verdicts]
    return results, events
