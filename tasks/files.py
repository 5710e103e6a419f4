"""The versioned files stages read (rules, templates, prompts) and their content hashes."""

from __future__ import annotations

import hashlib
from functools import lru_cache
from pathlib import Path
from typing import Any

import yaml

HERE = Path(__file__).resolve().parent
ROUTER_RULES_PATH = HERE / "rules" / "router.yaml"
TEMPLATES_PATH = HERE / "rules" / "templates.yaml"
ROUTER_EXAMPLES_PATH = HERE / "rules" / "router_examples.jsonl"
PROMPTS_DIR = HERE / "prompts"


def content_hash(*paths: Path) -> str:
    """A short sha256 over the files' bytes, in the order given."""
    digest = hashlib.sha256()
    for path in paths:
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


@lru_cache(maxsize=4)
def load_yaml(path: Path) -> dict[str, Any]:
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a mapping, got {type(data).__name__}")
    return data


def prompt_paths() -> list[Path]:
    return sorted(PROMPTS_DIR.glob("*.txt")) + [TEMPLATES_PATH]
