"""Lexical (BM25) ranking of chunk texts, and reciprocal rank fusion with the dense ranking.

Plain functions and one index class; no Celery, no store. The index is keyed by the same
vector ids as the FAISS index and lives in a `lexical/` folder beside its files. BM25
scoring is bm25s (a precomputed sparse matrix of per-term document scores); tokenisation
is ours, so that identifiers such as `INC-2057` or `planner.fallback_greedy` are split the
same way at index and query time and the saved index does not depend on bm25s defaults.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TypeVar

import bm25s
import numpy as np
from bm25s.stopwords import STOPWORDS_EN_PLUS

LEXICAL_DIRNAME = "lexical"  # beside index.faiss and chunks.json
TOKENIZER_VERSION = "words-lower-sstem-v1"  # bump when `tokenize` changes: old indexes then refuse to load
DEFAULT_RRF_K = 60

_WORD = re.compile(r"[^\W_]+")  # letters and digits; '-', '_', '.' split identifiers into parts
_STOPWORDS = frozenset(STOPWORDS_EN_PLUS)  # NLTK English: question words too
_IDS_FILE = "vector_ids.npy"
_META_FILE = "lexical.json"

Id = TypeVar("Id", int, str)


class LexicalIndexError(ValueError):
    """A lexical index folder is missing, incomplete, or was built by another tokenizer."""


def tokenize(text: str) -> list[str]:
    """Lower-cased words minus English stopwords (NLTK list), with plurals folded (S-stemmer).

    Single letters are dropped; single digits are kept (`SEV1` -> `sev1`, `3 days` -> `3`).
    """
    tokens = []
    for word in _WORD.findall(text.lower()):
        if word in _STOPWORDS or (len(word) == 1 and not word.isdigit()):
            continue
        tokens.append(_s_stem(word))
    return tokens


def _s_stem(word: str) -> str:
    """Harman's S-stemmer: folds common English plurals and nothing else."""
    if len(word) <= 3 or not word.isalpha():
        return word
    if word.endswith("ies") and not word.endswith(("eies", "aies")):
        return word[:-3] + "y"
    if word.endswith("es") and not word.endswith(("aes", "ees", "oes")):
        return word[:-1]
    if word.endswith("s") and not word.endswith(("us", "ss")):
        return word[:-1]
    return word


class LexicalIndex:
    """BM25 over chunk texts, addressed by vector id. Build with `build`, or `load` a saved one."""

    def __init__(self, bm25: bm25s.BM25, vector_ids: np.ndarray) -> None:
        self._bm25 = bm25
        self.vector_ids = vector_ids
        self._order = np.argsort(vector_ids, kind="stable")
        self._sorted_ids = vector_ids[self._order]

    def __len__(self) -> int:
        return len(self.vector_ids)

    @classmethod
    def build(cls, entries: Sequence[tuple[int, str]], k1: float = 1.5, b: float = 0.75) -> LexicalIndex:
        """Index (vector id, chunk text) pairs; ids must be unique."""
        if not entries:
            raise ValueError("a lexical index needs at least one chunk, got none")
        vector_ids = np.array([vid for vid, _ in entries], dtype=np.int64)
        if len(np.unique(vector_ids)) != len(vector_ids):
            raise ValueError(f"vector ids must be unique, got {len(vector_ids)} ids "
                             f"with {len(vector_ids) - len(np.unique(vector_ids))} repeats")
        bm25 = bm25s.BM25(k1=k1, b=b, method="lucene")
        bm25.index([tokenize(text) for _, text in entries], show_progress=False)
        return cls(bm25, vector_ids)

    def save(self, folder: Path) -> None:
        """Write to `folder` (replaced whole): built in a sibling temp folder, then renamed."""
        tmp = folder.with_name(folder.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        self._bm25.save(str(tmp), show_progress=False)
        np.save(tmp / _IDS_FILE, self.vector_ids, allow_pickle=False)
        (tmp / _META_FILE).write_text(json.dumps({"tokenizer": TOKENIZER_VERSION,
                                                  "chunks": len(self.vector_ids)}), encoding="utf-8")
        if folder.exists():
            shutil.rmtree(folder)
        tmp.rename(folder)

    @classmethod
    def load(cls, folder: Path) -> LexicalIndex:
        meta_path = folder / _META_FILE
        if not meta_path.exists():
            raise LexicalIndexError(f"no lexical index at {str(folder)!r}: {_META_FILE} is missing")
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        if meta.get("tokenizer") != TOKENIZER_VERSION:
            raise LexicalIndexError(f"lexical index at {str(folder)!r} was built with tokenizer "
                                    f"{meta.get('tokenizer')!r}, this code uses {TOKENIZER_VERSION!r}")
        bm25 = bm25s.BM25.load(str(folder), show_progress=False)
        vector_ids = np.load(folder / _IDS_FILE, allow_pickle=False)
        if len(vector_ids) != bm25.scores["num_docs"] or len(vector_ids) != meta.get("chunks"):
            raise LexicalIndexError(f"lexical index at {str(folder)!r} is inconsistent: {len(vector_ids)} "
                                    f"ids for {bm25.scores['num_docs']} scored chunks")
        return cls(bm25, vector_ids)

    def search(self, query: str, allowed_ids: Iterable[int], top_k: int) -> list[tuple[int, float]]:
        """Best `top_k` (vector id, BM25 score) among `allowed_ids` only, best first.

        Only allowed chunks are ever candidates, so a disallowed chunk can never take an
        allowed one's place (no global top-k filtered afterwards). Chunks sharing no term
        with the query are not returned; ties go to the smaller vector id.
        """
        if top_k <= 0:
            raise ValueError(f"top_k must be > 0, got {top_k}")
        rows = self._rows(allowed_ids)
        term_ids = list(dict.fromkeys(self._bm25.get_tokens_ids(tokenize(query))))
        if rows.size == 0 or not term_ids:
            return []
        scores = self._bm25.get_scores_from_ids(term_ids)[rows]
        ids = self.vector_ids[rows]
        matched = scores > 0
        scores, ids = scores[matched], ids[matched]
        order = np.lexsort((ids, -scores))[:top_k]
        return [(int(ids[i]), float(scores[i])) for i in order]

    def _rows(self, allowed_ids: Iterable[int]) -> np.ndarray:
        """Row positions of the allowed ids that are in the index, each once."""
        wanted = np.unique(np.fromiter((int(v) for v in allowed_ids), dtype=np.int64))
        slots = np.searchsorted(self._sorted_ids, wanted)
        found = slots < len(self._sorted_ids)
        found[found] = self._sorted_ids[slots[found]] == wanted[found]
        return self._order[slots[found]]


def reciprocal_rank_fusion(rankings: Sequence[Sequence[Id]], k: int = DEFAULT_RRF_K,
                           ) -> list[tuple[Id, float]]:
    """Fuse rankings (ids best first) by sum of 1 / (k + rank), rank counted from 1.

    Cormack, Clarke and Büttcher (2009). An id repeated within one ranking counts at its
    first place only. Equal scores go to the id with the better best rank, then to the id
    whose best rank is in the earlier ranking (so list the primary ranking first); no two
    ids share both, so the order never depends on dict or set order.
    """
    if k <= 0:
        raise ValueError(f"k must be > 0, got {k}")
    scores: dict[Id, float] = {}
    best: dict[Id, tuple[int, int]] = {}
    for which, ranking in enumerate(rankings):
        for rank, item in enumerate(_first_occurrences(ranking), start=1):
            scores[item] = scores.get(item, 0.0) + 1.0 / (k + rank)
            best[item] = min(best.get(item, (rank, which)), (rank, which))
    ordered = sorted(scores, key=lambda item: (-scores[item], best[item]))
    return [(item, scores[item]) for item in ordered]


def _first_occurrences(ranking: Iterable[Id]) -> list[Id]:
    return list(dict.fromkeys(ranking))

