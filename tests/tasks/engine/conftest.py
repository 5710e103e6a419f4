"""The real default generator, loaded once for the engine tests."""

from __future__ import annotations

from pathlib import Path

import pytest

from tasks.engine.hf import TransformersBackend
from workers.settings import DEFAULT_GENERATOR_NAME

MODEL_DIR = Path.home() / ".cache" / "sluice" / "models" / DEFAULT_GENERATOR_NAME


@pytest.fixture(scope="session")
def hf_backend() -> TransformersBackend:
    if not ((MODEL_DIR / "config.json").exists() and any(MODEL_DIR.glob("*.safetensors"))):
        from ops.models import prepare_default_model

        prepare_default_model(MODEL_DIR)
    backend = TransformersBackend(str(MODEL_DIR), torch_threads=1)
    backend.warm_up()
    return backend
