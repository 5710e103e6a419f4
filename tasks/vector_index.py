"""FAISS vector indexes whose kind is chosen by size, with ACL filtering inside the search.

Plain functions and classes: no Celery, no store. Vectors are L2-normalised float32, so
inner product is cosine similarity; ids are the caller's int64 ids (an `IndexIDMap` wraps
the index, so the file on disk carries them).

Kinds (see `choose_spec`):

* ``flat-ip``: exact `IndexFlatIP`, below `exact_max_vectors` (50_000 by default; a scan of
  50k x 384 floats is ~3 ms per query on one core, measured with ops/bench_retrieval.py).
* ``hnsw-ip``: approximate `IndexHNSWFlat` (inner product) at or above it, with the
  parameters M, efConstruction, efSearch recorded in its `IndexSpec`.

A filtered search returns the best k among the allowed ids only. The filter is applied
inside the search, never by cutting a global top-k afterwards, with one of two strategies
chosen once per allowed set (`VectorIndex.allowed`), by its size and the fraction visible:

* ``exact-scan``: an exact scan of a contiguous copy of the allowed vectors, cached by the
  allowed set (LRU, bounded in bytes). Its cost grows with the set, not the index: a 1%
  tenant of a 1M index (10k rows, ~0.3 ms) costs about one HNSW search, where HNSW with a
  selector at 1% needs efSearch ~1000 (~3 ms) to keep its recall. Used while the copy has
  at most `exact_scan_max_rows` rows and, on HNSW, costs no more than the selector search
  would: `exact_scan_rows_per_ef` rows scanned cost about one unit of efSearch (measured).
* ``selector``: the index's own search restricted by an `IDSelectorBitmap` over the allowed
  rows. HNSW still walks and scores disallowed nodes, so efSearch rises to
  `allowed_candidates / fraction visible` to keep about that many allowed candidates (at
  10% visible: efSearch 80). Should it still find fewer than k, the query falls back to an
  exact scan of the allowed rows.
"""

from __future__ import annotations

import hashlib
import json
import math
import threading
from collections import OrderedDict
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import faiss
import numpy as np

EXACT_MAX_VECTORS = 50_000
INDEX_FILE = "index.faiss"
SPEC_FILE = "index.json"
SUBSET_CACHE_BYTES = 512 * 2**20

IndexKind = Literal["flat-ip", "hnsw-ip"]
FilterStrategy = Literal["exact-scan", "selector"]


class VectorIndexError(ValueError):
    """Bad vectors, ids or parameters, or an index folder that does not match its spec."""


@dataclass(frozen=True)
class IndexSpec:
    """What was built, and how it is searched: everything that can change a result.

    `params()` is what `tasks.indexing.index_id` hashes and what `index.json` records. The
    exact kind keeps the historical params {"kind": "flat-ip", "normalised": True}, since no
    filter parameter changes an exact result.
    """

    kind: IndexKind
    M: int = 32
    efConstruction: int = 128
    efSearch: int = 64
    exact_scan_max_rows: int = 50_000
    exact_scan_rows_per_ef: int = 50
    allowed_candidates: int = 8

    def params(self) -> dict[str, object]:
        if self.kind == "flat-ip":
            return {"kind": "flat-ip", "normalised": True}
        return {"normalised": True, **asdict(self)}

    @classmethod
    def from_params(cls, params: dict[str, object]) -> IndexSpec:
        fields = {k: v for k, v in params.items() if k != "normalised"}
        if fields.get("kind") not in ("flat-ip", "hnsw-ip"):
            raise VectorIndexError(f"unknown index kind in {params}")
        try:
            return cls(**fields)  # type: ignore[arg-type]
        except TypeError as exc:
            raise VectorIndexError(f"bad index params {params}: {exc}") from exc


def choose_spec(count: int, exact_max_vectors: int = EXACT_MAX_VECTORS) -> IndexSpec:
    """Exact below `exact_max_vectors` vectors, HNSW at or above it."""
    if count < 0:
        raise VectorIndexError(f"count must be >= 0, got {count}")
    return IndexSpec(kind="flat-ip" if count < exact_max_vectors else "hnsw-ip")


@dataclass(frozen=True)
class Hits:
    """Per query, the best k: scores descending, ids padded with -1 when fewer exist."""

    scores: np.ndarray  # (nq, k) float32
    ids: np.ndarray  # (nq, k) int64


class AllowedSet:
    """The allowed ids of one caller (a tenant's visible chunks), prepared once for search.

    Made by `VectorIndex.allowed`; holds the allowed rows as sorted positions, the strategy
    chosen for them, and the selector bitmap the `selector` strategy needs.
    """

    def __init__(self, positions: np.ndarray, total: int, strategy: FilterStrategy) -> None:
        self.positions = positions
        self.fraction = len(positions) / total if total else 0.0
        self.strategy: FilterStrategy = strategy
        self.key = hashlib.blake2b(positions.tobytes(), digest_size=16).hexdigest()
        self._bitmap: np.ndarray | None = None
        self._selector: faiss.IDSelectorBitmap | None = None
        if strategy == "selector":
            mask = np.zeros(total, dtype=bool)
            mask[positions] = True
            self._bitmap = np.packbits(mask, bitorder="little")  # kept: faiss holds a pointer
            self._selector = faiss.IDSelectorBitmap(total, faiss.swig_ptr(self._bitmap))

    @property
    def size(self) -> int:
        return len(self.positions)

    @property
    def selector(self) -> faiss.IDSelectorBitmap:
        if self._selector is None:
            raise VectorIndexError(f"allowed set {self.key} uses {self.strategy}, not a selector")
        return self._selector


class _SubsetCache:
    """Contiguous copies of allowed rows, least recently used first out, bounded in bytes."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._items: OrderedDict[str, faiss.IndexFlatIP] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def get(self, key: str) -> faiss.IndexFlatIP | None:
        with self._lock:
            found = self._items.get(key)
            if found is not None:
                self._items.move_to_end(key)
            return found

    def put(self, key: str, flat: faiss.IndexFlatIP) -> None:
        size = flat.ntotal * flat.d * 4
        with self._lock:
            if key in self._items or size > self.max_bytes:
                return
            self._items[key] = flat
            self._bytes += size
            while self._bytes > self.max_bytes:
                _, dropped = self._items.popitem(last=False)
                self._bytes -= dropped.ntotal * dropped.d * 4


class VectorIndex:
    """One built or loaded index: its spec, the FAISS index, and the ids of its rows."""

    def __init__(self, spec: IndexSpec, wrapped: faiss.IndexIDMap,
                 subset_cache_bytes: int = SUBSET_CACHE_BYTES) -> None:
        self.spec = spec
        self._wrapped = wrapped  # owns `_inner`: keep it alive
        self._inner = faiss.downcast_index(wrapped.index)
        self._ids = faiss.vector_to_array(wrapped.id_map).astype(np.int64, copy=False)
        self._identity = bool(np.array_equal(self._ids, np.arange(len(self._ids))))
        self._order = None if self._identity else np.argsort(self._ids, kind="stable")
        self._subsets = _SubsetCache(subset_cache_bytes)
        _check_kind(spec, self._inner)

    @property
    def count(self) -> int:
        return int(self._wrapped.ntotal)

    @property
    def dim(self) -> int:
        return int(self._wrapped.d)

    def vectors(self, ids: np.ndarray) -> np.ndarray:
        """The stored vectors of these ids (to reuse them in the next build)."""
        return np.asarray(self._inner.reconstruct_batch(self._positions(ids)), dtype=np.float32)

    def allowed(self, ids: np.ndarray) -> AllowedSet:
        """Prepare the allowed ids (any order; each must be in the index) for `search`."""
        positions = np.unique(self._positions(np.asarray(ids, dtype=np.int64)))
        return AllowedSet(positions, self.count, self._strategy(positions.size))

    def search(self, queries: np.ndarray, k: int, allowed: AllowedSet | None = None) -> Hits:
        """Best k per query; with `allowed`, the best k among those ids only."""
        queries = self._checked_queries(queries, k)
        if allowed is None:
            scores, rows = self._inner.search(queries, k, params=self._params(self.spec.efSearch))
            return self._hits(scores, rows)
        if allowed.size == 0:
            return _empty_hits(len(queries), k)
        if allowed.strategy == "exact-scan":
            return self._exact_scan(queries, k, allowed)
        return self._selector_search(queries, k, allowed)

    def save(self, folder: Path) -> None:
        """index.faiss (written atomically) and index.json (the spec) in `folder`."""
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / f"{INDEX_FILE}.tmp"
        faiss.write_index(self._wrapped, str(tmp))
        tmp.replace(folder / INDEX_FILE)
        (folder / SPEC_FILE).write_text(json.dumps(self.spec.params(), sort_keys=True), encoding="utf-8")

    @classmethod
    def load(cls, folder: Path, subset_cache_bytes: int = SUBSET_CACHE_BYTES) -> VectorIndex:
        """Memory-map index.faiss (IO_FLAG_MMAP_IFC: the vectors and graph stay file pages,
        shared by every worker process on the machine) and read its spec."""
        wrapped = faiss.read_index(str(folder / INDEX_FILE), faiss.IO_FLAG_MMAP_IFC)
        if not isinstance(wrapped, faiss.IndexIDMap | faiss.IndexIDMap2):
            raise VectorIndexError(f"{folder / INDEX_FILE} holds a {type(wrapped).__name__}, "
                                   "not an IndexIDMap")
        return cls(_read_spec(folder, wrapped), wrapped, subset_cache_bytes)

    # -- strategies ----------------------------------------------------------------------------

    def _strategy(self, rows: int) -> FilterStrategy:
        """Exact scan while its copy is small enough to cache and cheaper than the selector
        search: on HNSW, `exact_scan_rows_per_ef` rows cost about one unit of efSearch; on
        the flat index, which a selector keeps exact, while the copy is under half of it."""
        if rows > self.spec.exact_scan_max_rows:
            return "selector"
        if self.spec.kind == "flat-ip":
            return "exact-scan" if 2 * rows <= self.count else "selector"
        if rows == 0:
            return "exact-scan"
        selector_cost = self.spec.exact_scan_rows_per_ef * self._filtered_ef(rows / self.count)
        return "exact-scan" if rows <= selector_cost else "selector"

    def _filtered_ef(self, fraction: float) -> int:
        """efSearch for a selector search: its candidates hold ~`allowed_candidates` allowed."""
        return max(self.spec.efSearch, math.ceil(self.spec.allowed_candidates / fraction))

    def _exact_scan(self, queries: np.ndarray, k: int, allowed: AllowedSet) -> Hits:
        subset = self._subsets.get(allowed.key)
        if subset is None:
            subset = faiss.IndexFlatIP(self.dim)
            subset.add(self._inner.reconstruct_batch(allowed.positions))
            self._subsets.put(allowed.key, subset)
        scores, local = subset.search(queries, min(k, allowed.size))
        rows = np.where(local >= 0, allowed.positions[np.maximum(local, 0)], -1)
        return _pad(self._hits(scores, rows), k)

    def _selector_search(self, queries: np.ndarray, k: int, allowed: AllowedSet) -> Hits:
        ef = self._filtered_ef(allowed.fraction)
        scores, rows = self._inner.search(queries, k, params=self._params(ef, allowed.selector))
        short = np.nonzero((rows >= 0).sum(axis=1) < min(k, allowed.size))[0]
        if short.size and self.spec.kind == "hnsw-ip":
            storage = faiss.downcast_index(self._inner.storage)
            exact = faiss.SearchParameters(sel=allowed.selector)
            scores[short], rows[short] = storage.search(queries[short], k, params=exact)
        return self._hits(scores, rows)

    # -- helpers -------------------------------------------------------------------------------

    def _params(self, ef: int, selector: faiss.IDSelector | None = None) -> faiss.SearchParameters:
        if self.spec.kind == "hnsw-ip":
            return faiss.SearchParametersHNSW(efSearch=ef, sel=selector)
        return faiss.SearchParameters(sel=selector)

    def _hits(self, scores: np.ndarray, rows: np.ndarray) -> Hits:
        ids = np.where(rows >= 0, self._ids[np.maximum(rows, 0)], -1)
        return Hits(scores=scores, ids=ids)

    def _positions(self, ids: np.ndarray) -> np.ndarray:
        if self._identity:
            positions, known = ids, (ids >= 0) & (ids < self.count)
        else:  # an empty index is the identity, so here count > 0
            assert self._order is not None
            slot = np.minimum(np.searchsorted(self._ids, ids, sorter=self._order), self.count - 1)
            positions = self._order[slot]
            known = self._ids[positions] == ids
        if not known.all():
            raise VectorIndexError(f"allowed ids not in the index: {ids[~known][:10].tolist()}")
        return positions

    def _checked_queries(self, queries: np.ndarray, k: int) -> np.ndarray:
        if k <= 0:
            raise VectorIndexError(f"k must be > 0, got {k}")
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        if queries.ndim != 2 or queries.shape[1] != self.dim:
            raise VectorIndexError(f"queries must be (n, {self.dim}), got {queries.shape}")
        return queries


def build_index(vectors: np.ndarray, ids: np.ndarray, spec: IndexSpec | None = None) -> VectorIndex:
    """Build the index `spec` names (by default the one `choose_spec` picks for the count)."""
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    ids = np.ascontiguousarray(ids, dtype=np.int64)
    _check_build_input(vectors, ids)
    spec = spec or choose_spec(len(vectors))
    wrapped = faiss.IndexIDMap(_empty_inner(spec, vectors.shape[1]))
    wrapped.add_with_ids(vectors, ids)
    return VectorIndex(spec, wrapped)


def _empty_inner(spec: IndexSpec, dim: int) -> faiss.Index:
    if spec.kind == "flat-ip":
        return faiss.IndexFlatIP(dim)
    inner = faiss.IndexHNSWFlat(dim, spec.M, faiss.METRIC_INNER_PRODUCT)
    inner.hnsw.efConstruction = spec.efConstruction
    inner.hnsw.efSearch = spec.efSearch
    return inner


def _check_build_input(vectors: np.ndarray, ids: np.ndarray) -> None:
    if vectors.ndim != 2 or vectors.shape[0] != ids.shape[0] or ids.ndim != 1:
        raise VectorIndexError(f"need (n, d) vectors and n ids, got {vectors.shape} and {ids.shape}")
    if np.unique(ids).size != ids.size:
        raise VectorIndexError(f"ids must be unique, got {ids.size - np.unique(ids).size} duplicates")
    norms = np.linalg.norm(vectors, axis=1)
    if norms.size and not np.allclose(norms, 1.0, atol=1e-3):
        worst = float(norms[np.argmax(np.abs(norms - 1.0))])
        raise VectorIndexError(f"vectors must be L2-normalised, found a norm of {worst:.4f}")


def _check_kind(spec: IndexSpec, inner: faiss.Index) -> None:
    expected = faiss.IndexFlatIP if spec.kind == "flat-ip" else faiss.IndexHNSWFlat
    if not isinstance(inner, expected) or inner.metric_type != faiss.METRIC_INNER_PRODUCT:
        raise VectorIndexError(f"spec says {spec.kind}, the index is a {type(inner).__name__} "
                               f"with metric {inner.metric_type}")


def _read_spec(folder: Path, wrapped: faiss.IndexIDMap) -> IndexSpec:
    path = folder / SPEC_FILE
    if path.exists():
        return IndexSpec.from_params(json.loads(path.read_text(encoding="utf-8")))
    if isinstance(faiss.downcast_index(wrapped.index), faiss.IndexFlatIP):
        return IndexSpec(kind="flat-ip")  # written before index.json existed: always exact
    raise VectorIndexError(f"{path} is missing and the index is not exact")


def _empty_hits(nq: int, k: int) -> Hits:
    return Hits(scores=np.full((nq, k), -np.inf, dtype=np.float32),
                ids=np.full((nq, k), -1, dtype=np.int64))


def _pad(hits: Hits, k: int) -> Hits:
    missing = k - hits.ids.shape[1]
    if missing <= 0:
        return hits
    empty = _empty_hits(hits.ids.shape[0], missing)
    return Hits(scores=np.hstack([hits.scores, empty.scores]), ids=np.hstack([hits.ids, empty.ids]))
