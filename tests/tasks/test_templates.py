"""Loading the document templates checks that each names a known output model."""

from __future__ import annotations

from pathlib import Path

import pytest

from tasks.files import ROUTER_RULES_PATH, TEMPLATES_PATH
from tasks.router import RouterRules
from tasks.templates import TemplateError, load_templates

pytestmark = [pytest.mark.unit]


def _edited(tmp_path: Path, old: str, new: str) -> Path:
    text = TEMPLATES_PATH.read_text(encoding="utf-8")
    assert old in text
    path = tmp_path / "templates.yaml"
    path.write_text(text.replace(old, new, 1), encoding="utf-8")
    return path


def test_each_template_has_its_inputs_instruction_and_model() -> None:
    runbook = load_templates()["runbook_brief"]

    assert runbook.required_inputs == ("service",)
    assert runbook.model.__name__ == "RunbookBrief"
    assert runbook.instruction_for("Paging", {"service": "dispatch-gateway"}).startswith(
        "Write a short operational brief for the service dispatch-gateway about: Paging.")


def test_a_template_naming_an_unknown_model_fails_at_loading(tmp_path: Path) -> None:
    path = _edited(tmp_path, "model: RunbookBrief", "model: RunBook")

    with pytest.raises(TemplateError, match=r"template 'runbook_brief': unknown document model "
                                            r"'RunBook'; known: IncidentSummary, PolicyBrief"):
        load_templates(path)
    with pytest.raises(TemplateError):  # the router reads the same file the same way
        RouterRules.load(ROUTER_RULES_PATH, path)


def test_a_template_without_a_model_fails_at_loading(tmp_path: Path) -> None:
    path = _edited(tmp_path, "  model: PolicyBrief\n", "")

    with pytest.raises(TemplateError, match="template 'policy_brief' lacks model"):
        load_templates(path)
