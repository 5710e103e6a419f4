"""Statuses, stages, lanes and policies: the words every other module shares."""

from __future__ import annotations

from enum import StrEnum


class Status(StrEnum):
    """A request's status. Exactly one terminal status ends every request."""

    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    ABSTAINED = "abstained"
    REFUSED = "refused"
    NEEDS_CLARIFICATION = "needs_clarification"
    FAILED = "failed"

    @property
    def is_terminal(self) -> bool:
        return self not in (Status.QUEUED, Status.RUNNING)


TERMINAL_STATUSES = frozenset(s for s in Status if s.is_terminal)
RESULT_STATUSES = TERMINAL_STATUSES - {Status.FAILED}


class Stage(StrEnum):
    """The four stages, in chain order."""

    ROUTER = "router"
    RETRIEVAL = "retrieval"
    GENERATION = "generation"
    VALIDATION = "validation"

    @property
    def next(self) -> Stage | None:
        order = list(Stage)
        index = order.index(self)
        return order[index + 1] if index + 1 < len(order) else None


class ShardStageStatus(StrEnum):
    """A shard stage: pending until claimed, running under a lease, then done. The stage
    runs it records, one per item, are written when it is done."""

    PENDING = "pending"
    RUNNING = "running"
    DONE = "done"


class Lane(StrEnum):
    """Online work is drained before batch work on every queue."""

    ONLINE = "online"
    BATCH = "batch"


class DriftPolicy(StrEnum):
    """What a stage does when its components differ from the request's pin."""

    STRICT = "strict"
    FOLLOW = "follow"


class AnswerClass(StrEnum):
    """What kind of request the router decided this is: a versioned label set.

    Adding, removing or renaming a value changes what the router, its rules and its
    trained head mean, so it bumps `ANSWER_LABELS_VERSION`.
    """

    GROUNDED_ANSWER = "grounded_answer"  # answered from the tenant's corpus, with citations
    DOCUMENT = "document"  # a document written from a template
    TOOL_LOOKUP = "tool_lookup"  # fresh data from a system of record, through a governed tool
    REFUSE = "refuse"  # not served
    CLARIFY = "clarify"  # too vague to act on: the caller is asked to say more


ANSWER_LABELS_VERSION = "answer-classes-v2"


class RiskClass(StrEnum):
    LOW = "low"
    MEDIUM = "medium"
    HIGH = "high"

    @property
    def rank(self) -> int:
        return list(RiskClass).index(self)
