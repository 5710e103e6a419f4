"""The generation stage on the real default model through the engine, greedy and short."""

from __future__ import annotations

import pytest

from schemas.stages import GenerationInput, GenerationItem, GenerationOutput, RetrievedChunk
from schemas.status import AnswerClass
from tasks.engine.engine import BatchLimits, GenerationEngine
from tasks.engine.hf import TransformersBackend
from tasks.generation import (
    ABSTAIN_TEXT,
    DecodingPolicies,
    DecodingPolicyError,
    NullBackend,
    generate,
)
from tasks.prompting import PromptTemplates
from tests.tasks.engine.conftest import hf_backend  # noqa: F401 - the shared model fixture
from workers.settings import DEFAULT_GENERATOR_NAME

pytestmark = [pytest.mark.unit]

MAX_NEW_TOKENS = 12

CHUNKS = [
    RetrievedChunk(chunk_id="aaaaaaaaaaaaaaaa", document_id="d1", title="Laptops",
                   text="To request a new laptop, open a hardware ticket in the IT portal.",
                   score=0.8),
    RetrievedChunk(chunk_id="bbbbbbbbbbbbbbbb", document_id="d2", title="Replacement",
                   text="Laptops are replaced every three years.", score=0.5),
]


def _item(request_id: str = "req-gen-1", chunks: list[RetrievedChunk] | None = None,
          **fields: object) -> GenerationItem:
    return GenerationItem(request_id=request_id, answer_class=AnswerClass.GROUNDED_ANSWER,
                          instruction="How do I request a new laptop?",
                          chunks=CHUNKS if chunks is None else chunks, **fields)


@pytest.fixture(scope="module")
def templates() -> PromptTemplates:
    return PromptTemplates.load()


@pytest.fixture(scope="module")
def policies() -> DecodingPolicies:
    return DecodingPolicies.load(MAX_NEW_TOKENS)


@pytest.fixture(scope="module")
def engine(hf_backend: TransformersBackend) -> GenerationEngine:  # noqa: F811
    engine = GenerationEngine(hf_backend, BatchLimits(gather_s=0.0))
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def first_output(engine: GenerationEngine, templates: PromptTemplates,
                 policies: DecodingPolicies) -> GenerationOutput:
    return generate(GenerationInput(items=[_item()]), engine, templates, policies)


def test_one_item_gives_one_draft_within_the_policy(first_output: GenerationOutput) -> None:
    [draft] = first_output.drafts

    assert draft.request_id == "req-gen-1"
    assert draft.prompt_tokens > 0
    assert 0 < draft.completion_tokens <= MAX_NEW_TOKENS + 1
    assert draft.finish_reason in {"stop", "length"}
    assert draft.model.startswith(DEFAULT_GENERATOR_NAME) and draft.backend == "transformers"
    assert draft.decoding.startswith("grounded-greedy:greedy-max12")
    assert draft.outcome is None


def test_draft_labels_sources_in_retrieval_order(first_output: GenerationOutput) -> None:
    assert first_output.drafts[0].source_labels == {"S1": CHUNKS[0].chunk_id,
                                                    "S2": CHUNKS[1].chunk_id}


def test_greedy_decoding_is_deterministic(engine: GenerationEngine, templates: PromptTemplates,
                                          policies: DecodingPolicies,
                                          first_output: GenerationOutput) -> None:
    again = generate(GenerationInput(items=[_item()]), engine, templates, policies).drafts[0]

    first = first_output.drafts[0]
    assert (again.text, again.completion_tokens, again.prompt_tokens) == \
        (first.text, first.completion_tokens, first.prompt_tokens)


def test_the_router_s_policy_is_applied(engine: GenerationEngine, templates: PromptTemplates
                                        ) -> None:
    # Given policies with a short lookup policy (cap 30) and a long default
    policies = DecodingPolicies.load(30)
    assert policies.get("lookup-greedy-short").max_new_tokens == 30

    # When an item names the sampled document policy
    sampled = _item(decoding_policy="document-sampled")
    draft = generate(GenerationInput(items=[sampled]), engine, templates, policies).drafts[0]

    # Then it is decoded under that policy with a per-request seed
    policy = policies.get("document-sampled")
    assert draft.decoding == policy.version and not policy.greedy
    assert draft.seed == policy.request_seed("req-gen-1:0")


def test_unknown_policy_names_the_known_ones(policies: DecodingPolicies) -> None:
    with pytest.raises(DecodingPolicyError, match="grounded-greedy"):
        policies.get("no-such-policy")


def test_every_policy_the_router_names_exists(policies: DecodingPolicies) -> None:
    from tasks.router import RouterRules

    assert set(RouterRules.load().decoding_policies) <= set(policies.by_name)


def test_operator_cap_limits_every_policy() -> None:
    capped = DecodingPolicies.load(7)

    assert {p.max_new_tokens for p in capped.by_name.values()} == {7}
    assert capped.version != DecodingPolicies.load(8).version


def test_null_backend_is_named_benchmark_only(templates: PromptTemplates,
                                              policies: DecodingPolicies) -> None:
    engine = GenerationEngine(NullBackend())
    try:
        drafts = generate(GenerationInput(items=[_item("a"), _item("b", chunks=[])]), engine,
                          templates, policies).drafts
    finally:
        engine.close()

    assert "benchmark" in NullBackend.model_id
    assert "[S1]" in drafts[0].text
    assert drafts[1].text == ABSTAIN_TEXT
