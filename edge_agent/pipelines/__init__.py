"""Pipeline types the agent can supervise, chosen by the ``type:`` key of each config entry.

Each module named in :data:`PIPELINE_MODULES` provides

* ``Config``: a pydantic model, subclass of ``edge_agent.supervisor.PipelineConfigBase``, with
  ``type: Literal["..."]`` naming the type; and
* ``build(config) -> Pipeline``: make the pipeline object (see ``edge_agent.supervisor``).

The config's ``pipelines:`` list is a pydantic union discriminated on ``type`` (Frigate picks its
detector so), built from the modules of the types the config actually uses: the module of a type
is imported only when a config names it, and its ``build`` may import heavier libraries still.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterable
from functools import cache
from types import ModuleType
from typing import Annotated, Any, Union

from pydantic import Field

from edge_agent.supervisor import Pipeline, PipelineConfigBase

PIPELINE_MODULES: dict[str, str] = {
    "process": "edge_agent.pipelines.process",  # supervise an external command
    "vision": "edge_agent.pipelines.vision",  # a camera: detect, track, zone events
    "hardware": "edge_agent.pipelines.hardware",  # a shelf sensor board over USB serial
}
"""Pipeline ``type`` value -> module providing it. Only the modules of types a config uses are
imported, so a node without a camera never loads the vision stack."""


@cache
def pipeline_module(type_name: str) -> ModuleType:
    """Import and return the module of one pipeline type, checking that it fits the contract."""
    if type_name not in PIPELINE_MODULES:
        raise KeyError(f"unknown pipeline type {type_name!r}: use one of {', '.join(PIPELINE_MODULES)}")
    name = PIPELINE_MODULES[type_name]
    module = importlib.import_module(name)
    config = module.Config
    if not issubclass(config, PipelineConfigBase):
        raise TypeError(f"{name}.Config must subclass edge_agent.supervisor.PipelineConfigBase")
    if config.model_fields["type"].annotation.__args__ != (type_name,):  # Literal[...] values
        raise TypeError(f"{name}.Config must have type: Literal[{type_name!r}], as PIPELINE_MODULES says")
    return module


def pipeline_types() -> dict[str, ModuleType]:
    """Return the module of every pipeline type, by its ``type`` value (imports all of them)."""
    return {t: pipeline_module(t) for t in PIPELINE_MODULES}


def config_union(types: Iterable[str] | None = None) -> Any:
    """Return the discriminated union of the Config of ``types`` (default: every known type)."""
    wanted = [t for t in (PIPELINE_MODULES if types is None else types) if t in PIPELINE_MODULES] or ["process"]
    configs = tuple(dict.fromkeys(pipeline_module(t).Config for t in wanted))
    return Annotated[Union[configs], Field(discriminator="type")]  # type: ignore[valid-type]  # noqa: UP007 - a union built from a tuple at run time


def build_pipeline(config: PipelineConfigBase) -> Pipeline:
    """Build the pipeline a validated config entry describes."""
    return pipeline_module(config.type).build(config)  # type: ignore[attr-defined]
