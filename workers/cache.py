"""Caches shared by the stage workers: retrieval results and embedding vectors.

* The retrieval cache holds a request's top-k chunks, keyed by (index id, tenant, grants,
  top k, query text), hashed, so a result is never served across tenants or grants, and a
  new index (any added, changed or retired chunk changes its id) never serves an old result.
* The vector cache holds the embedder's vector of a text, keyed by (vector space, text),
  where the space names the embedder by its configuration files and a hash of its weights.
  In the distributed mode the router embeds a question to classify it and retrieval reads
  that vector instead of running the embedder on the same text again; validation workers
  share the vectors of the chunks they check claims against.

Values expire after a TTL. The distributed mode keeps them in Redis, shared by every
worker; the embedded mode in each process. A miss only costs the computation it saves:
nothing depends on a value being there, and a value that does not decode to a vector of the
space's width is a miss. Hits and misses are counted, for operators and the benchmark.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import orjson

from tasks.embedding import Embedder, embedder_id
from workers.settings import CacheMode, Settings
from workers.versions import weights_hash


def cache_key(index_id: str, tenant: str, grants: list[str], top_k: int, query: str) -> str:
    scope = json.dumps([index_id, tenant, sorted(set(grants)), top_k, query], ensure_ascii=False)
    return hashlib.sha256(scope.encode()).hexdigest()


def vector_key(space: str, text: str) -> str:
    return hashlib.sha256(json.dumps([space, text], ensure_ascii=False).encode()).hexdigest()


def vector_space(model_path: str, hashes_file: Path) -> str:
    """The embedder's name for cache keys: its id (folder name and main configuration files),
    its pooling and sequence-length files, and its weights' hash (computed once per weights
    version, see `weights_hash`). Another model, a fine-tune in the same folder or a changed
    pooling never reads the vectors of this one."""
    folder = Path(model_path)
    digest = hashlib.sha256()
    for name in ("sentence_bert_config.json", "1_Pooling/config.json"):
        if (folder / name).exists():
            digest.update((folder / name).read_bytes())
    return (f"{embedder_id(model_path)}:{digest.hexdigest()[:8]}:"
            f"{weights_hash(folder, hashes_file)}")


def embedder_space(settings: Settings) -> str:
    """The configured embedder's vector space: what its vectors are cached under, and what an
    index built with it records (a worker searches only an index of its own space)."""
    return vector_space(settings.embedder_model, settings.data_dir / "weights-hashes.json")


@dataclass(frozen=True)
class CacheStats:
    hits: int
    misses: int


@dataclass(frozen=True)
class Codec:
    """How a value travels to Redis and back (the in-process cache keeps objects as they are)."""

    dumps: Callable[[Any], bytes]
    loads: Callable[[bytes], Any]


JSON = Codec(orjson.dumps, orjson.loads)
FLOAT32 = Codec(lambda value: np.asarray(value, dtype=np.float32).tobytes(),
                lambda raw: np.frombuffer(raw, dtype=np.float32))


class Cache(Protocol):
    def get_many(self, keys: list[str]) -> dict[str, Any]: ...

    def put_many(self, values: dict[str, Any]) -> None: ...

    def count(self, hits: int, misses: int) -> None: ...

    def stats(self) -> CacheStats: ...


class NoCache:
    """A cache set to `off`: every lookup misses, nothing is kept."""

    def __init__(self) -> None:
        self._misses = 0

    def get_many(self, keys: list[str]) -> dict[str, Any]:
        return {}

    def put_many(self, values: dict[str, Any]) -> None:
        return None

    def count(self, hits: int, misses: int) -> None:
        self._misses += misses

    def stats(self) -> CacheStats:
        return CacheStats(0, self._misses)


class MemoryCache:
    """In this process: least recently used entries go first past `max_entries`."""

    def __init__(self, ttl_s: float, max_entries: int = 10_000) -> None:
        self.ttl_s = ttl_s
        self.max_entries = max_entries
        self._entries: OrderedDict[str, tuple[float, Any]] = OrderedDict()
        self._lock = threading.Lock()
        self._hits = self._misses = 0

    def get_many(self, keys: list[str]) -> dict[str, Any]:
        now = time.monotonic()
        found = {}
        with self._lock:
            for key in keys:
                entry = self._entries.get(key)
                if entry is None:
                    continue
                if entry[0] < now:
                    del self._entries[key]
                    continue
                self._entries.move_to_end(key)
                found[key] = entry[1]
        return found

    def put_many(self, values: dict[str, Any]) -> None:
        expires = time.monotonic() + self.ttl_s
        with self._lock:
            for key, value in values.items():
                self._entries[key] = (expires, value)
                self._entries.move_to_end(key)
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)

    def count(self, hits: int, misses: int) -> None:
        with self._lock:
            self._hits += hits
            self._misses += misses

    def stats(self) -> CacheStats:
        return CacheStats(self._hits, self._misses)


class RedisCache:
    """Shared by every worker: SET with a TTL, INCRBY counters, under the prefix and the
    cache's namespace (`rcache` for retrieval results, `vcache` for vectors)."""

    def __init__(self, url: str, prefix: str, ttl_s: float, namespace: str = "rcache",
                 codec: Codec = JSON) -> None:
        import redis

        self.client = redis.Redis.from_url(url)
        self.prefix = f"{prefix}sluice:{namespace}:"
        self.ttl_ms = max(1, int(ttl_s * 1000))
        self.codec = codec

    def get_many(self, keys: list[str]) -> dict[str, Any]:
        if not keys:
            return {}
        raw = self.client.mget([self.prefix + k for k in keys])
        return {k: self.codec.loads(v) for k, v in zip(keys, raw, strict=True) if v is not None}

    def put_many(self, values: dict[str, Any]) -> None:
        if not values:
            return
        pipe = self.client.pipeline(transaction=False)
        for key, value in values.items():
            pipe.set(self.prefix + key, self.codec.dumps(value), px=self.ttl_ms)
        pipe.execute()

    def count(self, hits: int, misses: int) -> None:
        pipe = self.client.pipeline(transaction=False)
        if hits:
            pipe.incrby(self.prefix + "stats:hits", hits)
        if misses:
            pipe.incrby(self.prefix + "stats:misses", misses)
        pipe.execute()

    def stats(self) -> CacheStats:
        hits, misses = self.client.mget([self.prefix + "stats:hits", self.prefix + "stats:misses"])
        return CacheStats(int(hits or 0), int(misses or 0))


def _cache(settings: Settings, mode: CacheMode, ttl_s: float, namespace: str,
           codec: Codec, variable: str) -> Cache:
    """`auto` is Redis when the broker is Redis (the distributed mode), else this process."""
    if mode == "off":
        return NoCache()
    url = settings.cache_url or (settings.broker_url if settings.broker_url.startswith(
        ("redis://", "rediss://")) else "")
    if mode == "redis" or (mode == "auto" and url):
        if not url:
            raise ValueError(f"{variable}=redis needs SLUICE_CACHE_URL or a Redis "
                             "SLUICE_BROKER_URL")
        return RedisCache(url, settings.broker_key_prefix, ttl_s, namespace, codec)
    return MemoryCache(ttl_s)


def retrieval_cache(settings: Settings) -> Cache:
    """Top-k results by `cache_key`, as JSON (`SLUICE_RETRIEVAL_CACHE`)."""
    return _cache(settings, settings.retrieval_cache, settings.retrieval_cache_ttl_s, "rcache",
                  JSON, "SLUICE_RETRIEVAL_CACHE")


def vector_cache(settings: Settings) -> Cache:
    """Embedder vectors by `vector_key`, as float32 bytes (`SLUICE_EMBEDDING_CACHE`)."""
    return _cache(settings, settings.embedding_cache, settings.embedding_cache_ttl_s, "vcache",
                  FLOAT32, "SLUICE_EMBEDDING_CACHE")


class CachedEmbedder:
    """The embedder with a vector cache in front: only texts the cache lacks are encoded
    (each once per call), and what they give is kept for the next stage or request.

    It answers what the stages ask of an embedder (`model_path`, `warm_up`, `encode`), so the
    router's classifier, the retriever and the support scorer take it as they take one.
    """

    def __init__(self, embedder: Embedder, cache: Cache, space: str) -> None:
        self.embedder = embedder
        self.cache = cache
        self.model_path = embedder.model_path
        self.space = space
        self._width: int | None = None  # the vectors' length, once one was encoded here

    def warm_up(self) -> None:
        self.embedder.warm_up()

    def encode(self, texts: list[str]) -> np.ndarray:
        key_of = {text: vector_key(self.space, text) for text in texts}  # distinct texts
        found = {k: v for k, v in self.cache.get_many(list(key_of.values())).items()
                 if self._width is None or v.shape == (self._width,)}
        missing = [text for text, key in key_of.items() if key not in found]
        self.cache.count(hits=len(found), misses=len(missing))
        if missing:
            vectors = self.embedder.encode(missing)
            self._width = int(vectors.shape[1])
            # Copies: a row view would keep the whole batch alive in the in-process cache.
            fresh = {key_of[t]: row.copy() for t, row in zip(missing, vectors, strict=True)}
            self.cache.put_many(fresh)
            found.update(fresh)
        if not texts:
            return np.zeros((0, self._width or 0), dtype=np.float32)
        return np.ascontiguousarray(np.stack([found[key_of[t]] for t in texts]),
                                    dtype=np.float32)
