"""The request contract: one JSONL line per request, as upstream systems submit it."""

from __future__ import annotations

import math
import re
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

_NAME = r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}$"
_VALID_NAME = re.compile(_NAME)


def is_valid_name(name: str) -> bool:
    """Whether `name` may be a tenant or custom id: 1-128 of letters, digits and `_.:-`,
    starting with a letter or digit."""
    return _VALID_NAME.fullmatch(name) is not None


# The answer classes an upstream system may declare for a question. The router takes a
# declared class as given, instead of classifying the text; its refuse rules still apply.
# `document` is declared by `kind`; `refuse` and `clarify` are the router's to decide.
DeclaredAnswerClass = Literal["grounded_answer", "tool_lookup"]


class AnswerRequest(BaseModel):
    """Answer a question: from the tenant's corpus, or from a system of record (`tool_lookup`)."""

    model_config = ConfigDict(extra="forbid")
    kind: Literal["answer"]
    question: str = Field(max_length=20_000)
    answer_class: DeclaredAnswerClass | None = None


# A document's inputs fill a template's blanks: a few short values, not a corpus.
MAX_INPUTS = 32
MAX_INPUT_NAME_CHARS = 64
MAX_INPUT_CHARS = 2_000


class DocumentRequest(BaseModel):
    """Write document `template` about `topic` from `inputs`."""

    model_config = ConfigDict(extra="forbid")
    kind: Literal["document"]
    template: str = Field(min_length=1, max_length=128)
    topic: str = Field(max_length=2_000)
    inputs: dict[str, str | int | float | bool] = Field(default_factory=dict,
                                                         max_length=MAX_INPUTS)

    @field_validator("inputs", mode="before")
    @classmethod
    def _inputs_are_scalars(cls, inputs: Any) -> Any:
        """One message per bad value, instead of one per type it failed to be."""
        if isinstance(inputs, dict):
            for name, value in inputs.items():
                if len(name) > MAX_INPUT_NAME_CHARS:
                    raise ValueError(f"an input's name must be at most {MAX_INPUT_NAME_CHARS} "
                                     f"characters, got one of {len(name)}")
                if isinstance(value, str) and len(value) > MAX_INPUT_CHARS:
                    raise ValueError(f"inputs[{name!r}] must be at most {MAX_INPUT_CHARS} "
                                     f"characters, got {len(value)}")
                if not isinstance(value, str | int | float | bool):
                    raise ValueError(f"inputs[{name!r}] must be a string, number or boolean, "
                                     f"got {type(value).__name__}")
                if isinstance(value, float) and not math.isfinite(value):  # JSON has no NaN
                    raise ValueError(f"inputs[{name!r}] must be a finite number, got {value}")
        return inputs


RequestBody = Annotated[AnswerRequest | DocumentRequest, Field(discriminator="kind")]


class RequestLine(BaseModel):
    """One request: a line of a job file, or one upstream submission."""

    model_config = ConfigDict(extra="forbid")
    custom_id: str = Field(pattern=_NAME)
    tenant: str = Field(pattern=_NAME)
    grants: list[str] = Field(default_factory=list, max_length=64)
    request: RequestBody
    # Strict: a deadline is a JSON number of seconds, not `true` (1.0) or "5".
    deadline_s: float | None = Field(default=None, gt=0, le=7 * 24 * 3600, strict=True,
                                     allow_inf_nan=False)
    idempotency_key: str | None = Field(default=None, min_length=1, max_length=256)

    @field_validator("idempotency_key")
    @classmethod
    def _key_is_not_blank(cls, key: str | None) -> str | None:
        if key is not None and not key.strip():
            raise ValueError(f"idempotency_key must not be blank, got {key!r}")
        return key

    @field_validator("grants")
    @classmethod
    def _grants_are_labels(cls, grants: list[str]) -> list[str]:
        for grant in grants:
            if not grant or len(grant) > 64 or not grant.replace("-", "").replace("_", "").isalnum():
                raise ValueError(f"grants must be short alphanumeric labels, got {grant!r}")
        return sorted(set(grants))

    @property
    def query_text(self) -> str:
        """The text retrieval searches with."""
        body = self.request
        return body.question if isinstance(body, AnswerRequest) else body.topic


class MalformedLine(BaseModel):
    """A job-file line that is not admitted as a request, with the reason: not a valid
    request (`MalformedLine`), or one whose idempotency key an earlier request holds
    (`IdempotencyKeyReused`)."""

    line_no: int
    custom_id: str | None = None  # only a valid one: it is written back into the outputs
    reason: str
    error_class: str = "MalformedLine"


_KINDS = ("answer", "document")  # the `kind` tags of RequestBody


def describe_validation_error(error: ValidationError) -> str:
    """One precise sentence per problem: 'request.question: Field required', named as the
    line names it (pydantic puts the body's kind in the path: 'request.answer.question')."""
    parts = []
    for item in error.errors():
        loc = list(item["loc"])
        if len(loc) > 2 and loc[0] == "request" and loc[1] in _KINDS:
            del loc[1]
        where = ".".join(str(p) for p in loc) or "line"
        parts.append(f"{where}: {item['msg']}")
    return "; ".join(parts)



def parse_request_line(raw: str, line_no: int) -> RequestLine | MalformedLine:
    """Parse one JSONL line into a request, or say exactly why it is not one."""
    import json

    try:
        # The common case in one pass: pydantic reads the JSON itself, in half the time of
        # json.loads and then validating the dict (8.8 against 16 us a line of the
        # benchmark's jobs). A line it rejects goes the long way, which says why.
        return RequestLine.model_validate_json(raw)
    except ValidationError:
        pass
    try:
        data: Any = json.loads(raw)
    except json.JSONDecodeError as exc:
        return MalformedLine(line_no=line_no, reason=f"not valid JSON: {exc.msg} at column {exc.colno}")
    except (ValueError, RecursionError) as exc:  # an integer of over 4,300 digits, deep nesting
        return MalformedLine(line_no=line_no, reason=f"not readable as JSON: {exc}")
    if not isinstance(data, dict):
        return MalformedLine(line_no=line_no,
                             reason=f"a line must be a JSON object, got {type(data).__name__}")
    custom_id = data.get("custom_id")
    if not isinstance(custom_id, str) or not is_valid_name(custom_id):
        custom_id = None  # 10 MB of text or a lone surrogate must not reach the store
    try:
        return RequestLine.model_validate(data)
    except ValidationError as exc:
        return MalformedLine(line_no=line_no, custom_id=custom_id, reason=describe_validation_error(exc))
