"""Document templates (tasks/rules/templates.yaml): the inputs each one requires, the
instruction it gives the model, and the output model its documents must fit.

Loading checks every template, so a template that names an unknown model (or misses a key)
fails where the file is read, naming the template, and not when its first request arrives.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from schemas.documents import DocumentModel, UnknownDocumentModel, document_model
from tasks.files import TEMPLATES_PATH, load_yaml

_KEYS = ("required_inputs", "instruction", "model")


class TemplateError(ValueError):
    """A templates file that cannot be used: a missing key or an unknown output model."""


@dataclass(frozen=True)
class DocumentTemplate:
    name: str
    required_inputs: tuple[str, ...]
    instruction: str  # a str.format pattern over the inputs and `topic`
    model: type[DocumentModel]

    @property
    def json_schema(self) -> dict[str, Any]:
        return self.model.model_json_schema()

    def instruction_for(self, topic: str, inputs: dict[str, Any]) -> str:
        return self.instruction.format(**{**inputs, "topic": topic})


def load_templates(path: Path = TEMPLATES_PATH) -> dict[str, DocumentTemplate]:
    """Every template of the file, each checked; TemplateError names the first bad one."""
    return {str(name): _template(path, str(name), raw) for name, raw in load_yaml(path).items()}


def _template(path: Path, name: str, raw: Any) -> DocumentTemplate:
    missing = [key for key in _KEYS if not isinstance(raw, dict) or key not in raw]
    if missing:
        raise TemplateError(f"{path}: template {name!r} lacks {', '.join(missing)}")
    try:
        model = document_model(str(raw["model"]))
    except UnknownDocumentModel as exc:
        raise TemplateError(f"{path}: template {name!r}: {exc}") from None
    return DocumentTemplate(name=name, required_inputs=tuple(str(i) for i in raw["required_inputs"]),
                            instruction=str(raw["instruction"]), model=model)
