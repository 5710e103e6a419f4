"""The generation stage: items become prompts in channels, the engine decodes them under the
request's decoding policy, and the completions become drafts with their accounting."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from schemas.stages import Draft, GenerationInput, GenerationOutput, Outcome
from schemas.status import Status
from tasks.engine.types import Completion, DecodingPolicy, GenerationRequest
from tasks.files import HERE, content_hash, load_yaml
from tasks.prompting import PromptTemplates

ABSTAIN_TEXT = "I don't know."
DECODING_PATH = HERE / "rules" / "decoding.yaml"
DEFAULT_POLICY = "grounded-greedy"


class DecodingPolicyError(ValueError):
    """A decoding policy file or name that does not hold together."""


@dataclass(frozen=True)
class DecodingPolicies:
    """The decoding policies by name, each capped at the operator's max_new_tokens."""

    by_name: dict[str, DecodingPolicy]
    source_hash: str
    max_new_tokens_cap: int

    @classmethod
    def load(cls, max_new_tokens_cap: int, path: Path = DECODING_PATH) -> DecodingPolicies:
        raw = load_yaml(path).get("policies") or {}
        if DEFAULT_POLICY not in raw:
            raise DecodingPolicyError(f"{path}: the default policy {DEFAULT_POLICY!r} is missing")
        policies = {}
        for name, fields in raw.items():
            policy = DecodingPolicy(name=name, **fields)
            cap = min(policy.max_new_tokens, max_new_tokens_cap)
            policies[name] = policy.model_copy(update={"max_new_tokens": cap})
        return cls(policies, content_hash(path), max_new_tokens_cap)

    def get(self, name: str | None) -> DecodingPolicy:
        policy = self.by_name.get(name or DEFAULT_POLICY)
        if policy is None:
            raise DecodingPolicyError(f"unknown decoding policy {name!r}; known: "
                                      f"{sorted(self.by_name)}")
        return policy

    @property
    def version(self) -> str:
        return f"decoding-{self.source_hash[:12]}-cap{self.max_new_tokens_cap}"


class Engine(Protocol):
    def generate(self, requests: list[GenerationRequest]) -> list[Completion]: ...


def generate(batch: GenerationInput, engine: Engine, templates: PromptTemplates,
             policies: DecodingPolicies, constrain: bool = True) -> GenerationOutput:
    """One draft per item. A document item with an output schema is decoded under that
    schema when `constrain` is set (and the backend supports it)."""
    deadline = None if batch.deadline_s is None else time.monotonic() + batch.deadline_s
    requests, labels = [], []
    for item in batch.items:
        messages, item_labels = templates.messages(item, item.json_schema)
        policy = policies.get(item.decoding_policy)
        requests.append(GenerationRequest(
            request_id=item.request_id, messages=messages, policy=policy,
            seed=policy.request_seed(f"{item.request_id}:{item.round}"),
            json_schema=item.json_schema if constrain else None, deadline=deadline))
        labels.append(item_labels)
    completions = engine.generate(requests)
    return GenerationOutput(drafts=[_draft(c, r, lab) for c, r, lab
                                    in zip(completions, requests, labels, strict=True)])


def _draft(completion: Completion, request: GenerationRequest, labels: dict[str, str]) -> Draft:
    outcome = None
    if completion.finish_reason == "refused":
        outcome = Outcome(status=Status.FAILED, error_class="TokenBudgetExceeded",
                          message=completion.error or "")
    elif completion.finish_reason == "deadline" and not completion.text:
        outcome = Outcome(status=Status.FAILED, error_class="DeadlineExceeded",
                          message=completion.error or "")
    elif completion.finish_reason == "error":
        outcome = Outcome(status=Status.FAILED, error_class="GenerationError",
                          message=completion.error or "")
    elif completion.finish_reason == "unavailable":  # if the stage's retries did not help
        outcome = Outcome(status=Status.FAILED, error_class="BackendUnavailable",
                          message=completion.error or "")
    return Draft(request_id=completion.request_id, text=completion.text, source_labels=labels,
                 prompt_tokens=completion.prompt_tokens,
                 completion_tokens=completion.completion_tokens,
                 finish_reason=completion.finish_reason, model=completion.model,
                 backend=completion.backend, decoding=request.policy.version, seed=request.seed,
                 constrained=completion.constrained, queue_wait_s=completion.queue_wait_s,
                 batch_size=completion.batch_size, compute_s=completion.compute_s,
                 outcome=outcome)


class NullBackend:
    """Cites the first source without a model. For the orchestration benchmark only."""

    kind = "null"
    model_id = "null-generator-benchmark-only"
    context_window = 1 << 20

    def warm_up(self) -> None:
        return None

    def count_prompt_tokens(self, messages: list[dict[str, str]]) -> int:
        return sum(len(m["content"].split()) for m in messages)

    def kv_bytes_per_token(self) -> int | None:
        return None

    def generate(self, batch: list[GenerationRequest]) -> list[Completion]:
        return [Completion(request_id=r.request_id, finish_reason="stop", backend=self.kind,
                           model=self.model_id, text="Benchmark output [S1]."
                           if 'id="S1"' in r.messages[1]["content"] else ABSTAIN_TEXT)
                for r in batch]

