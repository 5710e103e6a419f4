"""The kinds of append-only audit events."""

from __future__ import annotations

from enum import StrEnum


class EventKind(StrEnum):
    ADMITTED = "admitted"
    ROUTE_DECISION = "route_decision"
    DATA_READ = "data_read"
    INJECTION_SIGNAL = "injection_signal"
    TOOL_CALL = "tool_call"
    MODEL_CALL = "model_call"
    VALIDATOR_VERDICT = "validator_verdict"
    REPAIR_REQUESTED = "repair_requested"
    DRIFT = "drift"
    STAGE_FAILED = "stage_failed"
    DEADLINE_EXCEEDED = "deadline_exceeded"
    POISON_MESSAGE = "poison_message"
    CANCELLED = "cancelled"
    REPLAY = "replay"
