"""The validation stage: the answer contract, citations and abstention, as code."""

from __future__ import annotations

import re

from schemas.stages import Outcome, ValidationInput, ValidationItem, ValidationOutput, Verdict
from schemas.status import Status

VALIDATOR_VERSION = "answer-contract-1"
_CITATION = re.compile(r"\[(S\d+)\]")
_ABSTAIN = re.compile(r"^\s*i (do not|don't|dont) know\b", re.IGNORECASE)
MIN_ANSWER_CHARS = 2


def validate(batch: ValidationInput) -> ValidationOutput:
    """Judge every draft of a shard; each item gets exactly one terminal outcome."""
    return ValidationOutput(verdicts=[_judge(item) for item in batch.items])


def _judge(item: ValidationItem) -> Verdict:
    labels = _CITATION.findall(item.draft)
    cited = list(dict.fromkeys(item.source_labels.get(label, f"?{label}") for label in labels))
    verdict = Verdict(request_id=item.request_id, validator_version=VALIDATOR_VERSION,
                      output=item.draft, citations=[c for c in cited if not c.startswith("?")],
                      reasons=[], outcome=Outcome(status=Status.SUCCEEDED))
    problem = _contract_problem(item, cited)
    if problem is None:
        return verdict
    return verdict.model_copy(update={"reasons": [problem.message], "outcome": problem})


def _contract_problem(item: ValidationItem, cited: list[str]) -> Outcome | None:
    if not item.retrieved_chunk_ids:
        return Outcome(status=Status.ABSTAINED, error_class="NoEvidence",
                       message="no chunk was retrieved for this request")
    if _ABSTAIN.match(item.draft):
        return Outcome(status=Status.ABSTAINED, error_class="ModelAbstained",
                       message="the model said the sources do not contain the answer")
    if len(item.draft.strip()) < MIN_ANSWER_CHARS:
        return Outcome(status=Status.FAILED, error_class="ContractViolation",
                       message=f"the answer is empty: {item.draft!r}")
    unknown = [c for c in cited if c.startswith("?") or c not in item.retrieved_chunk_ids]
    if unknown:
        return Outcome(status=Status.FAILED, error_class="UnknownCitation",
                       message=f"cites sources that were not retrieved: {unknown}")
    if not cited:
        return Outcome(status=Status.FAILED, error_class="MissingCitation",
                       message="the answer cites no retrieved chunk")
    return None
