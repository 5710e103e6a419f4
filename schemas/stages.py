"""Typed inputs and outputs of the four stages, and the ids a message carries."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field

from schemas.status import ANSWER_LABELS_VERSION, AnswerClass, RiskClass, Status


class Hop(BaseModel):
    """What a queue message carries: ids only, never documents or tensors."""

    shard_id: str
    run: int = Field(ge=0)
    round: int = Field(default=0, ge=0)


class Outcome(BaseModel):
    """A terminal outcome a stage decided for one item; later stages leave it alone."""

    status: Status
    error_class: str | None = None
    message: str = ""


class AuditRecord(BaseModel):
    """One append-only audit event, as a stage proposes it."""

    request_id: str
    kind: str
    payload: dict[str, Any] = Field(default_factory=dict)


# -- router -----------------------------------------------------------------

# Who settled the answer class: the upstream system's declared field (or a document's
# kind), a deterministic rule, the trained classifier, or the default (no classifier).
DecidedBy = Literal["upstream", "rule", "classifier", "default"]
ModelVariant = Literal["small", "large"]


class RouteItem(BaseModel):
    request_id: str
    kind: str
    text: str
    template: str | None = None
    topic: str | None = None  # a document's
    inputs: dict[str, Any] = Field(default_factory=dict)
    answer_class: AnswerClass | None = None  # declared by the upstream system, if it did


class RouterInput(BaseModel):
    items: list[RouteItem]


class RouteDecision(BaseModel):
    request_id: str
    answer_class: AnswerClass
    risk_class: RiskClass
    rules_version: str
    labels_version: str = ANSWER_LABELS_VERSION
    decided_by: DecidedBy = "default"
    classifier_version: str | None = None  # set when the classifier was asked
    confidence: float | None = None  # the classifier's probability for its best class
    model_variant: ModelVariant | None = None  # None: nothing is generated
    decoding_policy: str | None = None
    matched_rule: str | None = None
    input_tokens: int = 0
    # tool_lookup: the validated plan (tool and arguments) retrieval executes, nothing else
    tool_call: dict[str, Any] | None = None
    outcome: Outcome | None = None


class RouterOutput(BaseModel):
    decisions: list[RouteDecision]


# -- retrieval --------------------------------------------------------------


class RetrievalItem(BaseModel):
    request_id: str
    tenant: str
    grants: list[str]
    query: str


class RetrievalInput(BaseModel):
    items: list[RetrievalItem]
    top_k: int = Field(gt=0)


class RetrievedChunk(BaseModel):
    chunk_id: str
    document_id: str
    title: str
    text: str
    score: float


class RetrievalResult(BaseModel):
    request_id: str
    index_id: str
    chunks: list[RetrievedChunk]
    outcome: Outcome | None = None
    cached: bool = False  # served from the retrieval cache (same index, tenant, grants, query)


class RetrievalOutput(BaseModel):
    results: list[RetrievalResult]


# -- generation -------------------------------------------------------------


class GenerationItem(BaseModel):
    request_id: str
    answer_class: AnswerClass
    instruction: str
    chunks: list[RetrievedChunk]
    # A repair attempt: the rejected draft and the validators' reasons, in their own channel.
    previous_draft: str | None = None
    feedback: list[str] = Field(default_factory=list)
    decoding_policy: str | None = None  # the router's choice; None: the default policy
    model_variant: str | None = None  # the router's choice: small | large
    round: int = Field(default=0, ge=0)  # the repair round: part of the sampler's seed
    json_schema: dict[str, Any] | None = None  # a document's output schema, by its template


class GenerationInput(BaseModel):
    items: list[GenerationItem]
    deadline_s: float | None = None


class Draft(BaseModel):
    request_id: str
    text: str
    source_labels: dict[str, str] = Field(default_factory=dict)
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str
    model: str
    backend: str = ""
    decoding: str = ""  # the decoding policy's version
    seed: int = 0
    constrained: bool = False
    queue_wait_s: float = 0.0
    batch_size: int = 1
    compute_s: float = 0.0  # device seconds: its share of its batch
    outcome: Outcome | None = None


class GenerationOutput(BaseModel):
    drafts: list[Draft]


# -- validation -------------------------------------------------------------


class ValidationItem(BaseModel):
    request_id: str
    answer_class: AnswerClass
    draft: str
    source_labels: dict[str, str]
    retrieved_chunk_ids: list[str]
    # label -> the text generation saw under that label (after sanitization); the evidence
    # the support and policy validators check the draft against.
    chunk_texts: dict[str, str] = Field(default_factory=dict)
    contract: str | None = None  # an output contract by name; None: the answer class's default
    # Record ids the draft names that its tenant's system of record does not hold (looked up
    # by the validation task): another tenant's and nobody's alike, so that no answer tells
    # which ids other tenants hold. The policy validator refuses those its sources lack.
    unheld_identifiers: list[str] = Field(default_factory=list)


class ValidationInput(BaseModel):
    items: list[ValidationItem]


class Reason(BaseModel):
    """One validator finding: a stable code for machines and a short, specific message that
    can go back to the model as repair feedback (which sentence, which problem)."""

    validator: str  # contract | citations | support | policy | abstention
    code: str  # e.g. missing_citation, number_not_in_source, pii_phone
    message: str
    sentence: int | None = None  # 1-based, over the draft's checked sentences


class Attribution(BaseModel):
    """A citation the validator added: the model left a claim uncited, and one retrieved source
    supports it under the same support check that cited claims must pass."""

    sentence: int  # 1-based, over the draft's checked sentences
    label: str  # the source label written into the released text, e.g. S2
    chunk_id: str
    score: float  # its support score; the best of the sources that support the claim


class Verdict(BaseModel):
    request_id: str
    validator_version: str
    output: str
    citations: list[str]
    reasons: list[str]  # the findings' messages, in order: the repair feedback
    outcome: Outcome
    findings: list[Reason] = Field(default_factory=list)
    attributions: list[Attribution] = Field(default_factory=list)


class ValidationOutput(BaseModel):
    verdicts: list[Verdict]





# -- what the task base class hands an adapter, and gets back ------------------


REPAIR = "repair"  # in ItemRecord.previous of a repair round: the last draft and its verdict


class ItemRecord(BaseModel):
    """One active request as a stage sees it: the request plus earlier stages' outputs."""

    request_id: str
    tenant: str
    grants: list[str]
    kind: str
    payload: dict[str, Any]
    previous: dict[str, dict[str, Any]] = Field(default_factory=dict)
    round: int = 0  # 0 for the first attempt; n for the n-th repair


class ItemResult(BaseModel):
    """One item's stage output, and its terminal outcome when the stage decided one."""

    request_id: str
    output: dict[str, Any]
    outcome: Outcome | None = None
    final_text: str | None = None
    citations: list[str] = Field(default_factory=list)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    untouched: bool = False  # the request ended earlier: finish the stage row, keep the request
    repair: bool = False  # the draft failed validation: generate again in the next round
