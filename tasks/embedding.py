"""The embedder: a sentence-transformers model loaded from a local folder."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, Protocol

import numpy as np


class TextEncoder(Protocol):
    """What the stages ask of an embedder (the embedder itself, or one behind a cache)."""

    model_path: str

    def warm_up(self) -> None: ...

    def encode(self, texts: list[str]) -> np.ndarray: ...


def embedder_id(model_path: str) -> str:
    """A stable name for the embedder: folder name plus a hash of its config files."""
    folder = Path(model_path)
    digest = hashlib.sha256()
    for name in ("config.json", "modules.json", "tokenizer.json"):
        candidate = folder / name
        if candidate.exists():
            digest.update(candidate.read_bytes())
    return f"{folder.name}-{digest.hexdigest()[:12]}"


class Embedder:
    """Loads lazily in `warm_up()`; encodes to L2-normalised float32 vectors."""

    def __init__(self, model_path: str, batch_size: int = 32) -> None:
        self.model_path = model_path
        self.batch_size = batch_size
        self._model: Any = None

    def warm_up(self) -> None:
        if self._model is None:
            from sentence_transformers import SentenceTransformer

            self._model = SentenceTransformer(self.model_path, device="cpu")

    def encode(self, texts: list[str]) -> np.ndarray:
        self.warm_up()
        vectors = self._model.encode(texts, batch_size=self.batch_size,
                                     normalize_embeddings=True, convert_to_numpy=True,
                                     show_progress_bar=False)
        return np.ascontiguousarray(vectors, dtype=np.float32)
