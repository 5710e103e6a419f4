"""Between the store's records and each stage's typed contract: pure functions, no I/O.

Each adapter turns the active records of a shard into the stage's input, and the stage's
output into per-item results (what to store, what ended) and the audit events to append.
"""

from __future__ import annotations

from typing import Any

from schemas.events import EventKind
from schemas.stages import (
    REPAIR,
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
from schemas.status import AnswerClass, Stage, Status
from tasks.generation import ABSTAIN_TEXT
from tasks.sanitize import InjectionDetection, SanitizePolicy, sanitize_chunks
from tasks.templates import DocumentTemplate, load_templates

Results = tuple[list[ItemResult], list[AuditRecord]]
WEAK_EVIDENCE = "WeakEvidence"  # the validators' class for drafts no retrieved chunk supports


def router_input(records: list[ItemRecord]) -> RouterInput:
    return RouterInput(items=[RouteItem(
        request_id=r.request_id, kind=r.kind, text=request_text(r),
        answer_class=r.payload.get("answer_class"),
        template=r.payload.get("template"), topic=r.payload.get("topic"),
        inputs=r.payload.get("inputs") or {})
        for r in records])


def request_text(record: ItemRecord) -> str:
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
        request_id=r.request_id, tenant=r.tenant, grants=r.grants, query=request_text(r))
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
        events.extend(injection_events(res.request_id, detections, policy))
        clean = res.model_copy(update={"chunks": kept})
        results.append(ItemResult(request_id=res.request_id, output=clean.model_dump(mode="json"),
                                  outcome=res.outcome))
    return results, events


def injection_events(request_id: str, detections: list[InjectionDetection],
                     policy: SanitizePolicy) -> list[AuditRecord]:
    """One `injection_signal` event per flagged chunk (or tool result), with the policy."""
    return [AuditRecord(request_id=request_id, kind=EventKind.INJECTION_SIGNAL,
                        payload={**d.model_dump(mode="json"), "policy": policy.version})
            for d in detections]


def generation_input(records: list[ItemRecord], deadline_s: float | None) -> GenerationInput:
    return GenerationInput(deadline_s=deadline_s, items=[_generation_item(r) for r in records])


def _generation_item(record: ItemRecord) -> GenerationItem:
    route = record.previous[Stage.ROUTER]
    chunks = [RetrievedChunk.model_validate(c)
              for c in record.previous[Stage.RETRIEVAL].get("chunks", [])]
    repair = record.previous.get(REPAIR, {})
    return GenerationItem(request_id=record.request_id,
                          answer_class=AnswerClass(route["answer_class"]),
                          instruction=_instruction(record), chunks=chunks,
                          previous_draft=repair.get(Stage.GENERATION, {}).get("text"),
                          feedback=list(repair.get(Stage.VALIDATION, {}).get("reasons", [])),
                          decoding_policy=route.get("decoding_policy"),
                          model_variant=route.get("model_variant"), round=record.round,
                          json_schema=_output_schema(record))


def _output_schema(record: ItemRecord) -> dict[str, Any] | None:
    """A document's output schema, by its template's model."""
    template = _template(record)
    return None if template is None else template.json_schema


def _instruction(record: ItemRecord) -> str:
    template = _template(record)
    if template is None:
        return str(record.payload.get("question", ""))
    return template.instruction_for(str(record.payload.get("topic", "")),
                                    record.payload.get("inputs") or {})


def _template(record: ItemRecord) -> DocumentTemplate | None:
    """A document request's template (the router admitted only known ones)."""
    if record.kind != "document":
        return None
    return load_templates()[record.payload["template"]]


def document_contract(record: ItemRecord) -> str | None:
    """A document is checked against its template's contract (named as the template); other
    requests against their answer class's default."""
    return record.payload.get("template") if record.kind == "document" else None


def generation_results(output: GenerationOutput, records: list[ItemRecord],
                       accelerator_hour_usd: float = 0.0) -> Results:
    """Drafts, with the tokens of every attempt so far (repairs included) as running totals;
    a model-call event per draft with its accounting: tokens, queue wait, batch size, device
    seconds and their cost at the configured price per accelerator-hour."""
    before = {r.request_id: r.previous.get(REPAIR, {}).get(Stage.GENERATION, {}) for r in records}
    results = []
    for d in output.drafts:
        prior = before.get(d.request_id, {})
        totals = {"total_prompt_tokens": d.prompt_tokens + int(prior.get("total_prompt_tokens", 0)),
                  "total_completion_tokens": d.completion_tokens
                  + int(prior.get("total_completion_tokens", 0))}
        results.append(ItemResult(request_id=d.request_id,
                                  output={**d.model_dump(mode="json"), **totals},
                                  outcome=d.outcome, prompt_tokens=totals["total_prompt_tokens"],
                                  completion_tokens=totals["total_completion_tokens"]))
    events = [AuditRecord(request_id=d.request_id, kind=EventKind.MODEL_CALL, payload={
        "backend": d.backend, "model": d.model, "prompt_tokens": d.prompt_tokens,
        "completion_tokens": d.completion_tokens, "finish_reason": d.finish_reason,
        "decoding": d.decoding, "seed": d.seed, "constrained": d.constrained,
        "queue_wait_s": round(d.queue_wait_s, 6), "batch_size": d.batch_size,
        "compute_s": round(d.compute_s, 6),
        "cost_usd": round(d.compute_s * accelerator_hour_usd / 3600, 9)})
        for d in output.drafts]
    return results, events


def validation_input(records: list[ItemRecord],
                     unheld: dict[str, list[str]] | None = None) -> ValidationInput:
    """`unheld`: per request, the record ids its draft names that its tenant does not hold."""
    unheld = unheld or {}
    items = []
    for r in records:
        draft = r.previous[Stage.GENERATION]
        chunks = r.previous[Stage.RETRIEVAL].get("chunks", [])
        labels = draft.get("source_labels", {})
        items.append(ValidationItem(
            request_id=r.request_id, answer_class=AnswerClass(r.previous[Stage.ROUTER]["answer_class"]),
            draft=draft.get("text", ""), source_labels=labels,
            retrieved_chunk_ids=[c["chunk_id"] for c in chunks],
            chunk_texts=_label_texts(labels, chunks), contract=document_contract(r),
            unheld_identifiers=unheld.get(r.request_id, [])))
    return ValidationInput(items=items)


def _label_texts(labels: dict[str, str], chunks: list[dict[str, Any]]) -> dict[str, str]:
    """label -> the (sanitized) chunk text generation showed under that label (S1..Sn are
    the retrieval chunks in order, see PromptTemplates.messages); labels follow the draft's map."""
    texts = {c["chunk_id"]: c.get("text", "") for c in chunks}
    return {label: texts[chunk_id] for label, chunk_id in labels.items() if chunk_id in texts}


def validation_results(output: ValidationOutput, records: list[ItemRecord]) -> Results:
    drafts = {r.request_id: r.previous[Stage.GENERATION] for r in records}
    results = [ItemResult(request_id=v.request_id, output=v.model_dump(mode="json"),
                          outcome=v.outcome, final_text=v.output, citations=v.citations,
                          prompt_tokens=_total(drafts[v.request_id], "prompt"),
                          completion_tokens=_total(drafts[v.request_id], "completion"))
               for v in output.verdicts]
    events = [AuditRecord(request_id=v.request_id, kind=EventKind.VALIDATOR_VERDICT, payload={
        "validator_version": v.validator_version, "status": v.outcome.status.value,
        "error_class": v.outcome.error_class, "citations": v.citations, "reasons": v.reasons,
        "findings": [f.model_dump(mode="json", exclude={"message"}) for f in v.findings],
        "attributions": [a.model_dump(mode="json") for a in v.attributions]})
        for v in output.verdicts]
    return results, events


def _total(draft: dict[str, Any], kind: str) -> int:
    """Tokens of every attempt at this request so far (drafts before repairs had no totals)."""
    return int(draft.get(f"total_{kind}_tokens", draft.get(f"{kind}_tokens", 0)))


def send_back_for_repair(results: list[ItemResult], events: list[AuditRecord],
                         records: list[ItemRecord], max_rounds: int) -> Results:
    """Failed verdicts with repair rounds left go back to generation with their reasons;
    past the budget a failure stands, with its reasons. Weak evidence is not the draft's
    fault and no rewrite fixes it: it ends as an explicit abstention at once."""
    rounds = {r.request_id: r.round for r in records}
    kept: list[ItemResult] = []
    events = list(events)
    for result in results:
        outcome = result.outcome
        round_ = rounds.get(result.request_id, 0)
        if outcome is not None and outcome.error_class == WEAK_EVIDENCE:
            kept.append(result.model_copy(update={
                "outcome": outcome.model_copy(update={"status": Status.ABSTAINED}),
                "final_text": ABSTAIN_TEXT, "citations": []}))
            continue
        if outcome is None or outcome.status != Status.FAILED or round_ >= max_rounds:
            kept.append(result)
            continue
        kept.append(ItemResult(request_id=result.request_id, output=result.output, repair=True))
        events.append(AuditRecord(request_id=result.request_id, kind=EventKind.REPAIR_REQUESTED,
                                  payload={"next_round": round_ + 1, "max_rounds": max_rounds,
                                           "error_class": outcome.error_class,
                                           "reasons": result.output.get("reasons", [])}))
    return kept, events
