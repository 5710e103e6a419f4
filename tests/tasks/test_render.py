"""Rendering validated outputs to Markdown with numbered citations."""

from __future__ import annotations

import pytest

from schemas.documents import RunbookBrief
from tasks.render import SourceRef, render_document, render_markdown

pytestmark = [pytest.mark.unit]

SOURCES = {
    "c1": SourceRef("d-runbook", "Deploy Runbook", "acme/engineering/deploy-runbook.md"),
    "c2": SourceRef("d-runbook", "Deploy Runbook", "acme/engineering/deploy-runbook.md"),
    "c3": SourceRef("d-oncall", "On-call Policy", "acme/engineering/oncall.md"),
}
LABELS = {"S1": "c3", "S2": "c1", "S3": "c2"}


def test_labels_become_numbers_per_document_in_order_of_first_citation() -> None:
    text = "Handoff is Monday [S1]. Deploys need approval [S2][S3]. Rollbacks use the runbook [S3]."
    md = render_markdown(text, LABELS, SOURCES)
    body, sources = md.split("\n\n**Sources**\n\n")
    assert body == "Handoff is Monday [1]. Deploys need approval [2]. Rollbacks use the runbook [2]."
    assert sources.splitlines() == [
        "1. On-call Policy — `acme/engineering/oncall.md` (document `d-oncall`; chunks `c3`)",
        "2. Deploy Runbook — `acme/engineering/deploy-runbook.md` (document `d-runbook`; "
        "chunks `c1`, `c2`)"]


def test_an_unknown_label_is_dropped_and_no_sources_means_no_list() -> None:
    assert render_markdown("I don't know.", {}, {}) == "I don't know.\n"
    assert render_markdown("Odd claim [S9].", LABELS, SOURCES) == "Odd claim.\n"


def test_a_document_renders_title_sections_and_one_numbered_source_list() -> None:
    doc = RunbookBrief(title="Deploys of dispatch-gateway",
                       purpose="Deploys need an approval [S2].",
                       health_checks="Handoff is Monday [S1] and rollbacks use the runbook [S3].",
                       first_steps="Roll back first [S3][S2], then page the owner [S9].")

    md = render_document(doc, LABELS, SOURCES)

    body, sources = md.split("\n\n**Sources**\n\n")
    assert body == ("# Deploys of dispatch-gateway\n\n## Purpose\n\nDeploys need an approval [1].\n\n"
                    "## Health checks\n\nHandoff is Monday [2] and rollbacks use the runbook [1].\n\n"
                    "## First steps when it fails\n\nRoll back first [1], then page the owner.")
    assert sources.splitlines() == [
        "1. Deploy Runbook — `acme/engineering/deploy-runbook.md` (document `d-runbook`; "
        "chunks `c1`, `c2`)",
        "2. On-call Policy — `acme/engineering/oncall.md` (document `d-oncall`; chunks `c3`)"]
    assert render_document(doc.model_dump(), LABELS, SOURCES) == md
    assert render_document(doc.as_document().model_dump(), LABELS, SOURCES) == md


def test_an_uncited_document_has_no_source_list() -> None:
    doc = {"title": "Note", "sections": [{"heading": "Status", "body": "I don't know."}]}

    assert render_document(doc, {}, {}) == "# Note\n\n## Status\n\nI don't know.\n"
