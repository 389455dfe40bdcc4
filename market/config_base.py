"""Base class of every typed configuration: frozen, unknown keys rejected."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class StrictConfig(BaseModel):
    """Frozen pydantic model that rejects unknown keys (a typo is an error, never a silent default)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
