"""The caches: retrieval results (keys that never cross tenants, grants or indexes) and
embedding vectors (the router's question vector serves retrieval); TTL; Redis and memory."""

from __future__ import annotations

import time
import uuid

import numpy as np
import pytest
from sqlalchemy import select

from schemas.stages import ItemRecord
from workers.cache import CachedEmbedder, CacheStats, MemoryCache, cache_key


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


@pytest.fixture(scope="module")
def embedder():  # type: ignore[no-untyped-def]
    from tasks.embedding import Embedder
    from workers.settings import Settings

    model = Embedder(Settings().embedder_model)
    model.warm_up()
    return model


@pytest.mark.unit
def test_cached_embedder_encodes_each_new_text_once_and_gives_the_embedders_vectors(
        embedder) -> None:  # type: ignore[no-untyped-def]
    cache = MemoryCache(ttl_s=60)
    cached = CachedEmbedder(embedder, cache)
    texts = ["How do I roll back a bad deploy?", "Who owns the billing API?",
             "How do I roll back a bad deploy?"]
    first = cached.encode(texts)
    assert first.shape == (3, 384) and first.dtype == np.float32
    assert np.allclose(first, embedder.encode(texts), atol=1e-5)
    assert np.array_equal(first[0], first[2])
    assert cache.stats() == CacheStats(hits=1, misses=2)  # the repeat in one call encodes once

    again = cached.encode(["Who owns the billing API?", "A text never seen before"])
    assert np.array_equal(again[0], first[1])
    assert cache.stats() == CacheStats(hits=2, misses=3)
    assert cached.encode([]).shape[0] == 0


@pytest.mark.integration
def test_retrieval_reads_the_question_vector_the_router_stored_in_redis(pipeline) -> None:  # type: ignore[no-untyped-def]
    """Two runtimes stand for the router and retrieval workers: the question is embedded
    once, by the router, and retrieval's search reads that vector from Redis."""
    from tasks.queue_tasks import compute_retrieval, compute_route
    from workers.cache import RedisCache
    from workers.runtime import Runtime

    router, retrieval = Runtime(pipeline.settings), Runtime(pipeline.settings)
    vectors = router.embedder().cache
    assert isinstance(vectors, RedisCache) and vectors.prefix.endswith(":vcache:")
    question = f"How are database backups verified? ({uuid.uuid4().hex[:8]})"
    record = _record("acme", ["public", "engineering"], question)
    router.router_classifier()  # a first head may be trained: its examples are embedded too
    before = vectors.stats()

    routed, _ = compute_route(router, [record], None)
    after_route = vectors.stats()
    assert after_route.misses - before.misses == 1  # the router embedded the new question

    record = record.model_copy(update={"previous": {"router": routed[0].output}})
    found, _ = compute_retrieval(retrieval, [record], None)
    after = vectors.stats()
    assert found[0].output["chunks"] and found[0].output["cached"] is False  # a real search
    assert (after.hits - after_route.hits, after.misses - after_route.misses) == (1, 0)
