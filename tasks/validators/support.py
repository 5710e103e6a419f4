"""Does the cited text support a sentence? A score from embedding cosine and lexical overlap,
plus deterministic checks on the specifics a paraphrase must not change.

The evidence is cut into windows: its sentences and lines (a table row reads with its header),
and each pair of neighbouring ones. For a sentence:

- `cosine`: the best cosine between the sentence and any window (packaged MiniLM);
- `coverage`: the share of the sentence's content words (tasks.lexical.tokenize: lower case,
  stopwords out, plurals folded) found anywhere in the evidence;
- the aligned window is the one with the best mean of cosine and its own word coverage;
  `negation` is set when exactly one of sentence and aligned window (with the evidence's
  headings: "## Things We Do Not Reimburse") is negated, `contrast`
  when the sentence uses a word whose opposite (longer/shorter, primary/secondary, safe/unsafe)
  the window uses instead;
- score = 0.5 cosine + 0.5 coverage - 0.2 negation - 0.2 contrast.

A sentence is supported when its score reaches the calibrated threshold and none of its
specifics is missing: every number must appear, with its unit if it has one ("12 weeks" is
not "12 months"), in a window aligned about as well as the best one (so "$75 a day" for
international meals fails against "International travel: up to $95 per day"), and
every name or identifier (capitalised words after the first, `INC-2057`, `PagerLoop`) must
appear in the evidence, and a sentence nearly verbatim to its source (cosine and coverage
past `CONTRADICTION_COSINE` and `CONTRADICTION_COVERAGE`) must not negate it or swap a term
for its opposite. The threshold comes from `calibrate` over a labelled file of supported
and unsupported pairs (tasks.validators.calibration).
"""

from __future__ import annotations

import re
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from tasks.files import HERE
from tasks.lexical import tokenize

# bump when anything below changes a score or a check; 2: a near-verbatim negation fails
SCORER_VERSION = "support-scorer-2"
CALIBRATION_PATH = HERE / "rules" / "support_calibration.yaml"
WEIGHT_COSINE = 0.5
WEIGHT_COVERAGE = 0.5
NEGATION_PENALTY = 0.2
CONTRAST_PENALTY = 0.2
ALIGN_SLACK = 0.05  # a number may sit in any window aligned within this of the best one
# A sentence this close to its source, in meaning and in words, that negates it or swaps a
# term for its opposite says the opposite of the source, whatever its score: "The on-call
# week does not start with a handoff every Monday" scores 0.74 against "The on-call week
# starts with a handoff every Monday" (the penalty alone takes off 0.2).
CONTRADICTION_COSINE = 0.85
CONTRADICTION_COVERAGE = 0.9

# "one" is left out: "no one", "one of" are rarely the number a source states as 1.
_NUMBER_WORDS = {"zero": "0", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
                 "seven": "7", "eight": "8", "nine": "9", "ten": "10", "eleven": "11",
                 "twelve": "12"}
_NEGATIONS = frozenset({"not", "no", "never", "cannot", "without", "none", "nobody", "nothing",
                        "neither", "nor"})
_OPPOSITES = (("primary", "secondary"), ("shorter", "longer"), ("before", "after"),
              ("junior", "senior"), ("minimum", "maximum"), ("increase", "decrease"),
              ("more", "less"), ("more", "fewer"), ("same", "different"), ("same", "second"),
              ("domestic", "international"), ("required", "optional"), ("always", "never"),
              ("enabled", "disabled"), ("first", "last"), ("earlier", "later"),
              ("above", "below"), ("higher", "lower"), ("open", "closed"))
_IDENTIFIER = re.compile(r"[A-Za-z][-_]?\d|[a-z][A-Z]|[A-Za-z][_.][A-Za-z]")
_NUMBER = re.compile(r"\d+(?:[.,:/-]\d+)*")
_MARKUP = re.compile(r"[*`]+|^>\s*")
_SENTENCE_END = re.compile(r"(?<=[.!?;])\s+")
_NO_UNIT = "-"
_PHONE_LIKE = re.compile(r"(?!\d{4}-\d{2}-\d{2}$)\d{1,4}(?:-\d{2,4}){2,}")


class CalibrationError(ValueError):
    """The support calibration file is missing, malformed, or was made by another scorer."""


@dataclass(frozen=True)
class SupportAssessment:
    """How well one piece of evidence supports one sentence, and which specifics it lacks."""

    score: float
    cosine: float
    coverage: float
    negation: bool
    contrast: bool
    missing_numbers: tuple[str, ...]
    missing_names: tuple[str, ...]
    aligned: str  # the evidence window the sentence lines up with best

    @property
    def contradicts(self) -> bool:
        """A near-verbatim sentence that negates its source or swaps a term for its opposite."""
        return ((self.negation or self.contrast) and self.cosine >= CONTRADICTION_COSINE
                and self.coverage >= CONTRADICTION_COVERAGE)

    @property
    def gated(self) -> bool:
        """Unsupported whatever the score: a number or name the source lacks, or the
        opposite of what it says."""
        return bool(self.missing_numbers or self.missing_names) or self.contradicts

    def supported(self, threshold: float) -> bool:
        return self.score >= threshold and not self.gated


@dataclass(frozen=True)
class SupportCalibration:
    """The threshold `calibrate` chose, what it was chosen on, and how well it did there."""

    threshold: float
    data_sha256: str
    embedder: str  # tasks.embedding.embedder_id of the model the scores came from
    pairs: int
    precision: float
    recall: float
    scorer: str = SCORER_VERSION
    cv_precision: float | None = None
    cv_recall: float | None = None
    # The stricter threshold a source must reach to be credited with a claim the model left
    # uncited: the lowest reaching `attribution_target` precision on the same pairs.
    attribution_threshold: float | None = None
    attribution_target: float | None = None
    attribution_precision: float | None = None  # reached on the pairs: below target if none did
    attribution_cv_precision: float | None = None

    @property
    def version(self) -> str:
        attribution = "" if self.attribution_threshold is None else \
            f":a{self.attribution_threshold:.3f}"
        return (f"{self.scorer}:t{self.threshold:.3f}{attribution}:d{self.data_sha256[:8]}:"
                f"{self.embedder}")

    @classmethod
    def load(cls, path: Path = CALIBRATION_PATH) -> SupportCalibration:
        if not path.exists():
            raise CalibrationError(f"no support calibration at {str(path)!r}: "
                                   "run `sluice validators calibrate`")
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        try:
            calibration = cls(**data)
        except TypeError as exc:
            raise CalibrationError(f"malformed support calibration {str(path)!r}: {exc}") from exc
        if calibration.scorer != SCORER_VERSION:
            raise CalibrationError(f"support calibration {str(path)!r} was made for scorer "
                                   f"{calibration.scorer!r}, this code is {SCORER_VERSION!r}: "
                                   "run `sluice validators calibrate`")
        return calibration

    def save(self, path: Path = CALIBRATION_PATH) -> None:
        header = ("# Written by `sluice validators calibrate`; do not edit by hand. The threshold\n"
                  "# and the labelled file's hash are part of the validators' version.\n")
        body = yaml.safe_dump({k: v for k, v in self.__dict__.items()}, sort_keys=False)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(header + body, encoding="utf-8")
        tmp.replace(path)


class SupportScorer:
    """Scores (sentence, evidence) pairs in batches; the embedder loads in `warm_up()`.

    The same chunks come back request after request, and a shard's second pass (weak
    evidence) reads the evidence of its first: text vectors, and each evidence's windows with
    their vectors stacked and their words indexed, are kept in bounded LRU caches.
    """

    def __init__(self, embedder: Any, cache_size: int = 20_000, evidence_cache_size: int = 2_048,
                 ) -> None:
        self.embedder = embedder
        self.cache_size = cache_size
        self.evidence_cache_size = evidence_cache_size
        self._vectors: OrderedDict[str, np.ndarray] = OrderedDict()
        self._evidence: OrderedDict[str, _Evidence] = OrderedDict()

    def warm_up(self) -> None:
        self.embedder.warm_up()

    def assess_many(self, requests: Sequence[tuple[str, str]]) -> list[SupportAssessment]:
        """One assessment per (sentence, evidence text); every text is embedded once."""
        profiles, vectors = self._prepare(requests)
        return [_assess(sentence, profiles[evidence], vectors[sentence])
                for sentence, evidence in requests]

    def scores_many(self, requests: Sequence[tuple[str, str]]) -> list[float]:
        """The score alone of each (sentence, evidence text), as `assess_many` has it, without
        looking for missing specifics (a third of an assessment's work against long evidence)."""
        profiles, vectors = self._prepare(requests)
        return [_score(sentence, profiles[evidence], vectors[sentence])
                for sentence, evidence in requests]

    def _prepare(self, requests: Sequence[tuple[str, str]],
                 ) -> tuple[dict[str, _Evidence], dict[str, np.ndarray]]:
        known = {e: self._evidence[e] for _, e in requests if e in self._evidence}
        new = {e: evidence_windows(e) for _, e in requests if e not in known}
        vectors = self._encode([s for s, _ in requests] + [w for ws in new.values() for w in ws])
        profiles = known | {e: _Evidence.of(e, ws, vectors) for e, ws in new.items()}
        _remember(self._evidence, profiles, self.evidence_cache_size)
        return profiles, vectors

    def _encode(self, texts: list[str]) -> dict[str, np.ndarray]:
        wanted = list(dict.fromkeys(texts))
        missing = [t for t in wanted if t not in self._vectors]
        found = dict(zip(missing, self.embedder.encode(missing), strict=True)) if missing else {}
        found |= {t: self._vectors[t] for t in wanted if t not in found}
        _remember(self._vectors, found, self.cache_size)
        return found


def _remember(cache: OrderedDict[str, Any], used: dict[str, Any], size: int) -> None:
    """Put what a batch used at the recent end of an LRU cache, then trim it to `size` (never
    below the batch itself)."""
    for key, value in used.items():
        cache[key] = value
        cache.move_to_end(key)
    while len(cache) > max(size, len(used)):
        cache.popitem(last=False)


@dataclass(frozen=True)
class _Evidence:
    """What scoring reads of one evidence text, whatever the sentence: its windows, their
    vectors as one matrix, which windows hold each content word, and the whole text's words
    and headings."""

    windows: tuple[str, ...]
    matrix: np.ndarray | None  # one row per window
    holders: dict[str, np.ndarray]  # content word -> 1.0 for each window that has it
    terms: frozenset[str]
    words: frozenset[str]
    headings: str

    @classmethod
    def of(cls, text: str, windows: Sequence[str], vectors: dict[str, np.ndarray]) -> _Evidence:
        holders: dict[str, np.ndarray] = {}
        for i, window in enumerate(windows):
            for term in _token_set(window):
                holders.setdefault(term, np.zeros(len(windows)))[i] = 1.0
        return cls(tuple(windows),
                   np.stack([vectors[w] for w in windows]) if windows else None, holders,
                   _token_set(text), words(text), _headings(text))

    def window_coverage(self, terms: Sequence[str]) -> np.ndarray:
        """Per window, the share of `terms` it holds (`_coverage` of each window)."""
        hits = np.zeros(len(self.windows))
        for term in terms:
            held = self.holders.get(term)
            if held is not None:
                hits += held
        return hits / len(terms) if terms else hits


@dataclass(frozen=True)
class _Scored:
    """A sentence's score against one evidence, and the alignment it came from."""

    score: float
    cosine: float
    coverage: float
    negation: bool
    contrast: bool
    alignment: np.ndarray  # per window
    best: int  # the aligned window


def _scored(sentence: str, evidence: _Evidence, vector: np.ndarray) -> _Scored:
    """The score parts; the evidence has windows (a matrix)."""
    windows = evidence.windows
    assert evidence.matrix is not None
    cosines = evidence.matrix @ vector
    terms = _terms(sentence)
    alignment = 0.5 * cosines + 0.5 * evidence.window_coverage(terms)
    best = int(np.argmax(alignment))
    coverage = _coverage(terms, evidence.terms)
    context = f"{windows[best]} {evidence.headings}"  # "## Things We Do Not Reimburse"
    negation, contrast = _negation(sentence, context), _contrast(sentence, windows[best])
    top = float(cosines.max())
    score = (WEIGHT_COSINE * top + WEIGHT_COVERAGE * coverage
             - NEGATION_PENALTY * negation - CONTRAST_PENALTY * contrast)
    return _Scored(round(score, 4), round(top, 4), round(coverage, 4), negation, contrast,
                   alignment, best)


def _score(sentence: str, evidence: _Evidence, vector: np.ndarray) -> float:
    """The score alone: 0 against evidence with no windows, as `_assess` has it."""
    return 0.0 if evidence.matrix is None else _scored(sentence, evidence, vector).score


def _assess(sentence: str, evidence: _Evidence, vector: np.ndarray) -> SupportAssessment:
    windows = evidence.windows
    if evidence.matrix is None:
        return SupportAssessment(0.0, 0.0, 0.0, False, False, tuple(sorted(numbers(sentence))),
                                 tuple(names(sentence)), "")
    scored = _scored(sentence, evidence, vector)
    alignment = scored.alignment
    near = [windows[i] for i in np.flatnonzero(alignment >= alignment[scored.best] - ALIGN_SLACK)]
    return SupportAssessment(
        score=scored.score, cosine=scored.cosine, coverage=scored.coverage,
        negation=scored.negation, contrast=scored.contrast,
        missing_numbers=_missing_numbers(sentence, near),
        missing_names=tuple(n for n in _names(sentence) if not words(n) <= evidence.words),
        aligned=windows[scored.best])


def _missing_numbers(sentence: str, windows: list[str]) -> tuple[str, ...]:
    """Numbers of the sentence that no window has, or has only with another unit: "12 weeks"
    is missing from "within 12 months" (the unit may come up to three words later there)."""
    available: dict[str, list[tuple[str, ...]]] = {}
    for window in windows:
        for value, following, _ in _numbers_in_context(window):
            available.setdefault(value, []).append(following)
    missing = []
    for value, following, written in _numbers_in_context(sentence):
        unit = following[0] if following and following[0] != _NO_UNIT else None
        if not any(unit is None or unit in seen or not seen or seen[0] == _NO_UNIT
                   for seen in available.get(value, [])):
            missing.append(written)
    return tuple(dict.fromkeys(missing))


def _coverage(terms: Sequence[str], available: frozenset[str]) -> float:
    return sum(t in available for t in terms) / len(terms) if terms else 0.0


@lru_cache(maxsize=16384)
def _token_set(text: str) -> frozenset[str]:
    return frozenset(tokenize(text))


# A shard's claims are read twice (support, then weak evidence), and drafts repeat.
@lru_cache(maxsize=16384)
def _terms(sentence: str) -> tuple[str, ...]:
    return tuple(tokenize(sentence))


def evidence_windows(evidence: str) -> list[str]:
    """Sentences and lines of the evidence, table rows with their header, and neighbour pairs."""
    return list(_evidence_windows(evidence))


# The texts below are parsed once per process: the same chunks come back request after
# request, and every claim of a shard is checked against its sources.
@lru_cache(maxsize=4096)
def _evidence_windows(evidence: str) -> tuple[str, ...]:
    units: list[str] = []
    header: list[str] | None = None
    for line in evidence.splitlines():
        stripped = line.strip()
        if stripped.startswith("|"):
            cells = [_plain(c) for c in stripped.strip("|").split("|")]
            if all(re.fullmatch(r":?-{2,}:?|", c) for c in cells):
                continue
            if header is None:
                header = cells
                continue
            units.append(_table_row(header, cells))
            continue
        header = None
        if re.match(r"^#{1,6}\s", stripped) or not re.search(r"[^\W_]", stripped):
            continue
        text = _plain(re.sub(r"^(?:[-*+]|\d{1,2}[.)])\s+", "", stripped))
        units.extend(s for s in _SENTENCE_END.split(text) if re.search(r"[^\W_]", s))
    return (*units, *(f"{a} {b}" for a, b in zip(units, units[1:], strict=False)))


def _table_row(header: list[str], cells: list[str]) -> str:
    """`| SEV1 | 10 minutes |` under `| Severity | Acknowledge within |` ->
    'SEV1: Acknowledge within 10 minutes'."""
    pairs = [f"{h} {c}".strip() for h, c in zip(header[1:], cells[1:], strict=False) if c and c != "—"]
    return f"{cells[0]}: {'; '.join(pairs)}" if pairs else cells[0]


def _plain(text: str) -> str:
    return " ".join(_MARKUP.sub("", text).split())


@lru_cache(maxsize=16384)
def words(text: str) -> frozenset[str]:
    return frozenset(re.findall(r"[a-z0-9]+", text.lower().replace("n't", " not")))


def _pieces(text: str) -> list[str]:
    return [re.sub(r"['’]s$", "", w.strip(".,;:()[]'\"!?*`")) for w in text.split()]


def numbers(text: str) -> set[str]:
    """Numbers as written (leading zeros and thousands commas dropped; 'two'..'twelve' as
    digits). Digits inside identifiers (INC-2057, SEV1, p95) are names, not numbers."""
    return {value for value, _, _ in _numbers_in_context(text)}


@lru_cache(maxsize=16384)
def _numbers_in_context(text: str) -> tuple[tuple[str, tuple[str, ...], str], ...]:
    """Each number, the (stemmed) words right after it (its unit, if the first is a word), and
    how the text wrote them ("12 weeks").

    "12 weeks" -> ("12", ("week", ...)); "6-week" -> ("6", ("week", ...)); a number followed by
    a stopword, another number or nothing has no unit (`_NO_UNIT` first).
    """
    pieces = _pieces(text)
    found: list[tuple[str, tuple[str, ...], str]] = []
    for i, piece in enumerate(pieces):
        if _IDENTIFIER.search(piece):
            continue
        head, _, suffix = piece.lower().partition("-")
        values = [_number(m) for m in _NUMBER.findall(piece)]
        # a phone number "1-555-0177" holds the groups of "+1 555 0177" (a date holds nothing)
        values += [_number(g) for m in _NUMBER.findall(piece) if _PHONE_LIKE.fullmatch(m)
                   for g in m.split("-")]
        if head in _NUMBER_WORDS:
            values.append(_NUMBER_WORDS[head])
        if not values:
            continue
        after = ([suffix] if suffix.isalpha() else []) + pieces[i + 1:i + 4]
        following = tuple(_unit(w) for w in after[:3])
        written = piece if suffix or not following or following[0] == _NO_UNIT else (
            f"{piece} {pieces[i + 1]}")
        found.extend((value, following, written) for value in values)
    return tuple(found)


def _number(text: str) -> str:
    return text.replace(",", "").lstrip("0") or "0"


def _unit(word: str) -> str:
    stemmed = tokenize(word) if word.isalpha() and word.lower() != "per" else []
    return stemmed[0] if stemmed else _NO_UNIT


@lru_cache(maxsize=4096)
def _headings(evidence: str) -> str:
    return " ".join(line.lstrip("# ") for line in evidence.splitlines() if re.match(r"^#{1,6}\s", line))


def names(text: str) -> list[str]:
    """Identifiers anywhere, and capitalised words that are not the sentence's first word
    (nor stopwords): what a paraphrase must not invent."""
    return list(_names(text))


@lru_cache(maxsize=16384)
def _names(text: str) -> tuple[str, ...]:
    found: list[str] = []
    for i, piece in enumerate(_pieces(text)):
        if len(piece) < 2 or not re.search(r"[A-Za-z]", piece):
            continue
        identifier = bool(_IDENTIFIER.search(piece))
        if identifier or (i > 0 and piece[0].isupper() and tokenize(piece)):
            found.append(piece)
    return tuple(dict.fromkeys(found))


def _negation(sentence: str, window: str) -> bool:
    return bool(words(sentence) & _NEGATIONS) != bool(words(window) & _NEGATIONS)


def _contrast(sentence: str, window: str) -> bool:
    said, source = words(sentence), words(window)
    for a, b in _OPPOSITES:
        if (a in said and b in source and a not in source) or (b in said and a in source
                                                               and b not in source):
            return True
    return any(w.startswith("un") and w[2:] in source and w not in source for w in said)
