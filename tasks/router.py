"""The router stage: answer class, risk class, model variant, decoding policy, input checks.

The answer class is settled in this order:

1. the refuse rules (rules/router.yaml) match the text: `refuse`. They are a floor that no
   declared field lowers, as they always were for documents;
2. an upstream system declared it: a `document` request, or an answer request's
   `answer_class` field;
3. a question shorter than `min_question_chars`: `clarify`;
4. the trained classifier (tasks.router_classifier), which says `clarify` below its
   confidence threshold; without a classifier, `grounded_answer`.

The class's least risk and the risk rules give the risk class; class and risk choose the
model variant and the decoding policy, from the same versioned YAML.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError

from schemas.stages import (
    DecidedBy,
    ModelVariant,
    Outcome,
    RouteDecision,
    RouteItem,
    RouterInput,
    RouterOutput,
)
from schemas.status import ANSWER_LABELS_VERSION, AnswerClass, RiskClass, Status
from tasks.files import ROUTER_RULES_PATH, TEMPLATES_PATH, content_hash, load_yaml
from tasks.router_classifier import ClassGuess, ClassifierParams, RouterClassifier
from tasks.templates import load_templates
from tasks.textfold import fold
from tasks.tools import plan_tool_call

TokenCounter = Callable[[str], int]
_M = TypeVar("_M", bound=BaseModel)


class RouterRulesError(ValueError):
    """The router's YAML does not describe a complete, consistent rule set."""


@dataclass(frozen=True)
class Rule:
    name: str
    pattern: re.Pattern[str]
    risk: RiskClass


class ClassPolicy(BaseModel):
    """What one answer class means downstream: its least risk, model and decoding."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    risk: RiskClass
    model: dict[RiskClass, ModelVariant] | None
    decoding: str | None

    def model_for(self, risk: RiskClass) -> ModelVariant | None:
        return self.model[risk] if self.model is not None else None


@dataclass(frozen=True)
class RouterRules:
    """The router's rule set, loaded from YAML and named by the files' hash."""

    version: str
    refuse: tuple[Rule, ...]
    risk: tuple[Rule, ...]
    min_question_chars: int
    templates: dict[str, list[str]]
    classes: dict[AnswerClass, ClassPolicy]
    decoding_policies: dict[str, str]
    classifier: ClassifierParams

    @classmethod
    def load(cls, path: Path = ROUTER_RULES_PATH, templates: Path = TEMPLATES_PATH) -> RouterRules:
        data = load_yaml(path)
        decoding = {str(k): str(v) for k, v in (data.get("decoding_policies") or {}).items()}
        return cls(
            version=f"router-{content_hash(path, templates)}",
            refuse=tuple(_rule(r) for r in data.get("refuse", [])),
            risk=tuple(_rule(r) for r in data.get("risk", [])),
            min_question_chars=int(data.get("min_question_chars", 1)),
            templates={k: list(t.required_inputs) for k, t in load_templates(templates).items()},
            classes=_class_policies(path, data, decoding),
            decoding_policies=decoding,
            classifier=_parsed(path, "classifier", ClassifierParams, data.get("classifier") or {}),
        )


def _rule(raw: dict[str, str]) -> Rule:
    return Rule(raw["name"], re.compile(raw["pattern"], re.IGNORECASE), RiskClass(raw["risk"]))


def _class_policies(path: Path, data: dict[str, Any],
                    decoding: dict[str, str]) -> dict[AnswerClass, ClassPolicy]:
    if data.get("labels") != ANSWER_LABELS_VERSION:
        raise RouterRulesError(f"{path} is written for labels {data.get('labels')!r}, the code "
                               f"has {ANSWER_LABELS_VERSION!r}: review its classes")
    raw = data.get("classes") or {}
    wanted = {c.value for c in AnswerClass}
    if set(raw) != wanted:
        raise RouterRulesError(f"{path}: classes must be exactly {sorted(wanted)}, "
                               f"got {sorted(raw)}")
    policies = {AnswerClass(k): _parsed(path, f"classes.{k}", ClassPolicy, v) for k, v in raw.items()}
    for answer_class, policy in policies.items():
        _check_policy(path, answer_class, policy, decoding)
    return policies


def _check_policy(path: Path, answer_class: AnswerClass, policy: ClassPolicy,
                  decoding: dict[str, str]) -> None:
    where = f"{path}: classes.{answer_class.value}"
    if (policy.model is None) != (policy.decoding is None):
        raise RouterRulesError(f"{where}: model and decoding are both null or both set")
    if policy.model is not None and set(policy.model) != set(RiskClass):
        raise RouterRulesError(f"{where}.model needs a variant for each risk class "
                               f"{[r.value for r in RiskClass]}, got {sorted(policy.model)}")
    if policy.decoding is not None and policy.decoding not in decoding:
        raise RouterRulesError(f"{where}.decoding must be one of {sorted(decoding)}, "
                               f"got {policy.decoding!r}")


def _parsed(path: Path, where: str, model: type[_M], raw: Any) -> _M:
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        raise RouterRulesError(f"{path}: {where}: {exc.errors()[0]['msg']} "
                               f"at {exc.errors()[0]['loc']}") from None


# -- routing ------------------------------------------------------------------


def route(batch: RouterInput, rules: RouterRules, count_tokens: TokenCounter,
          max_input_tokens: int, classifier: RouterClassifier | None = None) -> RouterOutput:
    """Decide every item of a shard; one bad item never affects the others.

    The classifier, when given, is asked once for the items that need it; without it,
    undeclared questions default to `grounded_answer`.
    """
    folded = [fold(item.text, lines=False) for item in batch.items]  # what the rules read
    refusals = [_refuse_rule(text, rules) for text in folded]
    asked = [i for i, item in enumerate(batch.items)
             if refusals[i] is None and _needs_classifier(item, folded[i], rules)]
    guesses: dict[int, ClassGuess] = {}
    if classifier is not None and asked:
        found = classifier.classify([batch.items[i].text for i in asked])
        guesses = dict(zip(asked, found, strict=True))
    version = classifier.version if classifier is not None else None
    return RouterOutput(decisions=[
        _route_one(item, folded[i], rules, count_tokens, max_input_tokens, guesses.get(i),
                   version, refusals[i])
        for i, item in enumerate(batch.items)])


def _needs_classifier(item: RouteItem, folded: str, rules: RouterRules) -> bool:
    """Whether the classifier decides the class of an item no refuse rule matched."""
    return _declared_class(item) is None and not _too_short(item, folded, rules)


def _declared_class(item: RouteItem) -> AnswerClass | None:
    return AnswerClass.DOCUMENT if item.kind == "document" else item.answer_class


def _too_short(item: RouteItem, folded: str, rules: RouterRules) -> bool:
    """An answer's question with fewer visible characters (of its `folded` text) than the
    rules ask for."""
    return item.kind == "answer" and len(folded.strip()) < rules.min_question_chars


def _refuse_rule(folded: str, rules: RouterRules) -> Rule | None:
    return next((r for r in rules.refuse if r.pattern.search(folded)), None)


def _route_one(item: RouteItem, folded: str, rules: RouterRules, count_tokens: TokenCounter,
               max_input_tokens: int, guess: ClassGuess | None,
               classifier_version: str | None, refusal: Rule | None) -> RouteDecision:
    """`folded`: the item's text as the rules read it; `refusal`: the first refuse rule it
    matches, if any."""
    if refusal is not None:
        return _refused_by_rule(item, rules, refusal)
    answer_class, decided_by = _answer_class(item, folded, rules, guess)
    policy = rules.classes[answer_class]
    risk_rule = next((r for r in rules.risk if r.pattern.search(folded)), None)
    risk = max(policy.risk, risk_rule.risk if risk_rule else RiskClass.LOW, key=lambda r: r.rank)
    tokens = count_tokens(item.text)
    plan = plan_tool_call(item.text) if answer_class == AnswerClass.TOOL_LOOKUP else None
    decision = RouteDecision(
        request_id=item.request_id, answer_class=answer_class, risk_class=risk,
        rules_version=rules.version, decided_by=decided_by,
        classifier_version=classifier_version if guess else None,
        confidence=round(guess.confidence, 4) if guess else None,
        model_variant=policy.model_for(risk), decoding_policy=policy.decoding,
        matched_rule=risk_rule.name if risk_rule else None, input_tokens=tokens,
        tool_call=plan.model_dump(mode="json") if plan else None)
    problem = (_input_problem(item, folded, rules, tokens, max_input_tokens)
               or _class_outcome(answer_class, decided_by, guess, rules, plan is not None))
    return decision.model_copy(update={"outcome": problem}) if problem else decision


def _refused_by_rule(item: RouteItem, rules: RouterRules, rule: Rule) -> RouteDecision:
    return RouteDecision(
        request_id=item.request_id, answer_class=AnswerClass.REFUSE, risk_class=rule.risk,
        rules_version=rules.version, decided_by="rule", matched_rule=rule.name,
        outcome=Outcome(status=Status.REFUSED, message=f"refused by rule {rule.name}"))


def _answer_class(item: RouteItem, folded: str, rules: RouterRules,
                  guess: ClassGuess | None) -> tuple[AnswerClass, DecidedBy]:
    declared = _declared_class(item)
    if declared is not None:
        return declared, "upstream"
    if _too_short(item, folded, rules):
        return AnswerClass.CLARIFY, "rule"
    if guess is not None:
        return guess.answer_class, "classifier"
    return AnswerClass.GROUNDED_ANSWER, "default"


def _class_outcome(answer_class: AnswerClass, decided_by: DecidedBy, guess: ClassGuess | None,
                   rules: RouterRules, planned: bool) -> Outcome | None:
    """The classes that end a request at the router: refuse, clarify, and a document asked
    for as a question (it has no template to write from)."""
    why = _reason(decided_by, guess)
    if answer_class == AnswerClass.REFUSE:
        return Outcome(status=Status.REFUSED, error_class="ClassifiedRefuse",
                       message=f"refused: {why}")
    if answer_class == AnswerClass.CLARIFY:
        return Outcome(status=Status.NEEDS_CLARIFICATION, error_class="AmbiguousRequest",
                       message=f"the request is too vague to act on ({why}); say what you need")
    if answer_class == AnswerClass.TOOL_LOOKUP and not planned:
        return Outcome(status=Status.NEEDS_CLARIFICATION, error_class="NoToolPlan",
                       message=f"this asks for live data from a system of record ({why}), but "
                               f"no tool fits it: name a ticket (e.g. INC-2057), or ask for "
                               f"the open tickets or the current time")
    if answer_class == AnswerClass.DOCUMENT and decided_by != "upstream":
        return Outcome(status=Status.NEEDS_CLARIFICATION, error_class="DocumentNeedsTemplate",
                       message=f"this reads as a request for a document ({why}): submit it "
                               f"with kind 'document' and one of the templates "
                               f"{sorted(rules.templates)}")
    return None


def _reason(decided_by: DecidedBy, guess: ClassGuess | None) -> str:
    if guess is None:
        return f"decided by {decided_by}"
    return f"classifier's best guess {guess.best.value} at confidence {guess.confidence:.2f}"


def _input_problem(item: RouteItem, folded: str, rules: RouterRules, tokens: int,
                   max_input_tokens: int) -> Outcome | None:
    if tokens > max_input_tokens:
        return Outcome(status=Status.REFUSED, error_class="InputTooLong",
                       message=f"input is {tokens} tokens, the model allows {max_input_tokens}")
    if _too_short(item, folded, rules):
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
    if not fold(item.topic or "").strip():  # "HR" is a topic; "" and "\u200b" are not
        return Outcome(status=Status.NEEDS_CLARIFICATION, error_class="EmptyTopic",
                       message=f"the topic is empty: {item.topic!r}")
    # A blank text is no value: "a summary of  for  " is not what the template asks for.
    missing = [name for name in required if name not in item.inputs
               or (isinstance(item.inputs[name], str) and not item.inputs[name].strip())]
    if missing:
        return Outcome(status=Status.NEEDS_CLARIFICATION, error_class="MissingInputs",
                       message=f"template {item.template!r} needs inputs {missing}")
    return None
