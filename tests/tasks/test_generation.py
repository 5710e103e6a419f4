"""The generation stage on the real default model, greedy and short."""

from __future__ import annotations

from pathlib import Path

import pytest

from schemas.stages import GenerationInput, GenerationItem, GenerationOutput, RetrievedChunk
from schemas.status import AnswerClass
from tasks.generation import ABSTAIN_TEXT, DecodingPolicy, HFGenerator, NullGenerator, PromptSet
from workers.settings import DEFAULT_GENERATOR_NAME

pytestmark = [pytest.mark.unit]

MODEL_DIR = Path.home() / ".cache" / "sluice" / "models" / DEFAULT_GENERATOR_NAME
MAX_NEW_TOKENS = 12

CHUNKS = [
    RetrievedChunk(chunk_id="aaaaaaaaaaaaaaaa", document_id="d1", title="Laptops",
                   text="To request a new laptop, open a hardware ticket in the IT portal.",
                   score=0.8),
    RetrievedChunk(chunk_id="bbbbbbbbbbbbbbbb", document_id="d2", title="Replacement",
                   text="Laptops are replaced every three years.", score=0.5),
]


def _item(request_id: str = "req-gen-1", chunks: list[RetrievedChunk] | None = None,
          answer_class: AnswerClass = AnswerClass.GROUNDED_ANSWER) -> GenerationItem:
    return GenerationItem(request_id=request_id, answer_class=answer_class,
                          instruction="How do I request a new laptop?",
                          chunks=CHUNKS if chunks is None else chunks)


@pytest.fixture(scope="module")
def prompts() -> PromptSet:
    return PromptSet.load()


@pytest.fixture(scope="module")
def generator(prompts: PromptSet) -> HFGenerator:
    if not ((MODEL_DIR / "config.json").exists() and any(MODEL_DIR.glob("*.safetensors"))):
        from ops.models import prepare_default_model

        prepare_default_model(MODEL_DIR)
    gen = HFGenerator(str(MODEL_DIR), DecodingPolicy(max_new_tokens=MAX_NEW_TOKENS), prompts,
                      torch_threads=1)
    gen.warm_up()
    return gen


@pytest.fixture(scope="module")
def first_output(generator: HFGenerator) -> GenerationOutput:
    return generator.generate(GenerationInput(items=[_item()]))


def test_one_item_gives_one_draft_within_the_policy(first_output: GenerationOutput) -> None:
    assert len(first_output.drafts) == 1
    draft = first_output.drafts[0]

    assert draft.request_id == "req-gen-1"
    assert draft.prompt_tokens > 0
    assert 0 < draft.completion_tokens <= MAX_NEW_TOKENS + 1
    assert draft.finish_reason in {"stop", "length"}
    assert draft.model == DEFAULT_GENERATOR_NAME
    assert draft.outcome is None


def test_draft_labels_sources_in_retrieval_order(first_output: GenerationOutput) -> None:
    draft = first_output.drafts[0]

    assert draft.source_labels == {"S1": CHUNKS[0].chunk_id, "S2": CHUNKS[1].chunk_id}


def test_greedy_decoding_is_deterministic(generator: HFGenerator,
                                          first_output: GenerationOutput) -> None:
    # Given a greedy policy
    assert generator.policy.do_sample is False

    # When the same item is generated again
    again = generator.generate(GenerationInput(items=[_item()])).drafts[0]

    # Then the text and token counts are identical
    first = first_output.drafts[0]
    assert again.text == first.text
    assert again.completion_tokens == first.completion_tokens
    assert again.prompt_tokens == first.prompt_tokens


def test_a_draft_that_ends_early_reports_stop_and_counts_the_eos() -> None:
    # Given a budget large enough for the model to finish its answer on its own
    budget = 60
    prompts = PromptSet.load()
    generator = HFGenerator(str(MODEL_DIR), DecodingPolicy(max_new_tokens=budget), prompts,
                            torch_threads=1)
    generator.warm_up()
    item = _item(chunks=CHUNKS[:1])

    # and a reference: the same greedy decode, read straight from the model
    import torch

    tokenizer, model = generator._tokenizer, generator._model
    text = tokenizer.apply_chat_template(prompts.messages(item)[0], add_generation_prompt=True,
                                         tokenize=False)
    encoded = tokenizer([text], return_tensors="pt", add_special_tokens=False)
    with torch.inference_mode():
        raw = model.generate(**encoded, max_new_tokens=budget, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id)
    new_tokens = raw[0, encoded["input_ids"].shape[1]:].tolist()
    eos = model.generation_config.eos_token_id
    assert eos in new_tokens, "precondition: the model stops before the budget on this item"
    stop_at = new_tokens.index(eos)

    # When the generator drafts it
    draft = generator.generate(GenerationInput(items=[item])).drafts[0]

    # Then the draft says it stopped, and counts the EOS among the completion tokens
    assert draft.text == tokenizer.decode(new_tokens[:stop_at], skip_special_tokens=True).strip()
    assert draft.finish_reason == "stop"
    assert draft.completion_tokens == stop_at + 1
    assert draft.completion_tokens < budget


def test_messages_keep_instructions_and_data_apart(prompts: PromptSet) -> None:
    messages, labels = prompts.messages(_item())

    assert [m["role"] for m in messages] == ["system", "user"]
    system, user = messages[0]["content"], messages[1]["content"]
    assert system == prompts.system
    for chunk in CHUNKS:
        assert chunk.text not in system
        assert chunk.text in user
    assert "[S1] (Laptops)" in user and "[S2] (Replacement)" in user
    assert "How do I request a new laptop?" in user
    assert labels == {"S1": CHUNKS[0].chunk_id, "S2": CHUNKS[1].chunk_id}


def test_messages_without_sources_say_so(prompts: PromptSet) -> None:
    messages, labels = prompts.messages(_item(chunks=[]))

    assert labels == {}
    assert "(no sources)" in messages[1]["content"]


def test_document_items_use_the_document_prompt(prompts: PromptSet) -> None:
    sources = "\n\n".join(f"[S{i}] ({c.title})\n{c.text}" for i, c in enumerate(CHUNKS, start=1))
    instruction = "How do I request a new laptop?"

    answer_user = prompts.messages(_item())[0][1]["content"]
    document_user = prompts.messages(_item(answer_class=AnswerClass.DOCUMENT))[0][1]["content"]

    assert answer_user == prompts.answer.format(sources=sources, instruction=instruction)
    assert document_user == prompts.document.format(sources=sources, instruction=instruction)
    assert answer_user != document_user


def test_null_generator_is_named_benchmark_only(prompts: PromptSet) -> None:
    null = NullGenerator(prompts)
    drafts = null.generate(GenerationInput(items=[_item("a"), _item("b", chunks=[])])).drafts

    assert "benchmark" in NullGenerator.name
    assert "benchmark" in null.name
    assert "[S1]" in drafts[0].text
    assert drafts[1].text == ABSTAIN_TEXT


def test_decoding_policy_version() -> None:
    assert DecodingPolicy(max_new_tokens=5).version == "greedy-max5"
    assert DecodingPolicy().version == "greedy-max128"
    assert DecodingPolicy(max_new_tokens=5, do_sample=True, temperature=0.7).version \
        == "sample-t0.7-max5"
