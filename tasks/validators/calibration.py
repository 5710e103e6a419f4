"""Calibrating the support threshold on a labelled file of sentence/evidence pairs.

The file (JSON lines: `sentence`, `evidence`, `label` supported|unsupported, `kind`, `source`)
lives in the repository; its sha256 goes into the calibration and so into the validators'
version. The positive class is *supported*: precision is the share of accepted sentences that
really are supported (what lets an unsupported claim through lowers it), recall the share of
supported sentences accepted. The threshold maximises F1 over the file (ties: the higher
threshold), or, given a target precision, is the lowest one that reaches it. Cross-validated
figures (the threshold chosen on k-1 folds, scored on the held-out fold, averaged over
shuffles) say how far the in-sample figures flatter it.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tasks.embedding import embedder_id
from tasks.validators.support import SupportAssessment, SupportCalibration, SupportScorer

_REPO = Path(__file__).resolve().parents[2]
PAIRS_PATH = _REPO / "ops" / "examples" / "support_pairs.jsonl"
HOLDOUT_PATH = _REPO / "ops" / "examples" / "support_pairs_holdout.jsonl"  # never tuned on
LABELS = ("supported", "unsupported")
# A citation the validator adds on its own needs more than one the model made: the threshold
# at which this share of the accepted pairs is really supported.
ATTRIBUTION_PRECISION = 0.92


class PairsError(ValueError):
    """A line of the labelled pairs file is malformed."""


@dataclass(frozen=True)
class LabelledPair:
    id: str
    sentence: str
    evidence: str
    supported: bool
    kind: str
    source: str


@dataclass(frozen=True)
class Scores:
    """What the threshold acts on: per pair, its score, whether a specific is missing, its label."""

    score: np.ndarray
    gated: np.ndarray
    supported: np.ndarray

    def accepted(self, threshold: float) -> np.ndarray:
        return (self.score >= threshold) & ~self.gated


@dataclass(frozen=True)
class Confusion:
    tp: int
    fp: int
    fn: int
    tn: int

    @classmethod
    def of(cls, accepted: np.ndarray, supported: np.ndarray) -> Confusion:
        return cls(int((accepted & supported).sum()), int((accepted & ~supported).sum()),
                   int((~accepted & supported).sum()), int((~accepted & ~supported).sum()))

    @property
    def precision(self) -> float:
        return self.tp / (self.tp + self.fp) if self.tp + self.fp else 0.0

    @property
    def recall(self) -> float:
        return self.tp / (self.tp + self.fn) if self.tp + self.fn else 0.0

    @property
    def f1(self) -> float:
        return 2 * self.tp / (2 * self.tp + self.fp + self.fn) if self.tp else 0.0


@dataclass(frozen=True)
class Evaluation:
    """How a threshold judges a set of pairs."""

    confusion: Confusion
    by_kind: dict[str, tuple[int, int]]  # kind -> (judged right, pairs)
    mistakes: list[tuple[LabelledPair, SupportAssessment]]


@dataclass(frozen=True)
class CalibrationReport:
    """The chosen calibration, how it judges its own file, and held-out folds of it."""

    calibration: SupportCalibration
    in_sample: Evaluation
    cross_validated: Confusion


def load_pairs(path: Path = PAIRS_PATH) -> list[LabelledPair]:
    pairs = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            if row["label"] not in LABELS:
                raise ValueError(f"label must be one of {LABELS}, got {row['label']!r}")
            pairs.append(LabelledPair(str(row.get("id", number)), row["sentence"], row["evidence"],
                                      row["label"] == "supported", row.get("kind", "-"),
                                      row.get("source", "-")))
        except (KeyError, ValueError, TypeError) as exc:
            raise PairsError(f"{path}:{number}: {exc}") from exc
    if not pairs:
        raise PairsError(f"{path} holds no pairs")
    return pairs


def data_sha256(path: Path = PAIRS_PATH) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def score_pairs(pairs: Sequence[LabelledPair], scorer: SupportScorer,
                ) -> tuple[Scores, list[SupportAssessment]]:
    assessments = scorer.assess_many([(p.sentence, p.evidence) for p in pairs])
    return Scores(score=np.array([a.score for a in assessments]),
                  gated=np.array([a.gated for a in assessments]),
                  supported=np.array([p.supported for p in pairs])), assessments


def choose_threshold(scores: Scores, target_precision: float | None = None) -> float:
    """Midpoints between neighbouring scores are the candidates, so a threshold never sits
    exactly on a labelled pair."""
    distinct = np.unique(scores.score)
    candidates = np.concatenate([[distinct[0] - 1e-3], (distinct[1:] + distinct[:-1]) / 2,
                                 [distinct[-1] + 1e-3]])
    judged = [(float(t), Confusion.of(scores.accepted(t), scores.supported)) for t in candidates]
    if target_precision is not None:
        reaching = [t for t, c in judged if c.tp and c.precision >= target_precision]
        if reaching:
            return round(min(reaching), 4)
    best_f1 = max(c.f1 for _, c in judged)
    return round(max(t for t, c in judged if c.f1 >= best_f1 - 1e-12), 4)


def cross_validate(scores: Scores, target_precision: float | None = None, folds: int = 5,
                   repeats: int = 10) -> Confusion:
    """Held-out confusion summed over `repeats` shuffles of `folds` folds (seeded: repeatable)."""
    if folds < 2 or len(scores.score) < folds:
        raise ValueError(f"folds must be in [2, {len(scores.score)}], got {folds}")
    totals = np.zeros(4, dtype=int)
    for seed in range(repeats):
        order = np.random.default_rng(seed).permutation(len(scores.score))
        accepted = np.zeros(len(order), dtype=bool)
        for held in np.array_split(order, folds):
            train = np.setdiff1d(order, held)
            threshold = choose_threshold(_subset(scores, train), target_precision)
            accepted[held] = _subset(scores, held).accepted(threshold)
        c = Confusion.of(accepted, scores.supported)
        totals += (c.tp, c.fp, c.fn, c.tn)
    return Confusion(*(int(v) for v in totals))


def _subset(scores: Scores, rows: np.ndarray) -> Scores:
    return Scores(scores.score[rows], scores.gated[rows], scores.supported[rows])


def evaluate(pairs: Sequence[LabelledPair], scorer: SupportScorer, threshold: float) -> Evaluation:
    """Judge labelled pairs at a given threshold (a held-out file, or the calibration file)."""
    scores, assessments = score_pairs(pairs, scorer)
    return _judged(pairs, scores, assessments, threshold)


def _judged(pairs: Sequence[LabelledPair], scores: Scores, assessments: list[SupportAssessment],
            threshold: float) -> Evaluation:
    accepted = scores.accepted(threshold)
    right = accepted == scores.supported
    by_kind: dict[str, tuple[int, int]] = {}
    for pair, ok in zip(pairs, right, strict=True):
        done, total = by_kind.get(pair.kind, (0, 0))
        by_kind[pair.kind] = (done + int(ok), total + 1)
    mistakes = [(p, a) for p, a, ok in zip(pairs, assessments, right, strict=True) if not ok]
    return Evaluation(Confusion.of(accepted, scores.supported), dict(sorted(by_kind.items())), mistakes)


def calibrate(pairs: Sequence[LabelledPair], scorer: SupportScorer, data_sha: str,
              target_precision: float | None = None,
              attribution_precision: float = ATTRIBUTION_PRECISION) -> CalibrationReport:
    """Score every pair, choose the threshold, and measure it in sample and cross-validated;
    then the attribution threshold: the lowest reaching `attribution_precision` (the best F1's
    where none does: the precision it reached is recorded), and never below the support
    threshold."""
    scores, assessments = score_pairs(pairs, scorer)
    threshold = choose_threshold(scores, target_precision)
    judged = _judged(pairs, scores, assessments, threshold)
    held_out = cross_validate(scores, target_precision)
    attribution = max(threshold, choose_threshold(scores, attribution_precision))
    attributed = _judged(pairs, scores, assessments, attribution)
    attribution_held_out = cross_validate(scores, attribution_precision)
    calibration = SupportCalibration(
        threshold=threshold, data_sha256=data_sha, embedder=embedder_id(scorer.embedder.model_path),
        pairs=len(pairs), precision=round(judged.confusion.precision, 4),
        recall=round(judged.confusion.recall, 4), cv_precision=round(held_out.precision, 4),
        cv_recall=round(held_out.recall, 4), attribution_threshold=attribution,
        attribution_target=attribution_precision,
        attribution_precision=round(attributed.confusion.precision, 4),
        attribution_cv_precision=round(attribution_held_out.precision, 4))
    return CalibrationReport(calibration, judged, held_out)
