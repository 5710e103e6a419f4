"""Versioned prompt templates and the channels a prompt is built from.

A template is a file under `tasks/prompts/` with a small header (`id`, `version`) and a body;
its identity is `id@version#content-hash`, and the set of identities is the version tuple's
`prompt` component. A prompt keeps its channels apart: system instructions in the system
turn; the user's input, retrieved chunks and tool outputs in tagged blocks of the user turn,
the data ones marked untrusted; on a repair, the rejected draft as the assistant's turn and
the validator feedback in a turn of its own. Text from a data channel is escaped, so it can
neither close its block nor open a role or special token; the draft and the feedback (which
quotes it) are escaped once, keeping entities the model copied from an earlier prompt.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from functools import lru_cache
from html import escape
from pathlib import Path
from typing import Any

from schemas.stages import GenerationItem, RetrievedChunk
from schemas.status import AnswerClass
from tasks.files import PROMPTS_DIR

TEMPLATE_NAMES = ("system", "answer", "document", "document_json", "repair")
_HEADER = re.compile(r"\A---\n(?P<head>.*?)\n---\n(?P<body>.*)\Z", re.S)
# Role markers of chat formats that do not start with "<" (Llama 2, Mistral and kin).
_BRACKET_ROLES = re.compile(r"\[(/?(?:INST|SYS|SYSTEM_PROMPT|AVAILABLE_TOOLS|TOOL_RESULTS)\b)",
                            re.I)
TOOL_DOCUMENT_PREFIX = "tool:"
# `<`, `>`, and an `&` that does not already start an entity (`&lt;`, `&#91;`).
_BARE_SPECIALS = re.compile(r"[<>]|&(?!(?:[a-zA-Z]+|#\d+|#x[0-9a-fA-F]+);)")


class PromptTemplateError(ValueError):
    """A template file without its header, or with a bad one."""


@dataclass(frozen=True)
class PromptTemplate:
    id: str
    version: int
    body: str

    @property
    def content_hash(self) -> str:
        return hashlib.sha256(self.body.encode()).hexdigest()[:12]

    @property
    def identity(self) -> str:
        return f"{self.id}@{self.version}#{self.content_hash}"

    @classmethod
    def read(cls, path: Path) -> PromptTemplate:
        match = _HEADER.match(path.read_text(encoding="utf-8"))
        if match is None:
            raise PromptTemplateError(f"{path}: a template starts with a '---' header "
                                      "holding id and version")
        fields = dict(line.split(":", 1) for line in match["head"].splitlines() if ":" in line)
        try:
            return cls(fields["id"].strip(), int(fields["version"]), match["body"].strip())
        except (KeyError, ValueError) as exc:
            raise PromptTemplateError(f"{path}: the header needs id and an integer version, "
                                      f"got {fields}") from exc


@dataclass(frozen=True)
class PromptTemplates:
    """The templates a generation worker renders prompts with."""

    by_name: dict[str, PromptTemplate]

    @classmethod
    def load(cls, folder: Path = PROMPTS_DIR) -> PromptTemplates:
        return cls({name: PromptTemplate.read(folder / f"{name}.txt") for name in TEMPLATE_NAMES})

    @property
    def version(self) -> str:
        """What the version tuple records: every template's id, version and content hash."""
        joined = ",".join(self.by_name[n].identity for n in TEMPLATE_NAMES)
        return f"prompts-{hashlib.sha256(joined.encode()).hexdigest()[:12]}"

    def messages(self, item: GenerationItem, json_schema: dict[str, Any] | None = None
                 ) -> tuple[list[dict[str, str]], dict[str, str]]:
        """The chat messages for one item, and its source labels (S1..Sn -> chunk id)."""
        labels = {f"S{i}": c.chunk_id for i, c in enumerate(item.chunks, start=1)}
        fields = {"instruction": instruction_block(item.instruction),
                  "sources": sources_block(item.chunks)}
        if json_schema is not None:
            template = self.by_name["document_json"]
            fields["schema"] = json.dumps(json_schema, separators=(",", ":"))
        elif item.answer_class == AnswerClass.DOCUMENT:
            template = self.by_name["document"]
        else:
            template = self.by_name["answer"]
        messages = [{"role": "system", "content": self.by_name["system"].body},
                    {"role": "user", "content": template.body.format(**fields)}]
        if item.feedback:
            messages += [{"role": "assistant", "content": escape_draft(item.previous_draft or "")},
                         {"role": "user", "content": self.by_name["repair"].body.format(
                             feedback=feedback_block(item.feedback))}]
        return messages, labels


@lru_cache(maxsize=4096)  # the same chunks and instructions come back in request after request
def escape_data(text: str) -> str:
    """Untrusted text as inert data: no tag, role marker or special token survives, because
    `<`, `>` and `&` become entities and bracketed role markers lose their bracket."""
    return _BRACKET_ROLES.sub(r"&#91;\1", escape(text, quote=False))


def escape_draft(text: str) -> str:
    """A rejected draft as inert data, escaped once: entities the model copied from an earlier
    escaped prompt are left as they are, so a draft carried through repair rounds does not
    grow a layer of escaping per round (`&lt;` -> `&amp;lt;` -> `&amp;amp;lt;`)."""
    return _BRACKET_ROLES.sub(r"&#91;\1", _BARE_SPECIALS.sub(lambda m: escape(m[0]), text))


@lru_cache(maxsize=4096)
def _attribute(text: str) -> str:
    return escape(" ".join(text.split()), quote=True)


def instruction_block(instruction: str) -> str:
    return f"<instruction>\n{escape_data(instruction)}\n</instruction>"


def sources_block(chunks: list[RetrievedChunk]) -> str:
    """Chunks as labelled, quoted blocks marked untrusted; tool results as tool outputs."""
    if not chunks:
        return '<sources trust="untrusted">(no sources)</sources>'
    blocks = []
    for i, chunk in enumerate(chunks, start=1):
        tag = "tool_output" if chunk.document_id.startswith(TOOL_DOCUMENT_PREFIX) else "source"
        blocks.append(f'<{tag} id="S{i}" title="{_attribute(chunk.title)}" trust="untrusted">\n'
                      f"{escape_data(chunk.text)}\n</{tag}>")
    return '<sources trust="untrusted">\n' + "\n".join(blocks) + "\n</sources>"


def feedback_block(reasons: list[str]) -> str:
    lines = "\n".join(f"- {escape_draft(reason)}" for reason in reasons)  # they quote the draft
    return f"<validator_feedback>\n{lines}\n</validator_feedback>"
