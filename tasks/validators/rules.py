"""The validators' deterministic rules, read from tasks/rules/validators.yaml."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from tasks.files import HERE, content_hash
from tasks.validators.text import abstention_pattern

RULES_PATH = HERE / "rules" / "validators.yaml"
PII_KINDS = ("email", "phone", "postal_address", "national_id")


class RulesError(ValueError):
    """The validators' rules file is malformed."""


@dataclass(frozen=True)
class DenyRule:
    pattern: re.Pattern[str]
    why: str


@dataclass(frozen=True)
class ClassRule:
    """What an answer class allows: any output at all, and whether claims must be grounded."""

    forbid_output: bool = False
    grounded: bool = True


@dataclass(frozen=True)
class ValidatorRules:
    abstention: re.Pattern[str]
    abstain_text: str
    deny: tuple[DenyRule, ...] = ()
    pii: tuple[str, ...] = PII_KINDS
    classes: dict[str, ClassRule] = field(default_factory=dict)
    attribute_uncited: bool = False  # cite an uncited claim with the source that supports it
    digest: str = "inline"  # content hash of the file they came from

    @classmethod
    def load(cls, path: Path = RULES_PATH) -> ValidatorRules:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
        if not isinstance(data, dict):
            raise RulesError(f"{path} must hold a mapping, got {type(data).__name__}")
        return cls.from_mapping(data, digest=content_hash(path))

    @classmethod
    def from_mapping(cls, data: dict[str, Any], digest: str = "inline") -> ValidatorRules:
        policy = data.get("policy") or {}
        unknown = sorted(set(policy.get("pii", PII_KINDS)) - set(PII_KINDS))
        if unknown:
            raise RulesError(f"unknown pii kinds {unknown}; known: {list(PII_KINDS)}")
        try:
            deny = tuple(DenyRule(re.compile(d["pattern"], re.IGNORECASE), str(d["why"]))
                         for d in policy.get("deny") or [])
            abstention = abstention_pattern(data["abstention_phrases"])
            classes = {str(name): ClassRule(**(rule or {}))
                       for name, rule in (policy.get("answer_classes") or {}).items()}
        except (KeyError, TypeError, ValueError, re.error) as exc:
            raise RulesError(f"malformed validator rules: {exc!r}") from exc
        return cls(abstention=abstention, abstain_text=str(data.get("abstain_text", "I don't know.")),
                   deny=deny, pii=tuple(policy.get("pii", PII_KINDS)), classes=classes,
                   attribute_uncited=bool(data.get("attribute_uncited", False)), digest=digest)

    def for_class(self, answer_class: str) -> ClassRule:
        return self.classes.get(answer_class, ClassRule())
