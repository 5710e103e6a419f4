"""JSON-schema constrained decoding with the real SmolLM2 tokenizer (and, for the decoding
loop, the real model): the mask forbids what the schema forbids, accept() refuses it, EOS is
allowed exactly when the JSON is complete, and a greedy loop yields JSON that fits."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from pydantic import BaseModel, ConfigDict, Field

from schemas.documents import document_schema
from tasks.engine.constraint import ConstraintViolation, JsonSchemaConstraints, UnsupportedSchema
from tasks.validators.contract import ContractRegistry
from workers.settings import DEFAULT_GENERATOR_NAME

MODEL_DIR = Path.home() / ".cache" / "sluice" / "models" / DEFAULT_GENERATOR_NAME
MAX_NEW_TOKENS = 120
DOCUMENT_MAX_NEW_TOKENS = 384  # the document decoding policies' budget (tasks/rules/decoding.yaml)


class City(BaseModel):
    """The tiny schema under test."""

    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1, max_length=24)
    population_millions: int = Field(ge=0, le=99)


SCHEMA = City.model_json_schema()


@pytest.fixture(scope="module")
def model_dir() -> Path:
    if not ((MODEL_DIR / "config.json").exists() and any(MODEL_DIR.glob("*.safetensors"))):
        from ops.models import prepare_default_model

        prepare_default_model(MODEL_DIR)
    return MODEL_DIR


@pytest.fixture(scope="module")
def tokenizer(model_dir: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


@pytest.fixture(scope="module")
def vocab_size(model_dir: Path) -> int:
    from transformers import AutoConfig

    return int(AutoConfig.from_pretrained(model_dir).vocab_size)


@pytest.fixture(scope="module")
def constraints(tokenizer: Any, vocab_size: int) -> JsonSchemaConstraints:
    return JsonSchemaConstraints(tokenizer, vocab_size)


def _allowed(constraint: Any, vocab_size: int, padding: int = 0) -> list[int]:
    logits = torch.zeros(vocab_size + padding)
    constraint.mask_logits(logits)
    return torch.isfinite(logits).nonzero().flatten().tolist()


@pytest.mark.unit
def test_the_first_step_allows_only_tokens_that_open_the_object(
        constraints: JsonSchemaConstraints, tokenizer: Any, vocab_size: int) -> None:
    allowed = _allowed(constraints.for_schema(SCHEMA), vocab_size)

    assert allowed and len(allowed) < 50
    assert all(tokenizer.decode([t]).lstrip().startswith("{") for t in allowed)
    assert tokenizer.eos_token_id not in allowed


@pytest.mark.unit
def test_padding_ids_beyond_the_vocabulary_are_forbidden(
        constraints: JsonSchemaConstraints, vocab_size: int) -> None:
    logits = torch.zeros(vocab_size + 64)

    constraints.for_schema(SCHEMA).mask_logits(logits)

    assert torch.isinf(logits[vocab_size:]).all()
    with pytest.raises(ValueError, match="1-D"):
        constraints.for_schema(SCHEMA).mask_logits(torch.zeros(2, vocab_size))


@pytest.mark.unit
def test_accepting_a_forbidden_token_raises(constraints: JsonSchemaConstraints,
                                            tokenizer: Any) -> None:
    constraint = constraints.for_schema(SCHEMA)
    [hello] = tokenizer.encode("hello", add_special_tokens=False)

    with pytest.raises(ConstraintViolation, match=f"token {hello} \\('hello'\\)"):
        constraint.accept(hello)
    with pytest.raises(ConstraintViolation):
        constraint.accept(tokenizer.eos_token_id)  # nothing is complete yet


@pytest.mark.unit
def test_eos_is_allowed_exactly_when_the_json_is_complete(
        constraints: JsonSchemaConstraints, tokenizer: Any, vocab_size: int) -> None:
    # Given a valid compact document fed token by token
    constraint = constraints.for_schema(SCHEMA)
    tokens = tokenizer.encode('{"name":"Lyon","population_millions":2}', add_special_tokens=False)
    eos = tokenizer.eos_token_id
    for token in tokens:
        # Then before the last token EOS is forbidden and the row goes on
        assert not constraint.is_complete()
        assert eos not in _allowed(constraint, vocab_size)
        constraint.accept(token)
    # And after it the row must stop: EOS is the only token left
    assert constraint.is_complete()
    assert _allowed(constraint, vocab_size) == [eos]
    constraint.accept(eos)
    assert constraint.is_complete()


@pytest.mark.unit
def test_a_number_that_may_go_on_is_not_complete(constraints: JsonSchemaConstraints,
                                                 tokenizer: Any) -> None:
    constraint = constraints.for_schema({"type": "integer"})

    constraint.accept(tokenizer.encode("4", add_special_tokens=False)[0])

    assert not constraint.is_complete()  # "4" is valid, but "42" may follow


@pytest.mark.unit
def test_grammars_are_compiled_once_per_schema_and_keep_its_field_order(
        constraints: JsonSchemaConstraints, tokenizer: Any) -> None:
    same = json.loads(json.dumps(SCHEMA))
    reordered = {**SCHEMA, "properties": dict(reversed(SCHEMA["properties"].items()))}

    assert constraints._grammar(SCHEMA) is constraints._grammar(same)
    constraint = constraints.for_schema(reordered)
    for token in tokenizer.encode('{"population_millions":2,"name":"Lyon"}', add_special_tokens=False):
        constraint.accept(token)
    assert constraint.is_complete()
    with pytest.raises(UnsupportedSchema):
        constraints.for_schema({"type": "no-such-type"})


@pytest.fixture(scope="module")
def model(model_dir: Path) -> Any:
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(1)
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


def _prompt(tokenizer: Any, content: str) -> torch.Tensor:
    messages = [{"role": "user", "content": content}]
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                         return_dict=True)["input_ids"]


@pytest.mark.integration
def test_a_greedy_loop_under_the_constraint_writes_json_that_fits(
        model: Any, tokenizer: Any, constraints: JsonSchemaConstraints) -> None:
    prompt = _prompt(tokenizer, "Describe Paris as JSON with its name and population in millions.")

    tokens = _greedy(model, prompt, constraints.for_schema(SCHEMA), tokenizer.eos_token_id)

    text = tokenizer.decode(tokens, skip_special_tokens=True)
    assert len(tokens) < MAX_NEW_TOKENS, text
    City.model_validate(json.loads(text))


@pytest.mark.integration
def test_a_template_schema_yields_json_with_its_fields_in_order_and_in_bounds(
        model: Any, tokenizer: Any, constraints: JsonSchemaConstraints) -> None:
    # Given the policy brief's schema and a prompt in the shape generation sends
    schema = document_schema("policy_brief")
    prompt = _prompt(tokenizer, "Source [S1]: Engineers are on call for one week at a time. Pages "
                                "must be acknowledged within 10 minutes.\n\nWrite a short brief of "
                                "the on-call policy as a JSON object with the keys title, scope, "
                                "rules and deadlines. End each sentence with [S1].")

    # When the model writes it under the constraint, within the document policies' budget
    constraint = constraints.for_schema(schema)
    tokens = _greedy(model, prompt, constraint, tokenizer.eos_token_id, DOCUMENT_MAX_NEW_TOKENS)

    # Then it is complete JSON with the schema's fields in order and every string in bounds;
    # whether its content is any good is the contract's and the validators' call, not a parse error
    text = tokenizer.decode(tokens, skip_special_tokens=True)
    assert constraint.is_complete(), text
    document = json.loads(text)
    assert list(document) == list(schema["properties"])
    assert all(spec["minLength"] <= len(document[key]) <= spec["maxLength"]
               for key, spec in schema["properties"].items())
    _, reasons = ContractRegistry.default().contracts["policy_brief"].check(text)
    assert "parse_error" not in {r.code for r in reasons}


def _greedy(model: Any, prompt: torch.Tensor, constraint: Any, eos: int,
            max_new_tokens: int = MAX_NEW_TOKENS) -> list[int]:
    """Prefill, then one token per step from the KV cache, as the backend's loop does."""
    tokens: list[int] = []
    with torch.inference_mode():
        out = model(input_ids=prompt, use_cache=True)
        for _ in range(max_new_tokens):
            logits = out.logits[0, -1].float()
            constraint.mask_logits(logits)
            token = int(logits.argmax())
            constraint.accept(token)
            if token == eos:
                break
            tokens.append(token)
            if constraint.is_complete():
                break
            out = model(input_ids=torch.tensor([[token]]), cache=out.cache, use_cache=True)
    return tokens
