"""The router's classifier: MiniLM sentence embeddings plus a small trained head.

The head is a multinomial logistic regression over the embeddings (scikit-learn's lbfgs
solver, which is deterministic for a given input order), trained on the labelled examples
file in the repo minus a held-out split chosen by a hash of each text. Its version is a hash
of the examples file, the parameters, the embedder and the label set, so it can be pinned
at admission without loading any model; the trained head is saved under a cache folder as
`<version>.npz` and read back with numpy alone.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from schemas.status import ANSWER_LABELS_VERSION, AnswerClass
from tasks.embedding import TextEncoder, embedder_id

HEAD_FORMAT = "logreg-lbfgs-1"  # bump when training or the saved layout changes meaning


class RouterClassifierError(ValueError):
    """A bad examples file or parameters, or a head that is missing or does not match."""


class ClassifierParams(BaseModel):
    """Everything besides the data that shapes the head and its decisions."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    c: float = Field(default=20.0, gt=0)
    max_iter: int = Field(default=2000, gt=0)
    holdout_percent: int = Field(default=20, gt=0, lt=100)
    confidence_threshold: float = Field(default=0.45, ge=0, lt=1)


class RouterExample(BaseModel):
    """One line of the examples file: a request text and its answer class."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    text: str = Field(min_length=1)
    label: AnswerClass


@dataclass(frozen=True)
class Evaluation:
    """How the head decides the held-out split. Confusion rows: true class; columns: the
    router's decision, with `clarify` below the confidence threshold."""

    labels: tuple[AnswerClass, ...]
    confusion: tuple[tuple[int, ...], ...]
    accuracy: float  # of the router's decisions, threshold included
    argmax_accuracy: float  # of the head's best class alone
    n_train: int
    n_test: int


@dataclass(frozen=True)
class ClassGuess:
    """The head's best class and its probability; `answer_class` is what the router uses."""

    best: AnswerClass
    confidence: float
    answer_class: AnswerClass


@dataclass(frozen=True)
class RouterHead:
    """The trained weights, their version and parameters, and their held-out evaluation."""

    version: str
    labels: tuple[AnswerClass, ...]
    weights: np.ndarray  # (classes, embedding dim)
    bias: np.ndarray  # (classes,)
    params: ClassifierParams
    evaluation: Evaluation | None  # None only while training

    def probabilities(self, vectors: np.ndarray) -> np.ndarray:
        logits = vectors.astype(np.float64) @ self.weights.T + self.bias
        logits -= logits.max(axis=1, keepdims=True)
        exp = np.exp(logits)
        return np.asarray(exp / exp.sum(axis=1, keepdims=True))

    def guesses(self, vectors: np.ndarray) -> list[ClassGuess]:
        """The best class per row, or `clarify` when its probability is under the threshold."""
        probs = self.probabilities(vectors)
        return [self._guess(row) for row in probs]

    def _guess(self, row: np.ndarray) -> ClassGuess:
        best, confidence = self.labels[int(row.argmax())], float(row.max())
        low = confidence < self.params.confidence_threshold
        return ClassGuess(best, confidence, AnswerClass.CLARIFY if low else best)


class RouterClassifier:
    """What the router asks: a head and the embedder it was trained with.

    The embedder loads in `warm_up()` (or on first use), never here.
    """

    def __init__(self, head: RouterHead, embedder: TextEncoder) -> None:
        self.head = head
        self.embedder = embedder

    @property
    def version(self) -> str:
        return self.head.version

    def warm_up(self) -> None:
        self.embedder.warm_up()

    def classify(self, texts: list[str]) -> list[ClassGuess]:
        if not texts:
            return []
        return self.head.guesses(self.embedder.encode(texts))


# -- the examples file and the version ----------------------------------------


def read_examples(path: Path) -> list[RouterExample]:
    """Every example, in file order; a precise error names the first bad line."""
    examples: list[RouterExample] = []
    seen: dict[str, tuple[int, AnswerClass]] = {}
    for line_no, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not raw.strip():
            continue
        example = _parse_example(path, line_no, raw)
        key = " ".join(example.text.lower().split())
        if key in seen and seen[key][1] != example.label:
            raise RouterClassifierError(
                f"{path}:{line_no}: {example.text!r} is labelled {example.label.value}, "
                f"but line {seen[key][0]} labels it {seen[key][1].value}")
        seen.setdefault(key, (line_no, example.label))
        examples.append(example)
    if not examples:
        raise RouterClassifierError(f"{path} holds no examples")
    return examples


def _parse_example(path: Path, line_no: int, raw: str) -> RouterExample:
    try:
        return RouterExample.model_validate_json(raw)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'line'}: {e['msg']}"
                             for e in exc.errors())
        raise RouterClassifierError(f"{path}:{line_no}: {problems}") from None


def is_held_out(text: str, holdout_percent: int) -> bool:
    """The split is a function of the text alone: stable, and duplicates fall together."""
    bucket = int(hashlib.sha256(text.encode("utf-8")).hexdigest()[:8], 16) % 100
    return bucket < holdout_percent


def classifier_version(examples_path: Path, params: ClassifierParams, embedder_path: str) -> str:
    """The head's name, from file bytes and parameters only: no model is loaded."""
    digest = hashlib.sha256()
    for part in (HEAD_FORMAT, ANSWER_LABELS_VERSION, embedder_id(embedder_path),
                 params.model_dump_json()):
        digest.update(part.encode("utf-8") + b"\0")
    digest.update(examples_path.read_bytes())
    return f"router-head-{digest.hexdigest()[:16]}"


def head_path(cache_dir: Path, version: str) -> Path:
    return cache_dir / f"{version}.npz"


# -- training ---------------------------------------------------------------


def train_router(examples_path: Path, params: ClassifierParams, cache_dir: Path,
                 embedder: TextEncoder) -> RouterHead:
    """Train the head on the examples outside the held-out split, evaluate it on the split,
    and save it as `<cache_dir>/<version>.npz`. The same inputs give the same weights."""
    version = classifier_version(examples_path, params, embedder.model_path)
    examples = read_examples(examples_path)
    vectors = _example_vectors(examples_path, examples, embedder, cache_dir)
    held_out = np.array([is_held_out(e.text, params.holdout_percent) for e in examples])
    labels = tuple(AnswerClass)
    targets = np.array([labels.index(e.label) for e in examples])
    _check_split(targets, held_out, labels, examples_path)
    weights, bias = _fit(vectors[~held_out], targets[~held_out], len(labels), params)
    untested = RouterHead(version, labels, weights, bias, params, evaluation=None)
    head = replace(untested, evaluation=evaluate(untested, vectors[held_out], targets[held_out],
                                                 n_train=int((~held_out).sum())))
    _save(head, head_path(cache_dir, version))
    return head


def ensure_router_head(examples_path: Path, params: ClassifierParams, cache_dir: Path,
                       embedder: TextEncoder) -> RouterHead:
    """The saved head for these inputs, trained first if it is not in the cache yet."""
    version = classifier_version(examples_path, params, embedder.model_path)
    if head_path(cache_dir, version).exists():
        return load_router_head(cache_dir, version)
    return train_router(examples_path, params, cache_dir, embedder)


def _check_split(targets: np.ndarray, held_out: np.ndarray, labels: tuple[AnswerClass, ...],
                 path: Path) -> None:
    present = set(targets[~held_out].tolist())
    missing = [labels[i].value for i in range(len(labels)) if i not in present]
    if missing:
        raise RouterClassifierError(f"{path}: the training split has no examples of {missing}")
    if not held_out.any():
        raise RouterClassifierError(f"{path}: the held-out split is empty; add examples")


def _fit(vectors: np.ndarray, targets: np.ndarray, n_labels: int,
         params: ClassifierParams) -> tuple[np.ndarray, np.ndarray]:
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression

    model = LogisticRegression(C=params.c, max_iter=params.max_iter, solver="lbfgs")
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConvergenceWarning)
        try:
            model.fit(vectors.astype(np.float64), targets)
        except ConvergenceWarning:
            raise RouterClassifierError(
                f"the head did not converge in max_iter={params.max_iter} iterations") from None
    weights = np.zeros((n_labels, vectors.shape[1]))
    bias = np.zeros(n_labels)
    weights[model.classes_], bias[model.classes_] = model.coef_, model.intercept_
    return weights, bias


def evaluate(head: RouterHead, vectors: np.ndarray, targets: np.ndarray,
             n_train: int) -> Evaluation:
    """Accuracy and confusion of the head's decisions on labelled vectors (label indexes)."""
    labels = head.labels
    decided = [labels.index(g.answer_class) for g in head.guesses(vectors)]
    best = head.probabilities(vectors).argmax(axis=1)
    confusion = np.zeros((len(labels), len(labels)), dtype=int)
    for truth, decision in zip(targets.tolist(), decided, strict=True):
        confusion[truth, decision] += 1
    return Evaluation(
        labels=labels, confusion=tuple(tuple(int(n) for n in row) for row in confusion),
        accuracy=float(np.trace(confusion) / len(targets)),
        argmax_accuracy=float((best == targets).mean()), n_train=n_train, n_test=len(targets))


def _example_vectors(examples_path: Path, examples: list[RouterExample], embedder: TextEncoder,
                     cache_dir: Path) -> np.ndarray:
    """Embeddings of the examples, cached by (file bytes, embedder): retraining with other
    parameters does not embed again."""
    digest = hashlib.sha256(examples_path.read_bytes())
    digest.update(embedder_id(embedder.model_path).encode("utf-8"))
    path = cache_dir / f"embeddings-{digest.hexdigest()[:16]}.npy"
    if path.exists():
        vectors = np.load(path, allow_pickle=False)
        if vectors.shape[0] == len(examples):
            return np.asarray(vectors)
    vectors = embedder.encode([e.text for e in examples])
    _write_atomically(path, lambda handle: np.save(handle, vectors, allow_pickle=False))
    return vectors


# -- saving and loading -------------------------------------------------------


def load_router_head(cache_dir: Path, version: str) -> RouterHead:
    """The saved head of this version; raises when it is missing or does not match."""
    path = head_path(cache_dir, version)
    if not path.exists():
        raise RouterClassifierError(
            f"no trained router head {version} in {cache_dir}: run `sluice router train`")
    with np.load(path, allow_pickle=False) as data:
        meta: dict[str, Any] = json.loads(str(data["meta"]))
        weights, bias = np.array(data["weights"]), np.array(data["bias"])
    if meta.get("version") != version or meta.get("labels_version") != ANSWER_LABELS_VERSION:
        raise RouterClassifierError(
            f"{path} holds head {meta.get('version')!r} for labels {meta.get('labels_version')!r}, "
            f"expected {version!r} for {ANSWER_LABELS_VERSION!r}")
    labels = tuple(AnswerClass(v) for v in meta["labels"])
    evaluation = meta["evaluation"]
    return RouterHead(version, labels, weights, bias, ClassifierParams(**meta["params"]),
                      Evaluation(labels=labels,
                                 confusion=tuple(tuple(r) for r in evaluation["confusion"]),
                                 accuracy=evaluation["accuracy"],
                                 argmax_accuracy=evaluation["argmax_accuracy"],
                                 n_train=evaluation["n_train"], n_test=evaluation["n_test"]))


def _save(head: RouterHead, path: Path) -> None:
    evaluation = head.evaluation
    assert evaluation is not None, "a head is saved only after its evaluation"
    meta = {"version": head.version, "format": HEAD_FORMAT, "labels_version": ANSWER_LABELS_VERSION,
            "labels": [label.value for label in head.labels], "params": head.params.model_dump(),
            "evaluation": {"confusion": [list(r) for r in evaluation.confusion],
                           "accuracy": evaluation.accuracy,
                           "argmax_accuracy": evaluation.argmax_accuracy,
                           "n_train": evaluation.n_train, "n_test": evaluation.n_test}}
    _write_atomically(path, lambda handle: np.savez(
        handle, weights=head.weights, bias=head.bias, meta=np.array(json.dumps(meta))))


def _write_atomically(path: Path, write: Callable[[BinaryIO], None]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with tmp.open("wb") as handle:
        write(handle)
    tmp.replace(path)
