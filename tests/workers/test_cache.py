"""The retrieval cache: keys that never cross tenants, grants or indexes; TTL; Redis and memory."""

from __future__ import annotations

import time
import uuid

import pytest
from sqlalchemy import select

from schemas.stages import ItemRecord
from workers.cache import MemoryCache, cache_key


@pytest.mark.unit
def test_keys_differ_by_index_tenant_grants_top_k_and_query_but_not_grant_order() -> None:
    base = cache_key("idx-1", "acme", ["public", "hr"], 4, "How do I roll back?")
    assert base == cache_key("idx-1", "acme", ["hr", "public", "hr"], 4, "How do I roll back?")
    others = [cache_key("idx-2", "acme", ["public", "hr"], 4, "How do I roll back?"),
              cache_key("idx-1", "globex", ["public", "hr"], 4, "How do I roll back?"),
              cache_key("idx-1", "acme", ["public"], 4, "How do I roll back?"),
              cache_key("idx-1", "acme", ["public", "hr"], 5, "How do I roll back?"),
              cache_key("idx-1", "acme", ["public", "hr"], 4, "How do I roll forward?")]
    assert base not in others and len(set(others)) == len(others)


@pytest.mark.unit
def test_memory_cache_expires_entries_and_evicts_the_least_recently_used() -> None:
    cache = MemoryCache(ttl_s=0.2, max_entries=2)
    cache.put_many({"a": {"v": 1}, "b": {"v": 2}})
    assert cache.get_many(["a"]) == {"a": {"v": 1}}  # a is now the most recent
    cache.put_many({"c": {"v": 3}})
    assert set(cache.get_many(["a", "b", "c"])) == {"a", "c"}
    time.sleep(0.25)
    assert cache.get_many(["a", "c"]) == {}
    cache.count(hits=3, misses=2)
    assert (cache.stats().hits, cache.stats().misses) == (3, 2)


def _record(tenant: str, grants: list[str], question: str) -> ItemRecord:
    return ItemRecord(request_id=f"req-{uuid.uuid4().hex[:12]}", tenant=tenant, grants=grants,
                      kind="answer", payload={"kind": "answer", "question": question},
                      previous={})


@pytest.mark.integration
def test_retrieval_hits_the_redis_cache_only_within_one_tenant_and_grant_set(pipeline) -> None:  # type: ignore[no-untyped-def]
    from tasks.queue_tasks import compute_retrieval
    from workers.cache import RedisCache
    from workers.runtime import Runtime
    from workers.store.engine import session_scope
    from workers.store.models import Document

    runtime = Runtime(pipeline.settings)
    cache = runtime.retrieval_cache()
    assert isinstance(cache, RedisCache)  # the distributed mode shares one cache
    question = f"How do I roll back a bad deploy? ({uuid.uuid4().hex[:6]})"
    before = cache.stats()

    first, _ = compute_retrieval(runtime, [_record("acme", ["public", "engineering"], question)],
                                 None)
    again, events = compute_retrieval(runtime, [_record("acme", ["engineering", "public"],
                                                        question)], None)
    assert first[0].output["cached"] is False and again[0].output["cached"] is True
    assert [c["chunk_id"] for c in again[0].output["chunks"]] == \
        [c["chunk_id"] for c in first[0].output["chunks"]]
    assert events[0].payload["cached"] is True  # a cached read is still an audited data read
    assert cache.stats().hits - before.hits == 1 and cache.stats().misses - before.misses == 1

    narrower, _ = compute_retrieval(runtime, [_record("acme", ["public"], question)], None)
    other, _ = compute_retrieval(runtime, [_record("globex", ["public", "engineering"],
                                                   question)], None)
    assert narrower[0].output["cached"] is False and other[0].output["cached"] is False
    with session_scope(pipeline.settings.database_url) as session:
        owners = dict(session.execute(select(Document.id, Document.tenant_id)).all())
    assert {owners[c["document_id"]] for c in other[0].output["chunks"]} == {"globex"}
