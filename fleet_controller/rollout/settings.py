"""Settings of the rollout executor: the ``rollout:`` section of the controller config.

Kept apart from the executor so that loading the controller's settings does not import the
executor's dependencies (manifest rendering, schema validation).
"""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field


class ExecutorSettings(BaseModel):
    """Settings of the rollout executor (the ``rollout:`` section of the controller config)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    signing_key: Path = Field(description="PEM ed25519 private key that signs desired states ('shopfleet release keygen' makes one).")
    tick_interval_s: float = Field(2.0, gt=0, le=60, description="Seconds between executor steps; lower reacts faster, costs more queries.")
    lease_ttl_s: float = Field(15.0, gt=0, description="Seconds a controller stays executor without renewing; another takes over after it.")
    republish_after_s: float = Field(30.0, gt=0, description="Re-publish a shop's desired state if it has not reported on it after this long.")
    publish_concurrency: int = Field(
        16, ge=1, le=256, description="Desired states published at once, each waiting for its broker acknowledgement; higher starts a large wave sooner, costs threads."
    )
