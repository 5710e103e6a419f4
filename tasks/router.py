"""The router stage: versioned deterministic rules -> answer class, risk class, input checks."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from schemas.stages import Outcome, RouteDecision, RouteItem, RouterInput, RouterOutput
from schemas.status import AnswerClass, RiskClass, Status
from tasks.files import ROUTER_RULES_PATH, TEMPLATES_PATH, content_hash, load_yaml

TokenCounter = Callable[[str], int]


@dataclass(frozen=True)
class Rule:
    name: str
    pattern: re.Pattern[str]
    risk: RiskClass


@dataclass(frozen=True)
class RouterRules:
    """The router's rule set, loaded from YAML and named by the file's hash."""

    version: str
    refuse: tuple[Rule, ...]
    risk: tuple[Rule, ...]
    min_question_chars: int
    templates: dict[str, list[str]]

    @classmethod
    def load(cls, path: Path = ROUTER_RULES_PATH, templates: Path = TEMPLATES_PATH) -> RouterRules:
        data = load_yaml(path)
        return cls(
            version=f"router-{content_hash(path, templates)}",
            refuse=tuple(_rule(r) for r in data.get("refuse", [])),
            risk=tuple(_rule(r) for r in data.get("risk", [])),
            min_question_chars=int(data.get("min_question_chars", 1)),
            templates={k: list(v["required_inputs"]) for k, v in load_yaml(templates).items()},
        )


def _rule(raw: dict[str, str]) -> Rule:
    return Rule(raw["name"], re.compile(raw["pattern"], re.IGNORECASE), RiskClass(raw["risk"]))


def route(batch: RouterInput, rules: RouterRules, count_tokens: TokenCounter,
          max_input_tokens: int) -> RouterOutput:
    """Decide every item of a shard; one bad item never affects the others."""
    return RouterOutput(
        decisions=[_route_one(item, rules, count_tokens, max_input_tokens) for item in batch.items]
    )


def _route_one(item: RouteItem, rules: RouterRules, count_tokens: TokenCounter,
               max_input_tokens: int) -> RouteDecision:
    answer_class = AnswerClass.DOCUMENT if item.kind == "document" else AnswerClass.GROUNDED_ANSWER
    decision = RouteDecision(request_id=item.request_id, answer_class=answer_class,
                             risk_class=RiskClass.LOW, rules_version=rules.version)
    for rule in rules.refuse:
        if rule.pattern.search(item.text):
            return decision.model_copy(update={
                "answer_class": AnswerClass.REFUSE, "risk_class": rule.risk,
                "matched_rule": rule.name,
                "outcome": Outcome(status=Status.REFUSED, message=f"refused by rule {rule.name}"),
            })
    risk = next((r for r in rules.risk if r.pattern.search(item.text)), None)
    if risk is not None:
        decision = decision.model_copy(update={"risk_class": risk.risk, "matched_rule": risk.name})
    tokens = count_tokens(item.text)
    decision = decision.model_copy(update={"input_tokens": tokens})
    problem = _input_problem(item, rules, tokens, max_input_tokens)
    return decision.model_copy(update={"outcome": problem}) if problem else decision


def _input_problem(item: RouteItem, rules: RouterRules, tokens: int,
                   max_input_tokens: int) -> Outcome | None:
    if tokens > max_input_tokens:
        return Outcome(status=Status.REFUSED, error_class="InputTooLong",
                       message=f"input is {tokens} tokens, the model allows {max_input_tokens}")
    if item.kind == "answer" and len(item.text.strip()) < rules.min_question_chars:
        return Outcome(status=Status.NEEDS_CLARIFICATION, error_class="EmptyQuestion",
                       message=f"the question is empty or shorter than {rules.min_question_chars} "
                               f"characters: {item.text!r}")
    if item.kind == "document":
        return _template_problem(item, rules)
    return None


def _template_problem(item: RouteItem, rules: RouterRules) -> Outcome | None:
    required = rules.templates.get(item.template or "")
    if required is None:
        return Outcome(status=Status.NEEDS_CLARIFICATION, error_class="UnknownTemplate",
                       message=f"template must be one of {sorted(rules.templates)}, "
                               f"got {item.template!r}")
    missing = [name for name in required if name not in item.inputs]
    if missing:
        return Outcome(status=Status.NEEDS_CLARIFICATION, error_class="MissingInputs",
                       message=f"template {item.template!r} needs inputs {missing}")
    return None
