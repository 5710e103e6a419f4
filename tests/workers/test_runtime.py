"""What a worker process builds from its settings: backends by configuration, one engine per
model shared by the variants that name it, the generation worker's pool."""

from __future__ import annotations

from pathlib import Path

import pytest

from ops.embedded import worker_pool
from schemas.status import Stage
from tasks.engine.hf import TransformersBackend
from tasks.generation import NullBackend
from tests.services import race
from tests.tasks.engine.conftest import MODEL_DIR
from workers.runtime import Runtime
from workers.settings import Settings

pytestmark = [pytest.mark.unit]


def test_null_backend_by_configuration(tmp_path: Path) -> None:
    runtime = Runtime(Settings(generator_backend="null", data_dir=tmp_path))
    try:
        engine = runtime.engine("small")
        assert isinstance(engine.backend, NullBackend)
        assert runtime.engine("large") is engine  # both variants name the same model
    finally:
        runtime.close()
    assert runtime._engines == {}


def test_openai_backend_by_configuration(tmp_path: Path) -> None:
    from tasks.engine.openai_backend import OpenAIBackend

    settings = Settings(generator_backend="openai", openai_base_url="http://127.0.0.1:9/v1",
                        openai_model="served-model", data_dir=tmp_path,
                        openai_context_window=32768, openai_tokenizer=str(MODEL_DIR))
    runtime = Runtime(settings)
    backend = runtime._backend(settings.generator_model)

    assert isinstance(backend, OpenAIBackend)
    assert backend.kind == "openai" and "served-model" in backend.model_id
    assert (backend.context_window, backend.tokenizer_path) == (32768, str(MODEL_DIR))
    # The router counts with the served model's tokenizer, not the estimate
    assert runtime.count_tokens("How do I roll back a deploy?") == Runtime(Settings(
        data_dir=tmp_path, generator_model=str(MODEL_DIR))).count_tokens(
        "How do I roll back a deploy?")


def test_transformers_backend_per_variant(tmp_path: Path) -> None:
    settings = Settings(generator_model=str(MODEL_DIR), generator_large_model=str(tmp_path),
                        generator_dtype="float32", generator_device="cpu", data_dir=tmp_path)
    runtime = Runtime(settings)
    small = runtime._backend(settings.generator_models()["small"])
    large = runtime._backend(settings.generator_models()["large"])

    assert isinstance(small, TransformersBackend) and isinstance(large, TransformersBackend)
    assert (small.path, large.path) == (MODEL_DIR, tmp_path)
    assert (small.device_name, small.dtype_name) == ("cpu", "float32")


def test_a_missing_model_folder_is_named(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no-such-model"):
        TransformersBackend(str(tmp_path / "no-such-model"))


def test_generation_workers_run_threads(tmp_path: Path) -> None:
    settings = Settings(generation_concurrency=6, data_dir=tmp_path)

    assert worker_pool(settings, Stage.GENERATION, 1) == ("threads", 6)
    assert worker_pool(settings, Stage.RETRIEVAL, 2) == ("prefork", 2)


def test_a_threads_pools_first_tasks_share_one_runtime(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import time

    from workers import runtime as runtime_module

    built: list[Runtime] = []
    build = Runtime.__init__

    def slow_build(self: Runtime, settings: Settings) -> None:  # an injected slow start
        time.sleep(0.2)
        build(self, settings)
        built.append(self)

    monkeypatch.setenv("SLUICE_DATA_DIR", str(tmp_path))
    monkeypatch.setattr(runtime_module, "_runtime", None)
    monkeypatch.setattr(Runtime, "__init__", slow_build)
    got = race(4, runtime_module.get_runtime)

    assert len(built) == 1 and got == built * 4


def test_the_model_libraries_are_imported_on_a_thread_no_time_limit_reaches(
        monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib
    import threading

    from workers import runtime as runtime_module

    importers: list[tuple[str, str]] = []
    real_import = importlib.import_module

    def recording_import(name: str, package: str | None = None) -> object:
        importers.append((name, threading.current_thread().name))
        return real_import(name, package)

    monkeypatch.setattr(runtime_module, "_libraries_thread", None)
    monkeypatch.setattr(runtime_module, "_libraries_loaded", threading.Event())
    monkeypatch.setattr(runtime_module.importlib, "import_module", recording_import)

    # A pool process starts the preload as it starts; its first task waits for it
    runtime_module.preload_libraries()
    runtime_module.wait_for_libraries()
    runtime_module.wait_for_libraries()

    libraries = runtime_module.MODEL_LIBRARIES
    assert {i for i in importers if i[0] in libraries} == {
        (name, "sluice-preload") for name in libraries}


def test_workers_started_by_a_command_get_its_secrets_in_clear(tmp_path: Path) -> None:
    from ops.embedded import worker_env

    settings = Settings(generator_backend="openai", openai_base_url="http://127.0.0.1:9/v1",
                        openai_model="m", openai_api_key="sk-live-0123456789",
                        data_dir=tmp_path)
    keyless = Settings(data_dir=tmp_path, openai_api_key=None)

    assert worker_env(settings)["SLUICE_OPENAI_API_KEY"] == "sk-live-0123456789"
    assert "SLUICE_OPENAI_API_KEY" not in worker_env(keyless)  # not the text "null"


def test_the_routers_token_count_is_of_the_text_as_the_prompt_carries_it(
        tmp_path: Path) -> None:
    runtime = Runtime(Settings(data_dir=tmp_path, generator_model=str(MODEL_DIR)))

    plain = runtime.count_tokens("How do I roll back a deploy?")
    # "<" is "&lt;" in the prompt; "<|im_start|>" is text there, not one special token
    angles = runtime.count_tokens("<" * 100)
    markers = runtime.count_tokens("<|im_start|>" * 10)

    assert 5 <= plain <= 12
    assert angles >= 200 and markers >= 50
