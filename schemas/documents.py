"""What a generated document must be: one output model per template.

`tasks/rules/templates.yaml` names each template's model (`model: IncidentSummary`). A model
is a `title` and one body string per section, flat and with bounded lengths, so that its JSON
schema stays small enough for a 135M model to fill under a schema constraint within one
decoding budget. Headings are not generated: they are the section fields' titles. Bodies carry
the claims, with source labels like [S1] inside the text; titles and headings carry none.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StringConstraints, model_validator
from pydantic_core import PydanticCustomError

TITLE_MAX_CHARS = 80
BODY_MIN_CHARS = 10
# Four bodies and a title fit in the document policies' 384 new tokens, JSON keys included.
BODY_MAX_CHARS = 240
HEADING_MAX_CHARS = 60
MAX_SECTIONS = 8
# A section says something: a body of fewer words ("Health checks", "Runbook-route-planner")
# is a heading or a name copied into the body, which a source can "support" word for word.
# Words are letters or digits ("Within 24 hours" is three); source labels are not words.
BODY_MIN_WORDS = 3
CITATION_LABEL = re.compile(r"\[([A-Z]\d+)\]")  # a source label, "[S1]": the validators read it too
_WORD = re.compile(r"[^\W_]+(?:[-'.,/:][^\W_]+)*")


class UnknownDocumentName(KeyError):
    """A model or template name that does not exist; the message lists the known ones."""

    def __str__(self) -> str:
        return str(self.args[0])


class UnknownDocumentModel(UnknownDocumentName):
    """A template names a model that does not exist."""


class UnknownTemplate(UnknownDocumentName):
    """A document request names a template that does not exist."""


def _has_words(value: str) -> str:
    if not re.search(r"[^\W\d_]{2}", value):
        raise ValueError("the text has no words")
    return value


Title = Annotated[str, StringConstraints(strip_whitespace=True, min_length=3,
                                         max_length=TITLE_MAX_CHARS), AfterValidator(_has_words)]
Body = Annotated[str, StringConstraints(strip_whitespace=True, min_length=BODY_MIN_CHARS,
                                        max_length=BODY_MAX_CHARS), AfterValidator(_has_words)]


class Section(BaseModel):
    """One section as it renders: a heading and its body."""

    model_config = ConfigDict(frozen=True)
    heading: str = Field(min_length=1, max_length=HEADING_MAX_CHARS)
    body: Body


class Document(BaseModel):
    """Any document as it renders: a title and its sections in order."""

    model_config = ConfigDict(frozen=True)
    title: Title
    sections: list[Section] = Field(min_length=1, max_length=MAX_SECTIONS)

    def claim_texts(self) -> list[str]:
        return [s.body for s in self.sections]


class DocumentModel(BaseModel):
    """Base of the per-template models: a title, then one `Body` field per section whose
    `title` is the section's heading, in the order the sections render."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    title: Title

    def sections(self) -> list[tuple[str, str]]:
        """(heading, body) of each section in render order; a heading is its field's title."""
        return [(info.title or name, getattr(self, name))
                for name, info in type(self).model_fields.items() if name != "title"]

    def as_document(self) -> Document:
        """The same text in the rendered shape. Not checked again: this model was checked when
        it was built, or was built `delivered`, under the rules of an earlier contract."""
        return Document.model_construct(title=self.title, sections=[
            Section.model_construct(heading=heading, body=body)
            for heading, body in self.sections()])

    def claim_texts(self) -> list[str]:
        """Section bodies carry the claims the citation and support validators check."""
        return [body for _, body in self.sections()]

    @classmethod
    def delivered(cls, raw: object) -> DocumentModel | None:
        """`raw` in this model's shape, without its checks: an object of exactly its fields,
        each a string; None for anything else. For rendering a document the validators
        accepted when it was delivered: a later contract's stricter rules must not change how
        an earlier result renders."""
        if not isinstance(raw, dict) or raw.keys() != cls.model_fields.keys() \
                or not all(isinstance(value, str) for value in raw.values()):
            return None
        return cls.model_construct(**{name: value.strip() for name, value in raw.items()})

    @model_validator(mode="after")
    def _sections_say_something_of_their_own(self) -> DocumentModel:
        """Every body is a statement, and no two bodies are the same text: a model that fills
        every section with one sentence has not written the document. All offending sections
        are named in one message, the repair feedback. (A PydanticCustomError keeps pydantic's
        "Value error, " prefix out of it.)"""
        short: list[str] = []
        by_text: dict[str, list[str]] = {}
        for heading, body in self.sections():
            words = _WORD.findall(CITATION_LABEL.sub(" ", body))
            if len(words) < BODY_MIN_WORDS:
                short.append(f"{heading!r} ({len(words)})")
            by_text.setdefault(" ".join(words).casefold(), []).append(repr(heading))
        problems = [f"fewer than {BODY_MIN_WORDS} words in {', '.join(short)}"] if short else []
        problems += [f"the same text in {_and(headings)}" for headings in by_text.values()
                     if len(headings) > 1]
        if problems:
            raise PydanticCustomError("sections_not_statements", "; ".join(problems)
                                      + "; write each section's own part from the sources")
        return self


def _and(items: list[str]) -> str:
    return f"{', '.join(items[:-1])} and {items[-1]}"


class IncidentSummary(DocumentModel):
    """An incident summary: what happened, its impact, root cause and follow-ups."""

    what_happened: Body = Field(title="What happened")
    impact: Body = Field(title="Impact")
    root_cause: Body = Field(title="Root cause")
    follow_ups: Body = Field(title="Follow-ups")


class RunbookBrief(DocumentModel):
    """An operational brief: what the service does, its health checks and first steps."""

    purpose: Body = Field(title="Purpose")
    health_checks: Body = Field(title="Health checks")
    first_steps: Body = Field(title="First steps when it fails")


class PolicyBrief(DocumentModel):
    """A policy brief: who it applies to, its rules and its deadlines."""

    scope: Body = Field(title="Scope")
    rules: Body = Field(title="Rules")
    deadlines: Body = Field(title="Deadlines")


DOCUMENT_MODELS: dict[str, type[DocumentModel]] = {
    model.__name__: model for model in (IncidentSummary, RunbookBrief, PolicyBrief)}


def document_model(name: str) -> type[DocumentModel]:
    """The model a template names; UnknownDocumentModel lists the known ones."""
    try:
        return DOCUMENT_MODELS[name]
    except KeyError:
        raise UnknownDocumentModel(f"unknown document model {name!r}; known: "
                                   f"{', '.join(sorted(DOCUMENT_MODELS))}") from None


def document_from_mapping(raw: Mapping[str, Any]) -> Document:
    """A `Document` from its own shape (`title`, `sections`) or from a template model's fields,
    the model found by its exact set of keys; ValueError when it is neither."""
    if "sections" in raw:
        return Document.model_validate(dict(raw))
    model = next((m for m in DOCUMENT_MODELS.values() if set(m.model_fields) == set(raw)), None)
    if model is None:
        raise ValueError(f"not a document: keys {sorted(raw)} fit no document model")
    return model.model_validate(dict(raw)).as_document()


def document_schema(template: str) -> dict[str, Any]:
    """The JSON schema of a template's documents: what generation decodes under and the
    template's contract validates against."""
    from tasks.templates import load_templates  # the templates file is read by the tasks layer

    templates = load_templates()
    if template not in templates:
        raise UnknownTemplate(f"unknown template {template!r}; known: {', '.join(sorted(templates))}")
    return templates[template].json_schema
