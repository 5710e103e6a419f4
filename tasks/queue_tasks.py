"""The four Celery tasks: thin adapters from a queue message to a stage function."""

from __future__ import annotations

from typing import Any

from schemas.stages import ItemRecord, RetrievalOutput, RetrievalResult
from schemas.status import Stage
from tasks import adapters
from tasks.retrieval import Retriever
from tasks.router import route
from tasks.validation import validate
from workers.app import TASK_NAMES, app
from workers.base import Results, StageTask, TransientError
from workers.cache import cache_key
from workers.runtime import Runtime
from workers.versions import decoding_policy, sanitize_policy


def compute_route(runtime: Runtime, records: list[ItemRecord], _budget: float | None) -> Results:
    output = route(adapters.router_input(records), runtime.rules(), runtime.count_tokens,
                   runtime.settings.max_input_tokens, classifier=runtime.router_classifier())
    return adapters.router_results(output)


def compute_retrieval(runtime: Runtime, records: list[ItemRecord],
                      _budget: float | None) -> Results:
    """Cached results first; one embedding call and search for the misses only."""
    retriever: Retriever = runtime.retriever()
    cache = runtime.retrieval_cache()
    batch = adapters.retrieval_input(records, runtime.settings.top_k)
    keys = {item.request_id: cache_key(retriever.index_id, item.tenant, item.grants, batch.top_k,
                                       item.query) for item in batch.items}
    found = cache.get_many(list(keys.values()))
    misses = [item for item in batch.items if keys[item.request_id] not in found]
    fresh = {r.request_id: r for r in retriever.retrieve(
        batch.model_copy(update={"items": misses})).results} if misses else {}
    cache.put_many({keys[rid]: r.model_dump(mode="json", exclude={"request_id", "cached"})
                    for rid, r in fresh.items() if r.outcome is None})
    cache.count(hits=len(batch.items) - len(misses), misses=len(misses))
    output = RetrievalOutput(results=[
        fresh.get(item.request_id) or RetrievalResult.model_validate(
            {**found[keys[item.request_id]], "request_id": item.request_id, "cached": True})
        for item in batch.items])
    # The cache holds what the index returned; the policy of the day sanitizes it.
    return adapters.retrieval_results(output, records, sanitize_policy(runtime.settings))


def compute_generation(runtime: Runtime, records: list[ItemRecord],
                       budget: float | None) -> Results:
    import torch

    try:
        output = runtime.generator().generate(adapters.generation_input(records, budget))
    except torch.OutOfMemoryError as exc:  # a smaller co-scheduled batch may fit next time
        torch.cuda.empty_cache()
        raise TransientError(f"accelerator out of memory: {exc}") from exc
    return adapters.generation_results(output, decoding_policy(runtime.settings).version, records)


def compute_validation(runtime: Runtime, records: list[ItemRecord],
                       _budget: float | None) -> Results:
    verdicts = validate(adapters.validation_input(records), runtime.validators())
    results, events = adapters.validation_results(verdicts, records)
    return adapters.send_back_for_repair(results, events, records,
                                         runtime.settings.max_repair_rounds)


@app.task(bind=True, base=StageTask, name=TASK_NAMES[Stage.ROUTER])
def route_shard(self: StageTask, hop: dict[str, Any]) -> dict[str, Any]:
    return self.execute(Stage.ROUTER, hop, compute_route)


@app.task(bind=True, base=StageTask, name=TASK_NAMES[Stage.RETRIEVAL])
def retrieve_shard(self: StageTask, hop: dict[str, Any]) -> dict[str, Any]:
    return self.execute(Stage.RETRIEVAL, hop, compute_retrieval)


@app.task(bind=True, base=StageTask, name=TASK_NAMES[Stage.GENERATION])
def generate_shard(self: StageTask, hop: dict[str, Any]) -> dict[str, Any]:
    return self.execute(Stage.GENERATION, hop, compute_generation)


@app.task(bind=True, base=StageTask, name=TASK_NAMES[Stage.VALIDATION])
def validate_shard(self: StageTask, hop: dict[str, Any]) -> dict[str, Any]:
    return self.execute(Stage.VALIDATION, hop, compute_validation)
