"""Output contracts: a registry of names -> pydantic models, and how a draft is parsed into one.

A request's contract is named on its validation item (`contract`), or else chosen by its
answer class. The parsed model says which passages carry claims (`claim_texts()`), so that
the citation and support validators check a document's section bodies and not its headings.
The registry's version is a hash of every contract's name, parser and JSON schema: changing
a model changes the validators' version.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from pydantic import BaseModel, Field, ValidationError, field_validator

from schemas.documents import DocumentModel
from schemas.stages import Reason, ValidationItem
from tasks.files import TEMPLATES_PATH
from tasks.templates import load_templates

# 2: a document's sections are statements of their own (schemas.documents.DocumentModel),
# a check outside the JSON schema, so the schema hash alone would not show it; and a JSON
# document's claims begin at its first body (`claims_offset`), where attribution writes labels.
CONTRACT_VERSION = "contract-2"
MIN_ANSWER_CHARS = 2
_HEADING = re.compile(r"^(#{1,6})\s+(.*\S)\s*$")

Parser = Callable[[str], Any]


@runtime_checkable
class HasClaims(Protocol):
    def claim_texts(self) -> list[str]: ...


class GroundedAnswer(BaseModel):
    """The answer contract: a non-empty text; its sentences cite source labels like [S1]."""

    text: str = Field(min_length=MIN_ANSWER_CHARS)

    @field_validator("text")
    @classmethod
    def _has_words(cls, value: str) -> str:
        if not re.search(r"[^\W\d_]{2}", value):
            raise ValueError("the answer has no words")
        return value

    def claim_texts(self) -> list[str]:
        return [self.text]


def as_text(draft: str) -> dict[str, str]:
    """The whole draft is the `text` field."""
    return {"text": draft.strip()}


def json_object(draft: str) -> Any:
    """The draft is one JSON object (a ```json fence around it is tolerated)."""
    body = re.sub(r"^```(?:json)?\s*|\s*```$", "", draft.strip())
    return json.loads(body)


def markdown_sections(draft: str) -> dict[str, Any]:
    """`# Title` then `## Heading` sections -> {"title", "sections": [{"heading", "body"}]}.

    Text before the first `##` heading (after the title) is a section with an empty heading.
    """
    title, heading = "", ""
    sections: list[dict[str, str]] = []
    body: list[str] = []
    for line in draft.strip().splitlines():
        match = _HEADING.match(line)
        if match and len(match.group(1)) == 1 and not title and not sections and not body:
            title = match.group(2)
        elif match:
            if heading or "".join(body).strip():
                sections.append({"heading": heading, "body": "\n".join(body).strip()})
            heading, body = match.group(2), []
        else:
            body.append(line)
    if heading or "".join(body).strip():
        sections.append({"heading": heading, "body": "\n".join(body).strip()})
    return {"title": title, "sections": sections}


@dataclass(frozen=True)
class Contract:
    """A named output model and the parser that turns a draft's text into its input."""

    name: str
    model: type[BaseModel]
    parse: Parser = as_text

    def check(self, draft: str) -> tuple[BaseModel | None, list[Reason]]:
        """The parsed output, or None and the reasons it does not parse."""
        try:
            raw = self.parse(draft)
        except ValueError as exc:  # json.JSONDecodeError is a ValueError
            return None, [_reason("parse_error", f"The output is not a valid {self.name}: "
                                  f"{_short(str(exc))}.")]
        try:
            return self.model.model_validate(raw), []
        except ValidationError as exc:
            return None, [_reason("invalid", f"The output does not fit the {self.name} contract: "
                                  f"{_where(error['loc'])}{_short(error['msg'], 240)}.")
                          for error in exc.errors()[:5]]

    def fingerprint(self) -> str:
        schema = json.dumps(self.model.model_json_schema(), sort_keys=True)
        return f"{self.name}:{getattr(self.parse, '__name__', repr(self.parse))}:{schema}"


@dataclass
class ContractRegistry:
    """Contracts by name, and the default contract name per answer class."""

    contracts: dict[str, Contract] = field(default_factory=dict)
    by_class: dict[str, str] = field(default_factory=dict)
    # The version hashes every schema; it is asked for on every shard, so it is kept until
    # the next `register`.
    _version: str | None = field(default=None, init=False, repr=False, compare=False)

    @classmethod
    def default(cls, templates: Path = TEMPLATES_PATH) -> ContractRegistry:
        """Answers are cited text; a document is a JSON object of its template's model, under
        a contract named as the template (its validation item names it). A document item that
        names no template falls back to the answer contract."""
        answer = Contract("answer", GroundedAnswer, as_text)
        registry = cls({answer.name: answer}, {"grounded_answer": "answer", "document": "answer",
                                               "tool_lookup": "answer", "clarify": "answer"})
        for template in load_templates(templates).values():
            registry.register(Contract(template.name, template.model, json_object))
        return registry

    def register(self, contract: Contract, classes: Iterable[str] = ()) -> ContractRegistry:
        """Add (or replace) a contract, and make it the default of `classes`."""
        self.contracts[contract.name] = contract
        self.by_class.update({str(c): contract.name for c in classes})
        self._version = None
        return self

    def for_item(self, item: ValidationItem) -> Contract | None:
        name = item.contract or self.by_class.get(str(item.answer_class))
        return self.contracts.get(name) if name else None

    def missing_reason(self, item: ValidationItem) -> Reason:
        name = item.contract or self.by_class.get(str(item.answer_class))
        what = f"no contract named {name!r} is registered" if name else (
            f"no contract is registered for answer class {str(item.answer_class)!r}")
        return _reason("unknown_contract", f"The output cannot be checked: {what}.")

    @property
    def version(self) -> str:
        if self._version is None:
            digest = hashlib.sha256()
            for name in sorted(self.contracts):
                digest.update(self.contracts[name].fingerprint().encode())
            digest.update(json.dumps(self.by_class, sort_keys=True).encode())
            self._version = f"{CONTRACT_VERSION}:{digest.hexdigest()[:8]}"
        return self._version


def claim_passages(parsed: BaseModel, draft: str) -> list[str]:
    """The passages whose sentences must cite sources: the model's own choice, else the draft."""
    return parsed.claim_texts() if _names_claims(type(parsed)) else [draft]


def claims_offset(parsed: BaseModel, draft: str) -> int:
    """Where in the draft a JSON document's claims begin: at its first section body's key, so
    that a title written before the bodies (as schema-constrained decoding writes it), repeating
    a body's sentence, is not taken for that sentence's place."""
    if not isinstance(parsed, DocumentModel):
        return 0
    first = next((name for name in type(parsed).model_fields if name != "title"), None)
    match = None if first is None else re.search(rf'"{re.escape(first)}"\s*:', draft)
    return match.start() if match else 0


@lru_cache(maxsize=256)
def _names_claims(model: type) -> bool:
    """A runtime protocol check inspects the class on every call: once per model class."""
    return issubclass(model, HasClaims)


def _reason(code: str, message: str) -> Reason:
    return Reason(validator="contract", code=code, message=message)


def _where(loc: Iterable[Any]) -> str:
    path = ".".join(str(part) for part in loc)
    return f"field '{path}': " if path else ""


def _short(text: str, limit: int = 120) -> str:
    text = " ".join(text.split()).rstrip(".")
    return text if len(text) <= limit else text[:limit - 1] + "…"
