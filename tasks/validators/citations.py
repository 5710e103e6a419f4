"""Every claim sentence cites at least one source label that maps to a retrieved chunk."""

from __future__ import annotations

from collections.abc import Sequence

from schemas.stages import Reason, ValidationItem
from tasks.validators.text import Sentence

CITATIONS_VERSION = "citations-2"  # 2: the suite may attribute uncited claims (rules: attribute_uncited)


def check_citations(sentences: Sequence[Sentence], item: ValidationItem) -> list[Reason]:
    """Sentences that cite nothing, or cite a label that is unknown or was not retrieved.

    Abstentions ("I don't know.") need no citation.
    """
    retrieved = set(item.retrieved_chunk_ids)
    known = ", ".join(f"[{label}]" for label in item.source_labels) or "none"
    reasons = []
    for sentence in sentences:
        if sentence.abstains:
            continue
        if not sentence.labels:
            reasons.append(_reason("missing_citation", sentence,
                                   f"Sentence {sentence.index} {sentence.quote} cites no source; end "
                                   "it with the label of the source it comes from, like [S1]."))
        for label in sentence.labels:
            if label not in item.source_labels:
                reasons.append(_reason("unknown_label", sentence,
                                       f"Sentence {sentence.index} cites [{label}], which is not one "
                                       f"of the sources (sources: {known})."))
            elif item.source_labels[label] not in retrieved:
                reasons.append(_reason("not_retrieved", sentence,
                                       f"Sentence {sentence.index} cites [{label}], a source that "
                                       "was not retrieved for this request."))
    return reasons


def valid_labels(sentence: Sentence, item: ValidationItem) -> list[str]:
    retrieved = set(item.retrieved_chunk_ids)
    return [label for label in sentence.labels
            if item.source_labels.get(label) in retrieved]


def _reason(code: str, sentence: Sentence, message: str) -> Reason:
    return Reason(validator="citations", code=code, message=message, sentence=sentence.index)
