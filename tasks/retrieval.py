"""The retrieval stage: top-k chunks for each item, restricted to its tenant and grants."""

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
from tasks.embedding import Embedder
from tasks.indexing import ChunkRecord, read_index
from tasks.vector_index import AllowedSet, VectorIndex


class Retriever:
    """Holds the embedder and one memory-mapped index; `warm_up()` loads both."""

    def __init__(self, embedder: Embedder, index_folder: Path, index_id: str) -> None:
        self.embedder = embedder
        self.index_folder = index_folder
        self.index_id = index_id
        self._index: VectorIndex | None = None
        self._chunks: list[ChunkRecord] = []
        self._allowed: dict[tuple[str, tuple[str, ...]], AllowedSet] = {}

    def warm_up(self) -> None:
        self.embedder.warm_up()
        if self._index is None:
            self._index, self._chunks = read_index(self.index_folder)

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
        hits = self._index.search(vector.reshape(1, -1), top_k, allowed)
        chunks = [self._retrieved(int(i), float(s))
                  for s, i in zip(hits.scores[0], hits.ids[0], strict=True) if i >= 0]
        return result.model_copy(update={"chunks": chunks})

    def _allowed_ids(self, tenant: str, grants: list[str]) -> AllowedSet:
        """The chunk positions this tenant may read, prepared once per (tenant, grants)."""
        key = (tenant, tuple(sorted(grants)))
        if key not in self._allowed:
            granted = set(grants)
            assert self._index is not None
            self._allowed[key] = self._index.allowed(np.array(
                [i for i, c in enumerate(self._chunks) if c.tenant == tenant and granted & set(c.acl)],
                dtype=np.int64,
            ))
        return self._allowed[key]

    def _retrieved(self, vector_id: int, score: float) -> RetrievedChunk:
        chunk = self._chunks[vector_id]
        return RetrievedChunk(chunk_id=chunk.chunk_id, document_id=chunk.document_id,
                              title=chunk.title, text=chunk.text, score=score)
