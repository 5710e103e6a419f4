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


class Recording:
    """The real embedder, with a record of the texts each call asked it to encode."""

    def __init__(self, embedder) -> None:  # type: ignore[no-untyped-def]
        self.embedder = embedder
        self.model_path = embedder.model_path
        self.calls: list[list[str]] = []

    def warm_up(self) -> None:
        self.embedder.warm_up()

    def encode(self, texts: list[str]) -> np.ndarray:
        self.calls.append(list(texts))
        return self.embedder.encode(texts)


@pytest.mark.unit
def test_cached_embedder_encodes_each_new_text_once_and_gives_the_embedders_vectors(
        embedder) -> None:  # type: ignore[no-untyped-def]
    cache, recording = MemoryCache(ttl_s=60), Recording(embedder)
    cached = CachedEmbedder(recording, cache, "space-1")  # type: ignore[arg-type]
    texts = ["How do I roll back a bad deploy?", "Who owns the billing API?",
             "How do I roll back a bad deploy?"]
    first = cached.encode(texts)
    assert first.shape == (3, 384) and first.dtype == np.float32
    assert np.allclose(first, embedder.encode(texts), atol=1e-5)
    assert np.array_equal(first[0], first[2])
    assert recording.calls == [texts[:2]]  # the repeat in one call is encoded once
    assert cache.stats() == CacheStats(hits=0, misses=2)

    again = cached.encode(["Who owns the billing API?", "A text never seen before"])
    assert np.array_equal(again[0], first[1])
    assert recording.calls == [texts[:2], ["A text never seen before"]]
    assert cache.stats() == CacheStats(hits=1, misses=3)
    assert cached.encode([]).shape == (0, 384)

    other = CachedEmbedder(recording, cache, "space-2")  # type: ignore[arg-type]
    other.encode(["Who owns the billing API?"])  # another space never reads these vectors
    assert recording.calls[-1] == ["Who owns the billing API?"]


@pytest.mark.unit
def test_a_cached_value_of_the_wrong_width_is_a_miss(embedder) -> None:  # type: ignore[no-untyped-def]
    from workers.cache import vector_key

    cache, recording = MemoryCache(ttl_s=60), Recording(embedder)
    cached = CachedEmbedder(recording, cache, "space-1")  # type: ignore[arg-type]
    cached.encode(["How long are backups kept?"])
    cache.put_many({vector_key("space-1", "Who owns billing?"): np.zeros(7, np.float32)})
    vectors = cached.encode(["Who owns billing?"])
    assert vectors.shape == (1, 384) and recording.calls[-1] == ["Who owns billing?"]


@pytest.mark.unit
def test_the_vector_space_names_the_weights_and_the_pooling(tmp_path) -> None:  # type: ignore[no-untyped-def]
    import shutil

    from workers.cache import vector_space
    from workers.settings import Settings

    model = tmp_path / "model"
    shutil.copytree(Settings().embedder_model, model)
    hashes = tmp_path / "hashes.json"
    first = vector_space(str(model), hashes)
    assert first == vector_space(str(model), hashes)
    weights = next(model.glob("*.safetensors"))
    data = weights.read_bytes()
    weights.write_bytes(data[:-1] + bytes([data[-1] ^ 0xFF]))  # a fine-tune in place
    second = vector_space(str(model), hashes)
    (model / "1_Pooling" / "config.json").write_text("{}")
    assert len({first, second, vector_space(str(model), hashes)}) == 3


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
