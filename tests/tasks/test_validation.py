"""The validation stage: the answer contract, citations and abstention."""

from __future__ import annotations

from dataclasses import replace

import pytest

from schemas.stages import ValidationInput, ValidationItem, Verdict
from schemas.status import AnswerClass, Status
from tasks.validation import VALIDATOR_VERSION, default_suite, validate, validators_version
from tasks.validators.suite import ValidatorSuite

pytestmark = [pytest.mark.unit]

CHUNK_A = "a1b2c3d4e5f60718"
CHUNK_B = "0f1e2d3c4b5a6978"
# Excerpts of the example corpus's acme IT helpdesk FAQ, as retrieval returns chunks.
TEXT_A = ("## How do I get a new laptop?\n\nLaptops are replaced every **4 years**, or sooner if "
          "broken. Request a replacement in the IT portal under \"Hardware\". Engineers receive a "
          "32 GB machine; other staff receive a 16 GB machine.")
TEXT_B = ("## I am locked out of my account. What do I do?\n\nAccounts lock after **5 failed "
          "sign-in attempts** and unlock automatically after 15 minutes.")
TEXTS = {"S1": TEXT_A, "S2": TEXT_B}


def _judge(draft: str, labels: dict[str, str] | None = None,
           retrieved: list[str] | None = None, texts: dict[str, str] | None = None,
           attribute: bool = True) -> Verdict:
    item = ValidationItem(
        request_id="r1", answer_class=AnswerClass.GROUNDED_ANSWER, draft=draft,
        source_labels={"S1": CHUNK_A, "S2": CHUNK_B} if labels is None else labels,
        retrieved_chunk_ids=[CHUNK_A, CHUNK_B] if retrieved is None else retrieved,
        chunk_texts=TEXTS if texts is None else texts,
    )
    suite = default_suite()
    if not attribute:  # the shipped rules let the validator cite; this suite may not
        suite = ValidatorSuite(suite.scorer, suite.calibration,
                               replace(suite.rules, attribute_uncited=False), suite.contracts)
    verdicts = validate(ValidationInput(items=[item]), suite).verdicts
    assert len(verdicts) == 1
    assert verdicts[0].request_id == "r1"
    assert verdicts[0].validator_version == suite.version
    return verdicts[0]


def test_draft_citing_a_retrieved_source_succeeds() -> None:
    verdict = _judge("Laptop replacements are requested in the IT portal [S1].")

    assert verdict.outcome.status == Status.SUCCEEDED
    assert verdict.citations == [CHUNK_A]
    assert verdict.reasons == []
    assert verdict.output == "Laptop replacements are requested in the IT portal [S1]."


def test_repeated_citations_are_listed_once_in_order() -> None:
    verdict = _judge("Accounts lock after 5 failed sign-in attempts [S2]. Laptops are replaced "
                     "every 4 years [S1]. They unlock automatically after 15 minutes [S2].")

    assert verdict.outcome.status == Status.SUCCEEDED, verdict.reasons
    assert verdict.citations == [CHUNK_B, CHUNK_A]


def test_citation_of_an_unknown_label_fails() -> None:
    verdict = _judge("Laptops are replaced every 4 years [S9].")

    assert verdict.outcome.status == Status.FAILED
    assert verdict.outcome.error_class == "UnknownCitation"
    assert "S9" in verdict.outcome.message
    assert verdict.citations == []
    assert verdict.reasons == [verdict.outcome.message]


def test_label_mapping_to_a_chunk_that_was_not_retrieved_fails() -> None:
    verdict = _judge("Laptops are replaced every 4 years [S1].", labels={"S1": "ffffffffffffffff"})

    assert verdict.outcome.status == Status.FAILED
    assert verdict.outcome.error_class == "UnknownCitation"


def test_draft_without_citation_fails_when_the_validator_may_not_cite() -> None:
    verdict = _judge("Laptop replacements are requested in the IT portal.", attribute=False)

    assert verdict.outcome.status == Status.FAILED
    assert verdict.outcome.error_class == "MissingCitation"
    assert verdict.citations == []
    assert verdict.attributions == []


def test_an_uncited_claim_a_source_supports_is_cited_by_the_validator() -> None:
    # Given a draft whose two claims cite nothing, each supported by one source
    verdict = _judge("Laptops are replaced every 4 years. Accounts lock after 5 failed sign-in "
                     "attempts.")

    # Then each is cited with the source that supports it, in the released text too
    assert verdict.outcome.status == Status.SUCCEEDED, verdict.reasons
    assert verdict.output == ("Laptops are replaced every 4 years. [S1] Accounts lock after 5 "
                              "failed sign-in attempts. [S2]")
    assert verdict.citations == [CHUNK_A, CHUNK_B]
    assert [(a.sentence, a.label, a.chunk_id) for a in verdict.attributions] == [
        (1, "S1", CHUNK_A), (2, "S2", CHUNK_B)]
    assert all(a.score >= default_suite().calibration.attribution_threshold  # type: ignore[operator]
               for a in verdict.attributions)


def test_a_source_must_clear_the_stricter_threshold_to_be_credited() -> None:
    # Given an uncited claim the first source supports above the support threshold (0.59) but
    # below the attribution threshold (0.71)
    claim = "New laptops are ordered in the portal."
    calibration = default_suite().calibration
    score = default_suite().scorer.assess_many([(claim, TEXT_A)])[0].score
    assert calibration.threshold <= score < calibration.attribution_threshold  # type: ignore[operator]

    # Then the validator does not cite it; cited by the model, it passes
    uncited = _judge(f"Laptops are replaced every 4 years [S1]. {claim}")
    cited = _judge(f"Laptops are replaced every 4 years [S1]. {claim[:-1]} [S1].")
    assert uncited.outcome.error_class == "MissingCitation" and uncited.attributions == []
    assert cited.outcome.status == Status.SUCCEEDED, cited.reasons


def test_a_label_lands_after_its_own_sentence_when_an_earlier_one_holds_the_same_words() -> None:
    # Given a cited sentence that contains the words of a later, uncited one
    verdict = _judge("Note: Laptops are replaced every 4 years. [S1] Laptops are replaced "
                     "every 4 years.")

    # Then the label goes after the second sentence, not into the first
    assert verdict.output == ("Note: Laptops are replaced every 4 years. [S1] Laptops are "
                              "replaced every 4 years. [S1]")
    assert [(a.sentence, a.label) for a in verdict.attributions] == [(2, "S1")]


def test_a_claim_too_short_to_credit_a_source_with_stays_uncited() -> None:
    # Given an uncited sentence of two content words, both in the first source
    verdict = _judge("Laptops are replaced every 4 years [S1]. Request a replacement.")

    # Then the validator credits no source with it
    assert verdict.outcome.status == Status.FAILED
    assert [(f.code, f.sentence) for f in verdict.findings] == [("missing_citation", 2)]
    assert verdict.attributions == []


def test_an_uncited_claim_no_single_source_supports_stays_uncited() -> None:
    # Given a cited claim, and an uncited one whose two numbers come from two different sources
    verdict = _judge("Laptops are replaced every 4 years [S1]. Laptops are replaced every 4 "
                     "years and accounts lock after 5 failed sign-in attempts.")

    # Then no source is credited with the second, which fails as uncited
    assert verdict.outcome.status == Status.FAILED
    assert verdict.outcome.error_class == "MissingCitation"
    assert [(f.code, f.sentence) for f in verdict.findings] == [("missing_citation", 2)]
    assert verdict.attributions == []
    assert verdict.output == ""  # failed: nothing of it released


def test_every_sentence_must_cite_not_just_one() -> None:
    # Given a first sentence with a citation and a second without (the old contract passed it)
    verdict = _judge("Laptops are replaced every 4 years [S1]. Accounts lock after 5 failed "
                     "sign-in attempts.", attribute=False)

    # Then the second sentence is named in the reason
    assert verdict.outcome.status == Status.FAILED
    assert verdict.outcome.error_class == "MissingCitation"
    assert [(f.code, f.sentence) for f in verdict.findings] == [("missing_citation", 2)]
    assert verdict.reasons[0].startswith('Sentence 2 "Accounts lock after 5 failed')


@pytest.mark.parametrize("draft", ["I don't know.", "i do not know", "  I dont know the answer."])
def test_model_abstention_is_abstained(draft: str) -> None:
    verdict = _judge(draft)

    assert verdict.outcome.status == Status.ABSTAINED
    assert verdict.outcome.error_class == "ModelAbstained"


def test_no_retrieved_chunks_is_abstained_no_evidence() -> None:
    # Given a draft that even cites a source, but nothing was retrieved
    verdict = _judge("Something plausible [S1].", labels={}, retrieved=[], texts={})

    # Then there is no evidence to ground it on, and the draft is not what is released
    assert verdict.outcome.status == Status.ABSTAINED
    assert verdict.outcome.error_class == "NoEvidence"
    assert verdict.output == "I don't know."


@pytest.mark.parametrize("draft", ["", "   ", "x"])
def test_empty_draft_is_a_contract_violation(draft: str) -> None:
    verdict = _judge(draft)

    assert verdict.outcome.status == Status.FAILED
    assert verdict.outcome.error_class == "ContractViolation"


def test_each_item_gets_its_own_verdict() -> None:
    items = [
        ValidationItem(request_id=f"r{i}", answer_class=AnswerClass.GROUNDED_ANSWER, draft=draft,
                       source_labels={"S1": CHUNK_A}, retrieved_chunk_ids=[CHUNK_A],
                       chunk_texts={"S1": TEXT_A})
        for i, draft in enumerate(["Laptops are replaced every 4 years [S1].", "",
                                   "Laptops are replaced every 4 years [S4].", "I don't know."])
    ]

    verdicts = validate(ValidationInput(items=items)).verdicts

    assert [v.request_id for v in verdicts] == ["r0", "r1", "r2", "r3"]
    assert [v.outcome.status for v in verdicts] == [
        Status.SUCCEEDED, Status.FAILED, Status.FAILED, Status.ABSTAINED]


def test_the_version_comes_from_files_alone_and_names_the_suite() -> None:
    version = validators_version()

    assert version == default_suite().version
    assert version.startswith(f"{VALIDATOR_VERSION};contract-2:")
