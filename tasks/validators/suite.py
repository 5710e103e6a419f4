"""The validator suite: every validator over every draft of a shard, one verdict per item.

Order of judgement for one item:

1. answer-class rules: a class that forbids output (`refuse`) ends `refused` when the draft
   is empty and `failed` when it is not;
2. abstention: a grounded class with no retrieved chunk ends `abstained` (NoEvidence), and
   the system's own abstention text is released, whatever the draft said; a draft made only
   of explicit abstentions ends `abstained` (ModelAbstained);
3. otherwise contract and policy run; where the rules allow it (`attribute_uncited`), a claim
   the model left uncited is cited with the retrieved source that best supports it at the
   calibration's stricter attribution threshold, if any does (an `Attribution` on the
   verdict, the label written into the released text); then citations and support run, and
   all their reasons are collected, so that one repair round can fix them all; when claims
   fail and no claim of the draft reaches the support threshold's score against any
   retrieved chunk (weak evidence), the abstention validator adds a reason asking for the
   explicit abstention (WeakEvidence).

No reasons: `succeeded`. Otherwise `failed`, the reasons in the order contract, policy,
abstention, citations, support, and the error class of the first (WeakEvidence tells the repair
loop that the sources do not hold the answer).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from schemas.stages import Attribution, Outcome, Reason, ValidationItem, Verdict
from schemas.status import Status
from tasks.embedding import embedder_id
from tasks.lexical import tokenize
from tasks.validators.citations import CITATIONS_VERSION, check_citations, valid_labels
from tasks.validators.contract import Contract, ContractRegistry, claim_passages, claims_offset
from tasks.validators.policy import PolicyFindings, check_policy, forbidden_output
from tasks.validators.rules import RULES_PATH, ClassRule, ValidatorRules
from tasks.validators.support import (
    CALIBRATION_PATH,
    CalibrationError,
    SupportAssessment,
    SupportCalibration,
    SupportScorer,
)
from tasks.validators.text import Sentence, split_sentences

# 2: a failed verdict releases no output; text.py reads label lines, stating headings and
# abstentions that go on
SUITE_VERSION = "suite-2"
ATTRIBUTION_MIN_TERMS = 3  # content words (tasks.lexical) an uncited claim needs to be cited
# 2: other tenants' record ids; 3: any record id not its own or sourced; 4: a credential's
# secret masked in every reason
POLICY_VERSION = "policy-4"
ABSTENTION_VERSION = "abstention-1"
_ERROR_CLASSES = {
    ("citations", "missing_citation"): "MissingCitation",
    ("citations", "unknown_label"): "UnknownCitation",
    ("citations", "not_retrieved"): "UnknownCitation",
    ("abstention", "weak_evidence"): "WeakEvidence",
}
_ERROR_BY_VALIDATOR = {"contract": "ContractViolation", "policy": "PolicyViolation",
                       "support": "UnsupportedClaim"}
# Reasons are listed (and the error class taken) in this order: a draft on weak evidence is
# told to abstain before it is told which sentences fail.
_PRECEDENCE = ("contract", "policy", "abstention", "citations", "support")


@dataclass
class _Case:
    """One item on its way through the suite."""

    item: ValidationItem
    rule: ClassRule
    sentences: list[Sentence] = field(default_factory=list)
    reasons: list[Reason] = field(default_factory=list)
    outcome: Outcome | None = None  # decided before the checks (refused, abstained)
    output: str | None = None
    policy: PolicyFindings | None = None
    contract: Contract | None = None
    parsed: BaseModel | None = None  # the draft under its contract, when it fits
    # uncited claims' best supporting source at the attribution threshold: (label, assessment)
    supporters: dict[int, tuple[str, SupportAssessment]] = field(default_factory=dict)
    attributions: list[Attribution] = field(default_factory=list)

    @property
    def claims(self) -> list[Sentence]:
        return [s for s in self.sentences if not s.abstains]


class ValidatorSuite:
    """The validators with their rules, contracts and calibrated support threshold.

    Building one reads files only; the embedder loads in `warm_up()` (or on first use).
    """

    def __init__(self, scorer: SupportScorer, calibration: SupportCalibration,
                 rules: ValidatorRules, contracts: ContractRegistry | None = None) -> None:
        if rules.attribute_uncited and calibration.attribution_threshold is None:
            raise CalibrationError("the rules let the validator cite uncited claims, and the "
                                   "support calibration has no attribution threshold: run "
                                   "`sluice validators calibrate`")
        self.scorer = scorer
        self.calibration = calibration
        self.rules = rules
        self.contracts = contracts or ContractRegistry.default()

    @classmethod
    def load(cls, embedder: Any, contracts: ContractRegistry | None = None,
             rules_path: Path = RULES_PATH,
             calibration_path: Path = CALIBRATION_PATH) -> ValidatorSuite:
        """The suite from the rules and calibration files; the embedder must be the one the
        threshold was calibrated with (same `embedder_id`)."""
        calibration = SupportCalibration.load(calibration_path)
        actual = embedder_id(embedder.model_path)
        if actual != calibration.embedder:
            raise CalibrationError(f"the support threshold was calibrated with embedder "
                                   f"{calibration.embedder!r}, got {actual!r}")
        return cls(SupportScorer(embedder), calibration, ValidatorRules.load(rules_path), contracts)

    def warm_up(self) -> None:
        self.scorer.warm_up()

    @property
    def versions(self) -> dict[str, str]:
        return suite_versions(self.calibration, self.rules, self.contracts)

    @property
    def version(self) -> str:
        return join_versions(self.versions)

    def judge(self, items: Sequence[ValidationItem]) -> list[Verdict]:
        cases = [self._prepare(item) for item in items]
        checked = [c for c in cases if c.outcome is None]
        if self.rules.attribute_uncited:
            self._attribute_uncited(checked)
        for case in checked:
            if case.rule.grounded:
                case.reasons.extend(check_citations(case.sentences, case.item))
        self._check_support(checked)
        self._check_evidence_strength(checked)
        version = self.version
        return [self._verdict(c, version) for c in cases]

    # -- steps ---------------------------------------------------------------------------

    def _prepare(self, item: ValidationItem) -> _Case:
        case = _Case(item, self.rules.for_class(str(item.answer_class)))
        draft = item.draft.strip()
        if case.rule.forbid_output:
            return self._forbid_output(case, draft)
        raw = split_sentences([item.draft], self.rules.abstention)
        if case.rule.grounded and not item.retrieved_chunk_ids:
            return self._abstain(case, "NoEvidence", "no_evidence",
                                 "No source was retrieved for this request.", self.rules.abstain_text)
        if raw and all(s.abstains for s in raw):
            return self._abstain(case, "ModelAbstained", "model_abstained",
                                 "The model said the sources do not contain the answer.", draft)
        self._check_contract_policy(case, raw)
        return case

    def _forbid_output(self, case: _Case, draft: str) -> _Case:
        """Nothing is released; a draft that says something anyway is a policy failure."""
        answer_class = str(case.item.answer_class)
        case.output = ""
        if draft:
            case.reasons = [forbidden_output(answer_class)]
        else:
            case.outcome = Outcome(status=Status.REFUSED, error_class="Refused",
                                   message=f"answer class {answer_class!r} is refused")
        return case

    def _abstain(self, case: _Case, error_class: str, code: str, message: str, output: str) -> _Case:
        case.outcome = Outcome(status=Status.ABSTAINED, error_class=error_class, message=message)
        case.reasons = [Reason(validator="abstention", code=code, message=message)]
        case.output = output
        return case

    def _check_contract_policy(self, case: _Case, raw: list[Sentence]) -> None:
        """`raw`: the draft's sentences, which are the claims unless the contract's model
        names other passages."""
        item = case.item
        contract = case.contract = self.contracts.for_item(item)
        parsed, reasons = (None, [self.contracts.missing_reason(item)]) if contract is None else (
            contract.check(item.draft))
        case.reasons.extend(reasons)
        case.policy = check_policy(item.draft, item.chunk_texts.values(), self.rules,
                                   item.unheld_identifiers)
        case.reasons.extend(case.policy.reasons)
        if parsed is None:
            return
        case.parsed = parsed
        passages = claim_passages(parsed, item.draft)
        case.sentences = raw if passages == [item.draft] else split_sentences(
            passages, self.rules.abstention)

    def _attribute_uncited(self, cases: list[_Case]) -> None:
        """Cite each uncited claim with the retrieved source that best supports it at the
        calibration's stricter attribution threshold, when one does; see `_cite`."""
        threshold = self.calibration.attribution_threshold
        assert threshold is not None  # __init__ refuses rules that attribute without one
        requests: list[tuple[_Case, Sentence, str]] = []
        for case in (c for c in cases if c.rule.grounded):
            uncited = [s for s in case.claims if not s.labels and _attributable(s)]
            if uncited:
                labels = _readable_labels(case.item)
                requests += [(case, sentence, label) for sentence in uncited for label in labels]
        assessed = self.scorer.assess_many([(s.claim, c.item.chunk_texts[label])
                                            for c, s, label in requests])
        for (case, sentence, label), assessment in zip(requests, assessed, strict=True):
            held = case.supporters.get(sentence.index)
            if assessment.supported(threshold) and (held is None or assessment.score > held[1].score):
                case.supporters[sentence.index] = (label, assessment)
        for case in cases:
            if case.supporters:
                self._cite(case)

    def _cite(self, case: _Case) -> None:
        """Write each supporter's label after its sentence in the released text. The draft's
        sentences are found in order from where its claims begin, so a label lands after its
        own sentence even when an earlier one, or a document's title, contains the same words.
        A sentence not found as written (a JSON body with escaped characters) stays uncited;
        so do all of them when the cited text would no longer fit the item's contract (a body
        pushed over its length limit)."""
        text, sentences, attributions = case.item.draft, [], []
        cursor = 0 if case.parsed is None else claims_offset(case.parsed, text)
        for sentence in case.sentences:
            at = text.find(sentence.text, cursor)
            if at < 0:
                sentences.append(sentence)
                continue
            cursor = at + len(sentence.text)
            if sentence.index not in case.supporters:
                sentences.append(sentence)
                continue
            label, assessment = case.supporters[sentence.index]
            text = f"{text[:cursor]} [{label}]{text[cursor:]}"
            cursor += len(label) + 3
            sentences.append(replace(sentence, text=f"{sentence.text} [{label}]", labels=(label,)))
            attributions.append(Attribution(
                sentence=sentence.index, label=label, chunk_id=case.item.source_labels[label],
                score=round(assessment.score, 4)))
        if not attributions or (case.contract is not None and case.contract.check(text)[1]):
            return
        case.sentences, case.attributions, case.output = sentences, attributions, text

    def _check_support(self, cases: list[_Case]) -> None:
        """Each claim against the text of the sources it validly cites, in one batch."""
        requests: list[tuple[_Case, Sentence, list[str]]] = []
        for case in (c for c in cases if c.rule.grounded):
            for sentence in case.claims:
                labels = valid_labels(sentence, case.item)
                absent = [label for label in labels if not case.item.chunk_texts.get(label, "").strip()]
                if absent:
                    case.reasons.append(_missing_text(sentence, absent))
                elif labels:
                    requests.append((case, sentence, labels))
        assessed = self.scorer.assess_many(
            [(s.claim, "\n\n".join(c.item.chunk_texts[label] for label in labels))
             for c, s, labels in requests])
        for (case, sentence, labels), assessment in zip(requests, assessed, strict=True):
            if not assessment.supported(self.calibration.threshold):
                case.reasons.append(self._unsupported(sentence, labels, assessment))

    def _check_evidence_strength(self, cases: list[_Case]) -> None:
        """A draft whose claims fail is on weak evidence when no claim of it reaches the
        threshold's score against any retrieved chunk (specifics aside: a wrong number in a
        sentence the sources are about is a wrong answer, not weak evidence). The right
        answer is then the explicit abstention."""
        threshold = self.calibration.threshold
        candidates = [c for c in cases if c.rule.grounded and c.claims and c.item.chunk_texts
                      and any(r.validator in ("citations", "support") for r in c.reasons)]
        requests = [(case, s) for case in candidates for s in case.claims]
        scores = self.scorer.scores_many(
            [(s.claim, "\n\n".join(case.item.chunk_texts.values())) for case, s in requests])
        best: dict[int, float] = {}
        for (case, _), score in zip(requests, scores, strict=True):
            best[id(case)] = max(best.get(id(case), 0.0), score)
        for case in candidates:
            if best.get(id(case), 0.0) < threshold:
                case.reasons.append(Reason(
                    validator="abstention", code="weak_evidence",
                    message=f"None of the sources supports this answer. If they do not contain "
                            f"the answer, reply exactly: {self.rules.abstain_text}"))

    def _unsupported(self, sentence: Sentence, labels: list[str],
                     assessment: SupportAssessment) -> Reason:
        cited = " ".join(f"[{label}]" for label in labels)
        head = f"Sentence {sentence.index} {sentence.quote} is not supported by {cited}"
        closest = f' (closest: "{_clip(assessment.aligned)}")'
        if assessment.missing_numbers:
            code, why = "number_not_in_source", (
                f": {', '.join(assessment.missing_numbers)} does not appear there{closest}.")
        elif assessment.missing_names:
            code, why = "name_not_in_source", (
                f": it names {', '.join(assessment.missing_names)}, which the source does not mention.")
        elif assessment.negation or assessment.contrast:
            code, why = "contradicts_source", f": the source says otherwise{closest}."
        else:
            code, why = "unsupported", (f" (support {assessment.score:.2f}, needs "
                                        f"{self.calibration.threshold:.2f}){closest}.")
        return Reason(validator="support", code=code, message=head + why + " State only what the "
                      "source says, or drop the sentence.", sentence=sentence.index)

    def _verdict(self, case: _Case, version: str) -> Verdict:
        item = case.item
        cited = [item.source_labels[label] for s in case.sentences for label in valid_labels(s, item)]
        reasons = sorted(case.reasons, key=lambda r: _PRECEDENCE.index(r.validator))
        if case.policy is not None and case.policy.leaked:  # reasons go to the audit trail
            reasons = [r.model_copy(update={"message": case.policy.redact(r.message)}) for r in reasons]
        outcome = case.outcome or _outcome(reasons)
        output = item.draft if case.output is None else case.output
        if outcome.status == Status.FAILED:
            # A draft that failed is not an answer: nothing of it is released (a repair round
            # reads the draft from generation's output, not from here).
            output = ""
        return Verdict(request_id=item.request_id, validator_version=version,
                       output=output,
                       citations=list(dict.fromkeys(cited)),
                       reasons=[r.message for r in reasons], findings=reasons, outcome=outcome,
                       attributions=case.attributions)


def _outcome(reasons: list[Reason]) -> Outcome:
    if not reasons:
        return Outcome(status=Status.SUCCEEDED)
    first = reasons[0]
    error_class = _ERROR_CLASSES.get((first.validator, first.code),
                                     _ERROR_BY_VALIDATOR.get(first.validator, "ValidationFailed"))
    more = f" (and {len(reasons) - 1} more)" if len(reasons) > 1 else ""
    return Outcome(status=Status.FAILED, error_class=error_class, message=first.message + more)


def _readable_labels(item: ValidationItem) -> list[str]:
    """The labels of retrieved sources whose text the validator was given."""
    retrieved = set(item.retrieved_chunk_ids)
    return [label for label, chunk_id in item.source_labels.items()
            if chunk_id in retrieved and item.chunk_texts.get(label, "").strip()]


def _attributable(sentence: Sentence) -> bool:
    """A claim that says enough for a source to be credited with it: "The answer is:" has one
    content word, which a source can cover without saying anything the claim does."""
    return len(tokenize(sentence.claim)) >= ATTRIBUTION_MIN_TERMS


def _missing_text(sentence: Sentence, labels: list[str]) -> Reason:
    cited = ", ".join(f"[{label}]" for label in labels)
    return Reason(validator="support", code="missing_source_text", sentence=sentence.index,
                  message=f"Sentence {sentence.index} cites {cited}, whose text the validator was "
                          "not given, so its support cannot be checked.")


def _clip(text: str, limit: int = 90) -> str:
    return text if len(text) <= limit else text[:limit - 1] + "…"


def suite_versions(calibration: SupportCalibration, rules: ValidatorRules,
                   contracts: ContractRegistry) -> dict[str, str]:
    """Each validator's version: its code version plus what it reads (rules hash, contract
    schemas, support threshold, labelled data hash and embedder)."""
    return {"contract": contracts.version, "policy": f"{POLICY_VERSION}:{rules.digest[:8]}",
            "citations": f"{CITATIONS_VERSION}:{'attribute' if rules.attribute_uncited else 'strict'}",
            "support": calibration.version,
            "abstention": f"{ABSTENTION_VERSION}:{rules.digest[:8]}"}


def join_versions(versions: dict[str, str]) -> str:
    return ";".join([SUITE_VERSION, *versions.values()])
