"""The version tuple, computed from configuration and file hashes without loading a model."""

from __future__ import annotations

import hashlib
import json
import os
from importlib import metadata
from pathlib import Path

from schemas.versions import VersionTuple
from tasks.files import ROUTER_EXAMPLES_PATH, ROUTER_RULES_PATH, TEMPLATES_PATH, content_hash
from tasks.generation import DecodingPolicies, NullBackend
from tasks.prompting import PromptTemplates
from tasks.sanitize import SanitizeAction, SanitizePolicy
from tasks.tools import ToolRegistry, default_registry
from tasks.validation import validators_version
from workers.settings import Settings

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt")
RUNTIME_PACKAGES = ("sluice", "torch", "transformers", "sentence-transformers", "faiss-cpu",
                    "celery")


def decoding_policies(settings: Settings) -> DecodingPolicies:
    return DecodingPolicies.load(settings.max_new_tokens)


def prompt_version() -> str:
    """The templates (id, version, content hash each) and the document templates' file."""
    return f"{PromptTemplates.load().version}+{content_hash(TEMPLATES_PATH)}"


def sanitize_policy(settings: Settings) -> SanitizePolicy:
    return SanitizePolicy(SanitizeAction(settings.sanitize_action), settings.sanitize_threshold)


def tool_registry(settings: Settings) -> ToolRegistry:
    """The shipped tools under the configured allowlists."""
    return default_registry(settings.tool_allowlists)


def current_versions(settings: Settings, index_id: str) -> VersionTuple:
    """Everything but the index is derived from settings and files; the index id is given."""
    return VersionTuple(
        model=model_version(settings),
        prompt=prompt_version(),
        router=router_version(settings),
        index=index_id,
        tool_schemas=tool_registry(settings).version,
        validators=f"{validators_version()}+{sanitize_policy(settings).version}",
        decoding=decoding_policies(settings).version,
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
    """The backend and the model of each variant, local weights by their hash."""
    if settings.generator_backend == "null":
        return NullBackend.model_id
    if settings.generator_backend == "openai":
        return f"openai:{settings.openai_model}@{settings.openai_base_url}"
    cache = settings.data_dir / "weights-hashes.json"
    small, large = (_local_model(Path(p), cache) for p in settings.generator_models().values())
    where = f"transformers[{settings.generator_device},{settings.generator_dtype}]"
    return f"{where}:{small}" + ("" if large == small else f"|large={large}")


def _local_model(path: Path, cache: Path) -> str:
    folder = path if path.is_dir() else path.parent
    files = None if path.is_dir() else [path]
    return f"{path.name}@{weights_hash(folder, cache, files)}"


def weights_hash(folder: Path, cache_file: Path, files: list[Path] | None = None) -> str:
    """sha256 over the weight files, cached by (path, size, mtime) so it is paid once."""
    if files is None:
        files = sorted(p for p in folder.iterdir()
                       if p.suffix in WEIGHT_SUFFIXES) if folder.is_dir() else []
    files = [p for p in files if p.exists()]
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
        # A name of this process's own: workers warming up together each write the file.
        tmp = cache_file.with_suffix(f".{os.getpid()}.tmp")
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
