"""What one worker process holds warm: rules, tokenizer, retriever, generator.

Everything loads on first use (`warm_up`), never at import or in `worker_process_init`,
which Celery kills when it blocks for more than a few seconds; a pool process only starts
importing the model libraries there, in a thread (`preload_libraries`).
"""

from __future__ import annotations

import importlib
import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sqlalchemy import select

from schemas.status import Stage
from schemas.versions import VersionTuple
from tasks.embedding import Embedder, embedder_id
from tasks.engine.engine import BatchLimits, GenerationEngine
from tasks.engine.types import Backend, estimated_tokens
from tasks.files import ROUTER_EXAMPLES_PATH
from tasks.generation import DecodingPolicies, NullBackend
from tasks.prompting import PromptTemplates, escape_data
from tasks.retrieval import Retriever
from tasks.router import RouterRules
from tasks.router_classifier import RouterClassifier, ensure_router_head
from tasks.tools import ToolRegistry
from tasks.validators import ValidatorSuite
from workers.cache import Cache, CachedEmbedder, embedder_space, retrieval_cache, vector_cache
from workers.leases import LeaseKeeper
from workers.settings import Settings, settings_from_env
from workers.store.engine import session_scope
from workers.store.models import IndexVersion
from workers.versions import current_versions, decoding_policies, tool_registry

log = logging.getLogger(__name__)

NO_INDEX = "index-none"
ACTIVE_INDEX_TTL_S = 2.0  # an activated index reaches every worker within this time


class NoActiveIndex(RuntimeError):
    """Retrieval was asked to run before any index was built and activated."""


class IndexMismatch(RuntimeError):
    """The active index's vectors come from another embedder than the worker's queries."""


class Runtime:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._rules: RouterRules | None = None
        self._count_tokens: Callable[[str], int] | None = None
        self._retriever: Retriever | None = None
        self._engines: dict[str, GenerationEngine] = {}
        self._engine_lock = threading.Lock()
        self._templates: PromptTemplates | None = None
        self._policies: DecodingPolicies | None = None
        self._embedder: CachedEmbedder | None = None
        self._versions: dict[str, VersionTuple] = {}
        self._active = ActiveIndexCache(settings)
        self._retrieval_cache: Cache | None = None
        self._classifier: RouterClassifier | None = None
        self._validators: ValidatorSuite | None = None
        self._tools: ToolRegistry | None = None
        self.leases = LeaseKeeper()  # renews the leases of this process's stage tasks

    def rules(self) -> RouterRules:
        if self._rules is None:
            self._rules = RouterRules.load()
        return self._rules

    def router_classifier(self) -> RouterClassifier:
        """The trained head over the packaged embedder; trained once into the data dir."""
        if self._classifier is None:
            embedder = self.embedder()
            head = ensure_router_head(ROUTER_EXAMPLES_PATH, self.rules().classifier,
                                      self.settings.router_dir, embedder)
            self._classifier = RouterClassifier(head, embedder)
            self._classifier.warm_up()
        return self._classifier

    def validators(self) -> ValidatorSuite:
        if self._validators is None:
            self._validators = ValidatorSuite.load(self.embedder())
            self._validators.warm_up()
        return self._validators

    def tools(self) -> ToolRegistry:
        if self._tools is None:
            self._tools = tool_registry(self.settings)
        return self._tools

    def embedder(self) -> CachedEmbedder:
        """One embedder for the router, retrieval and the validators, behind the vector cache."""
        if self._embedder is None:
            path = self.settings.embedder_model
            self._embedder = CachedEmbedder(Embedder(path), vector_cache(self.settings),
                                            embedder_space(self.settings))
        return self._embedder

    def count_tokens(self, text: str) -> int:
        if self._count_tokens is None:
            self._count_tokens = self._token_counter()
        return self._count_tokens(text)

    def _token_counter(self) -> Callable[[str], int]:
        """Tokens of a request's text as the prompt carries it: escaped as data (`<` is four
        characters there), special-token strings as the plain text they are."""
        if self.settings.generator_backend == "null":
            return lambda text: len(text.split())
        path = Path(self.settings.generator_model)
        if self.settings.generator_backend == "openai":
            if not self.settings.openai_tokenizer:  # no local tokenizer: over-estimate
                return lambda text: estimated_tokens(escape_data(text))
            path = Path(self.settings.openai_tokenizer)
        from transformers import AutoTokenizer

        folder, gguf = (path.parent, path.name) if path.is_file() else (path, None)
        tokenizer: Any = AutoTokenizer.from_pretrained(folder, gguf_file=gguf)
        return lambda text: len(tokenizer(escape_data(text), add_special_tokens=False,
                                          split_special_tokens=True)["input_ids"])

    def retriever(self) -> Retriever:
        """The retriever over the active index; a newly activated index is picked up here."""
        active = self._active.get()
        if active is None:
            raise NoActiveIndex("no active index: run `sluice index build` first")
        if self._retriever is None or self._retriever.index_id != active.id:
            embedder = self.embedder()
            # An index built by earlier code recorded the embedder's folder and configuration only.
            if active.embedder not in (embedder.space, embedder_id(embedder.model_path)):
                raise IndexMismatch(
                    f"index {active.id} was built with embedder {active.embedder}, and this "
                    f"worker embeds queries with {embedder.space}: build the index with this "
                    f"worker's SLUICE_EMBEDDER_MODEL (`sluice index build`)")
            self._retriever = Retriever(embedder, Path(active.path), active.id)
            self._retriever.warm_up()
        return self._retriever

    def retrieval_cache(self) -> Cache:
        if self._retrieval_cache is None:
            self._retrieval_cache = retrieval_cache(self.settings)
        return self._retrieval_cache

    def engine(self, variant: str | None = None) -> GenerationEngine:
        """The generation engine of a model variant; variants naming the same model share one.
        Loaded on first use (after the worker is ready), once per process."""
        models = self.settings.generator_models()
        model = models.get(variant or "small", models["small"])
        with self._engine_lock:
            if model not in self._engines:
                engine = GenerationEngine(self._backend(model), BatchLimits(
                    kv_budget_bytes=int(self.settings.generator_kv_cache_gib * (1 << 30)),
                    max_batch_size=self.settings.generator_max_batch,
                    gather_s=self.settings.generator_gather_ms / 1000))
                engine.warm_up()
                self._engines[model] = engine
            return self._engines[model]

    def close(self) -> None:
        """Stop the engines' scheduler threads (tests and benchmarks; workers just exit)."""
        with self._engine_lock:
            for engine in self._engines.values():
                engine.close()
            self._engines.clear()

    def _backend(self, model: str) -> Backend:
        settings = self.settings
        if settings.generator_backend == "null":
            return NullBackend()
        if settings.generator_backend == "openai":
            from tasks.engine.openai_backend import OpenAIBackend

            key = settings.openai_api_key.get_secret_value() if settings.openai_api_key else None
            return OpenAIBackend(settings.openai_base_url, settings.openai_model, api_key=key,
                                 timeout_s=settings.openai_timeout_s,
                                 max_concurrency=settings.generator_max_batch,
                                 context_window=settings.openai_context_window,
                                 tokenizer_path=settings.openai_tokenizer or None)
        from tasks.engine.hf import TransformersBackend

        return TransformersBackend(model, device=settings.generator_device,
                                   dtype=settings.generator_dtype,
                                   torch_threads=settings.torch_threads)

    def prompt_templates(self) -> PromptTemplates:
        if self._templates is None:
            self._templates = PromptTemplates.load()
        return self._templates

    def decoding_policies(self) -> DecodingPolicies:
        if self._policies is None:
            self._policies = decoding_policies(self.settings)
        return self._policies

    def served_versions(self, stage: Stage) -> VersionTuple:
        if stage == Stage.RETRIEVAL:
            index_id = self.retriever().index_id
        else:
            active = self._active.get()
            index_id = active.id if active else NO_INDEX
        if index_id not in self._versions:
            self._versions[index_id] = current_versions(self.settings, index_id)
        return self._versions[index_id]


def active_index(settings: Settings) -> IndexVersion | None:
    with session_scope(settings.database_url) as session:
        return session.scalar(select(IndexVersion).where(IndexVersion.active.is_(True)))


class ActiveIndexCache:
    """The active index, re-read at most every `ttl_s`: an activation reaches workers
    within that time without a query on every hop."""

    def __init__(self, settings: Settings, ttl_s: float = ACTIVE_INDEX_TTL_S) -> None:
        self.settings = settings
        self.ttl_s = ttl_s
        self._value: IndexVersion | None = None
        self._read_at = float("-inf")

    def get(self) -> IndexVersion | None:
        now = time.monotonic()
        if now - self._read_at > self.ttl_s:
            self._value, self._read_at = active_index(self.settings), now
        return self._value


def pinned_versions_now(settings: Settings) -> VersionTuple:
    """The tuple admission pins: current files and settings plus the active index."""
    active = active_index(settings)
    return current_versions(settings, active.id if active else NO_INDEX)


# The model libraries every stage's first task imports (the embedder's, the generator's).
# Imported in a task, they can take longer than its soft time limit on a busy machine, and a
# limit that strikes mid-import leaves half-initialised modules behind: the retry in the same
# process then fails for good ("module 'sympy' has no attribute 'core'"). A thread of their
# own imports them instead, where no time limit reaches; a task only waits for it, and a
# limit that strikes while it waits leaves nothing half done.
MODEL_LIBRARIES = ("torch", "transformers", "sentence_transformers")
_libraries_loaded = threading.Event()
_libraries_lock = threading.Lock()
_libraries_thread: threading.Thread | None = None


def preload_libraries() -> None:
    """Start importing `MODEL_LIBRARIES` in a daemon thread, once per process (a pool
    process calls it as it starts)."""
    global _libraries_thread
    with _libraries_lock:
        if _libraries_thread is None:
            _libraries_thread = threading.Thread(target=_import_libraries, daemon=True,
                                                 name="sluice-preload")
            _libraries_thread.start()


def wait_for_libraries() -> None:
    """Block until the model libraries are imported (or failed to: the import that needs
    one then says why)."""
    preload_libraries()
    _libraries_loaded.wait()


def _import_libraries() -> None:
    try:
        for name in MODEL_LIBRARIES:
            importlib.import_module(name)
    except Exception:
        log.exception("preloading the model libraries failed; the stage's own import will say why")
    finally:
        _libraries_loaded.set()


_runtime: Runtime | None = None
_runtime_lock = threading.Lock()


def get_runtime() -> Runtime:
    """This process's runtime, built once: a threads pool's first tasks ask at the same time,
    and a second runtime would load a second copy of the model."""
    global _runtime
    if _runtime is None:
        with _runtime_lock:
            if _runtime is None:
                _runtime = Runtime(settings_from_env())
    return _runtime
