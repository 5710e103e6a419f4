"""The retrieval stage: top-k chunks for each item, restricted to its tenant and grants.

A chunk is visible to a request only when its tenant is the request's and every one of its
ACL labels is among the request's grants. The filter runs inside both searches (dense and
lexical), so a tenant always gets its own best k. When the index has a lexical part, the
dense and lexical rankings (each FUSION_DEPTH deep) are fused by reciprocal rank fusion:
on the labelled example questions (ops/eval_retrieval.py) that raised recall@4 from 0.964
(either alone) to 1.000.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from schemas.stages import (
    Outcome,
    RetrievalInput,
    RetrievalItem,
    RetrievalOutput,
    RetrievalResult,
    RetrievedChunk,
)
from schemas.status import Status
from tasks.embedding import TextEncoder
from tasks.indexing import ChunkRecord, read_index
from tasks.lexical import LEXICAL_DIRNAME, LexicalIndex, reciprocal_rank_fusion
from tasks.vector_index import AllowedSet, VectorIndex

FUSION_DEPTH = 10  # candidates from each ranking; deeper let middling chunks crowd out firsts
RRF_K = 60


class Retriever:
    """Holds the embedder and one memory-mapped index; `warm_up()` loads both."""

    def __init__(self, embedder: TextEncoder, index_folder: Path, index_id: str) -> None:
        self.embedder = embedder
        self.index_folder = index_folder
        self.index_id = index_id
        self._index: VectorIndex | None = None
        self._lexical: LexicalIndex | None = None
        self._chunks: list[ChunkRecord] = []
        self._allowed: dict[tuple[str, tuple[str, ...]], AllowedSet] = {}
        self._tenants: frozenset[str] = frozenset()  # of the index's chunks, set by warm_up
        self._labels: frozenset[str] = frozenset()

    def warm_up(self) -> None:
        self.embedder.warm_up()
        if self._index is None:
            self._index, self._chunks = read_index(self.index_folder)
            self._tenants = frozenset(c.tenant for c in self._chunks)
            self._labels = frozenset(label for c in self._chunks for label in c.acl)
            if (self.index_folder / LEXICAL_DIRNAME).is_dir():
                self._lexical = LexicalIndex.load(self.index_folder / LEXICAL_DIRNAME)

    @property
    def hybrid(self) -> bool:
        self.warm_up()
        return self._lexical is not None

    def retrieve(self, batch: RetrievalInput) -> RetrievalOutput:
        """One embedding call for the shard, then one ACL-filtered search per item."""
        self.warm_up()
        vectors = self.embedder.encode([item.query for item in batch.items])
        return RetrievalOutput(results=[
            self._search(item, vector, batch.top_k) for item, vector in zip(batch.items, vectors, strict=True)
        ])

    def _search(self, item: RetrievalItem, vector: np.ndarray, top_k: int) -> RetrievalResult:
        allowed = self._allowed_ids(item.tenant, item.grants)
        result = RetrievalResult(request_id=item.request_id, index_id=self.index_id, chunks=[])
        if allowed.size == 0:
            return result.model_copy(update={"outcome": Outcome(
                status=Status.ABSTAINED, error_class="NoEvidence",
                message=f"tenant {item.tenant!r} with grants {item.grants} can read no documents")})
        assert self._index is not None
        # The ACL filter runs inside the search: the best top_k among the readable chunks.
        depth = max(top_k, FUSION_DEPTH) if self._lexical is not None else top_k
        hits = self._index.search(vector.reshape(1, -1), depth, allowed)
        dense = [(int(i), float(s)) for s, i in zip(hits.scores[0], hits.ids[0], strict=True)
                 if i >= 0]
        if self._lexical is None:
            ranked = dense[:top_k]
        else:
            lexical = self._lexical.search(item.query, allowed.positions, depth)
            ranked = reciprocal_rank_fusion([[i for i, _ in dense], [i for i, _ in lexical]],
                                            k=RRF_K)[:top_k]
        return result.model_copy(update={"chunks": [self._retrieved(i, s) for i, s in ranked]})

    def _allowed_ids(self, tenant: str, grants: list[str]) -> AllowedSet:
        """The chunk positions this tenant may read, prepared once per (tenant, grants),
        with the grants reduced to the labels the index holds: the sets kept stay as few
        as the index's tenants and label combinations, whatever labels callers send (an
        unknown tenant's is the one empty set)."""
        assert self._index is not None
        key = (tenant, tuple(sorted(self._labels.intersection(grants)))) \
            if tenant in self._tenants else ("", ())  # reads nothing: no chunk's tenant is ""
        if key not in self._allowed:
            owner, granted = key[0], set(key[1])
            self._allowed[key] = self._index.allowed(np.array(
                [i for i, c in enumerate(self._chunks) if c.tenant == owner and set(c.acl) <= granted],
                dtype=np.int64,
            ))
        return self._allowed[key]

    def _retrieved(self, vector_id: int, score: float) -> RetrievedChunk:
        chunk = self._chunks[vector_id]
        return RetrievedChunk(chunk_id=chunk.chunk_id, document_id=chunk.document_id,
                              title=chunk.title, text=chunk.text, score=score)
