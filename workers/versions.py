"""The version tuple, computed from configuration and file hashes without loading a model."""

from __future__ import annotations

import hashlib
import json
from importlib import metadata
from pathlib import Path

from schemas.versions import VersionTuple
from tasks.files import (
    ROUTER_EXAMPLES_PATH,
    ROUTER_RULES_PATH,
    TEMPLATES_PATH,
    content_hash,
    prompt_paths,
)
from tasks.generation import DecodingPolicy, NullGenerator
from tasks.sanitize import SanitizeAction, SanitizePolicy
from tasks.tools import default_registry
from tasks.validation import validators_version
from workers.settings import Settings

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt")
RUNTIME_PACKAGES = ("sluice", "torch", "transformers", "sentence-transformers", "faiss-cpu",
                    "celery")


def decoding_policy(settings: Settings) -> DecodingPolicy:
    return DecodingPolicy(max_new_tokens=settings.max_new_tokens)


def sanitize_policy(settings: Settings) -> SanitizePolicy:
    return SanitizePolicy(SanitizeAction(settings.sanitize_action), settings.sanitize_threshold)


def current_versions(settings: Settings, index_id: str) -> VersionTuple:
    """Everything but the index is derived from settings and files; the index id is given."""
    return VersionTuple(
        model=model_version(settings),
        prompt=f"prompt-{content_hash(*prompt_paths())}",
        router=router_version(settings),
        index=index_id,
        tool_schemas=default_registry().version,
        validators=f"{validators_version()}+{sanitize_policy(settings).version}",
        decoding=decoding_policy(settings).version,
        runtime=runtime_version(),
    )


def router_version(settings: Settings) -> str:
    """The rules and templates, and the classifier head by its data and parameters."""
    from tasks.router import RouterRules
    from tasks.router_classifier import classifier_version

    head = classifier_version(ROUTER_EXAMPLES_PATH, RouterRules.load().classifier,
                              settings.embedder_model)
    return f"router-{content_hash(ROUTER_RULES_PATH, TEMPLATES_PATH)}+{head}"


def model_version(settings: Settings) -> str:
    if settings.generator_backend == "null":
        return NullGenerator.name
    folder = Path(settings.generator_model)
    return f"{folder.name}@{weights_hash(folder, settings.data_dir / 'weights-hashes.json')}"


def weights_hash(folder: Path, cache_file: Path) -> str:
    """sha256 over the weight files, cached by (path, size, mtime) so it is paid once."""
    files = sorted(p for p in folder.iterdir() if p.suffix in WEIGHT_SUFFIXES) if folder.is_dir() else []
    if not files:
        return "missing"
    key = "|".join(f"{p}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in files)
    cache = json.loads(cache_file.read_text()) if cache_file.exists() else {}
    if key not in cache:
        digest = hashlib.sha256()
        for path in files:
            with path.open("rb") as handle:
                for block in iter(lambda: handle.read(1 << 20), b""):
                    digest.update(block)
        cache[key] = digest.hexdigest()[:16]
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(cache))
        tmp.replace(cache_file)
    return str(cache[key])


def runtime_version() -> str:
    parts = []
    for name in RUNTIME_PACKAGES:
        try:
            parts.append(f"{name}={metadata.version(name)}")
        except metadata.PackageNotFoundError:
            parts.append(f"{name}=absent")
    return ";".join(parts)
