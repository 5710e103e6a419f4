"""A draft as the validators read it: sentences, the source labels each cites, abstentions.

Pure string work, no models. A sentence ends at `.`, `!` or `?` followed by white space, or
at the end of a line; citation labels written just after the full stop (`... rule. [S1]`)
belong to the sentence before them, and so do a line of labels alone and a "Sources: [S1]"
trailer. Markdown headings that only name a topic (no number past their numbering, no
asserting verb, or a question), table rules and empty lines are not claims; bullet and
number markers are dropped.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from schemas.documents import CITATION_LABEL

_LEADING_CITATIONS = re.compile(r"^(?:\s*\[[A-Z]\d+\])+[.,;:]?")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")
_BULLET = re.compile(r"^\s*(?:[-*+•]|\d{1,2}[.)])\s+")
_HEADING = re.compile(r"^\s*#{1,6}\s")
_ABBREVIATIONS = ("e.g.", "i.e.", "dr.", "mr.", "ms.", "mrs.", "st.", "vs.", "etc.", "no.", "approx.")
# After an abstention phrase, what may make the sentence assert something after all: a
# contrast ("I don't know, but X"), a consequence ("..., so X") or a second clause ("; X",
# ": X"; not the colon of "09:00"). It does when X is not an abstention itself.
_GOES_ON = re.compile(r"\b(?:but|however|although|though|except|so|therefore|thus|hence)\b"
                      r"|[;:](?=\s)", re.IGNORECASE)
# A heading states a claim when, past its numbering ("Step 2", "3."), it holds a number or
# a verb that asserts ("# The stipend is $9,000", "## Root passwords are shared"); others
# ("## Steps", "## What to do when the pager fires") name what follows. A question asks.
_HEADING_NUMBERING = re.compile(r"^(?:(?:step|part|section|phase|stage)\s+)?\d+[.):]?\s*",
                                re.IGNORECASE)
_ASSERTING = re.compile(r"\b(?:is|are|was|were|has|have|had|must|can|cannot|can't|will|"
                        r"won't|should|may|never|always)\b", re.IGNORECASE)
# A line of labels alone, or a "Sources: [S1] [S2]" trailer: the sentence before cites them.
_LABELS_ONLY = re.compile(r"^\W*(?:(?:sources?|citations?|references?)\s*:?\s*)?"
                          r"(?:\[[A-Z]\d+\][\s,;.]*)+$", re.IGNORECASE)
QUOTE_CHARS = 70


@dataclass(frozen=True)
class Sentence:
    """One sentence of a draft. `claim` is its text without citation labels."""

    index: int  # 1-based over all checked sentences of the draft
    text: str
    claim: str
    labels: tuple[str, ...]
    abstains: bool

    @property
    def quote(self) -> str:
        """The sentence, shortened for a message: `"Swaps need manager approval."`."""
        text = self.claim if len(self.claim) <= QUOTE_CHARS else self.claim[:QUOTE_CHARS - 1] + "…"
        return f'"{text}"'


def split_sentences(passages: Iterable[str], abstention: re.Pattern[str]) -> list[Sentence]:
    """The checked sentences of one or more passages, numbered across all of them."""
    raw: list[str] = []
    for passage in passages:
        for line in passage.splitlines():
            for piece in _line_sentences(line):
                if raw and _LABELS_ONLY.match(piece):
                    labels = " ".join(f"[{label}]" for label in CITATION_LABEL.findall(piece))
                    raw[-1] = f"{raw[-1]} {labels}"
                else:
                    raw.append(piece)
    sentences: list[Sentence] = []
    for text in raw:
        claim = " ".join(CITATION_LABEL.sub(" ", text).split())
        claim = re.sub(r"\s+([.,;:!?])", r"\1", claim)
        if not re.search(r"[^\W_]", claim) and not CITATION_LABEL.search(text):
            continue  # punctuation alone; "$9,000,000." is a claim
        labels = tuple(dict.fromkeys(CITATION_LABEL.findall(text)))
        sentences.append(Sentence(index=len(sentences) + 1, text=text, claim=claim,
                                  labels=labels, abstains=is_abstention(claim, abstention)))
    return sentences


def _line_sentences(line: str) -> list[str]:
    if not re.search(r"[^\W_]", line):
        return []
    heading = _HEADING.match(line)
    if heading:
        title = _HEADING_NUMBERING.sub("", line[heading.end():].strip())
        if not _heading_asserts(title):
            return []
        line = title
    pieces = _join_abbreviations(_SENTENCE_END.split(_BULLET.sub("", line).strip()))
    merged: list[str] = []
    for piece in pieces:
        lead = _LEADING_CITATIONS.match(piece)
        if lead and merged:  # "... rule. [S1] Next" -> the labels close the sentence before
            merged[-1] = f"{merged[-1]} {lead.group(0).strip()}"
            piece = piece[lead.end():].strip()
        if piece:
            merged.append(piece)
    return merged


def _heading_asserts(title: str) -> bool:
    return not title.rstrip().endswith("?") and bool(re.search(r"\d", title)
                                                      or _ASSERTING.search(title))


def _join_abbreviations(pieces: Sequence[str]) -> list[str]:
    joined: list[str] = []
    for piece in pieces:
        if joined and joined[-1].lower().endswith(_ABBREVIATIONS):
            joined[-1] = f"{joined[-1]} {piece}"
        else:
            joined.append(piece)
    return joined


def abstention_pattern(phrases: Iterable[str]) -> re.Pattern[str]:
    """One case-insensitive pattern, anchored at the start of a sentence, from regular-expression
    phrases (`i (do not|don't) know`)."""
    parts = [f"(?:{p})" for p in phrases]
    if not parts:
        raise ValueError("at least one abstention phrase is needed, got none")
    return re.compile(r"^\W*(?:sorry,?\s+)?(?:" + "|".join(parts) + r")\b", re.IGNORECASE)


def is_abstention(claim: str, abstention: re.Pattern[str]) -> bool:
    """An explicit abstention, and nothing else: "I don't know, but X", "I don't know who
    approves them, so the CFO does" and "I cannot answer fully; it is $9,000" assert X."""
    found = abstention.search(claim)
    if found is None:
        return False
    going_on = _GOES_ON.search(claim, found.end())
    if going_on is None:
        return True
    rest = claim[going_on.end():].strip(" ,.;:")
    return not rest or bool(abstention.search(rest))
