"""The version tuple pinned on every request and recorded on every stage run."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict

from schemas.status import Stage


class VersionTuple(BaseModel):
    """Everything that can change a request's outcome, by id or content hash."""

    model_config = ConfigDict(frozen=True)
    model: str
    prompt: str
    router: str
    index: str
    tool_schemas: str
    validators: str
    decoding: str
    runtime: str

    def drift(self, served: VersionTuple, stage: Stage) -> dict[str, tuple[str, str]]:
        """Components `stage` uses whose served version differs from this pin."""
        return {
            name: (getattr(self, name), getattr(served, name))
            for name in STAGE_COMPONENTS[stage]
            if getattr(self, name) != getattr(served, name)
        }


STAGE_COMPONENTS: dict[Stage, tuple[str, ...]] = {
    Stage.ROUTER: ("router",),
    # validators: the sanitizer of retrieved text; tool_schemas: the tools lookups call
    Stage.RETRIEVAL: ("index", "validators", "tool_schemas"),
    Stage.GENERATION: ("model", "prompt", "decoding"),
    Stage.VALIDATION: ("validators",),
}
