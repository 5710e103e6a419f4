"""The retrieval cache: a request's top-k chunks, keyed by everything that decides them.

The key is (index id, tenant, grants, top k, query text), hashed, so a result is never
served across tenants or grants, and a new index (any added, changed or retired chunk
changes its id) never serves an old result. Values expire after a TTL. The distributed mode
keeps them in Redis, shared by every retrieval worker; the embedded mode in the process.
Hits and misses are counted, for operators and the benchmark.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Protocol

from workers.settings import Settings


def cache_key(index_id: str, tenant: str, grants: list[str], top_k: int, query: str) -> str:
    scope = json.dumps([index_id, tenant, sorted(set(grants)), top_k, query], ensure_ascii=False)
    return hashlib.sha256(scope.encode()).hexdigest()


@dataclass(frozen=True)
class CacheStats:
    hits: int
    misses: int


class RetrievalCache(Protocol):
    def get_many(self, keys: list[str]) -> dict[str, dict[str, Any]]: ...

    def put_many(self, values: dict[str, dict[str, Any]]) -> None: ...

    def count(self, hits: int, misses: int) -> None: ...

    def stats(self) -> CacheStats: ...


class NoCache:
    """`SLUICE_RETRIEVAL_CACHE=off`: every lookup misses, nothing is kept."""

    def __init__(self) -> None:
        self._misses = 0

    def get_many(self, keys: list[str]) -> dict[str, dict[str, Any]]:
        return {}

    def put_many(self, values: dict[str, dict[str, Any]]) -> None:
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
        self._entries: OrderedDict[str, tuple[float, dict[str, Any]]] = OrderedDict()
        self._lock = threading.Lock()
        self._hits = self._misses = 0

    def get_many(self, keys: list[str]) -> dict[str, dict[str, Any]]:
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

    def put_many(self, values: dict[str, dict[str, Any]]) -> None:
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
    """Shared by every retrieval worker: SETEX values, INCRBY counters, under the prefix."""

    def __init__(self, url: str, prefix: str, ttl_s: float) -> None:
        import redis

        self.client = redis.Redis.from_url(url)
        self.prefix = f"{prefix}sluice:rcache:"
        self.ttl_ms = max(1, int(ttl_s * 1000))

    def get_many(self, keys: list[str]) -> dict[str, dict[str, Any]]:
        if not keys:
            return {}
        raw = self.client.mget([self.prefix + k for k in keys])
        return {k: json.loads(v) for k, v in zip(keys, raw, strict=True) if v is not None}

    def put_many(self, values: dict[str, dict[str, Any]]) -> None:
        if not values:
            return
        pipe = self.client.pipeline(transaction=False)
        for key, value in values.items():
            pipe.set(self.prefix + key, json.dumps(value), px=self.ttl_ms)
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


def retrieval_cache(settings: Settings) -> RetrievalCache:
    """`auto` is Redis when the broker is Redis (the distributed mode), else this process."""
    mode = settings.retrieval_cache
    if mode == "off":
        return NoCache()
    url = settings.cache_url or (settings.broker_url if settings.broker_url.startswith(
        ("redis://", "rediss://")) else "")
    if mode == "redis" or (mode == "auto" and url):
        if not url:
            raise ValueError("SLUICE_RETRIEVAL_CACHE=redis needs SLUICE_CACHE_URL or a Redis "
                             "SLUICE_BROKER_URL")
        return RedisCache(url, settings.broker_key_prefix, settings.retrieval_cache_ttl_s)
    return MemoryCache(settings.retrieval_cache_ttl_s)
