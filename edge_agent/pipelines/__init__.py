"""Pipeline types the agent can supervise, chosen by the ``type:`` key of each config entry.

Each module listed in :data:`PIPELINE_MODULES` provides

* ``Config``: a pydantic model, subclass of ``edge_agent.supervisor.PipelineConfigBase``, with
  ``type: Literal["..."]`` naming the type; and
* ``build(config) -> Pipeline``: make the pipeline object (see ``edge_agent.supervisor``).

The config's ``pipelines:`` list is a pydantic union discriminated on ``type`` built from these
modules (Frigate picks its detector so). Modules are imported whenever a config is loaded, so a
module must import cheaply: keep heavy libraries (OpenCV, ONNX Runtime, pyserial) inside
``build``, or a Pi that runs no camera pays their memory for nothing.
"""

from __future__ import annotations

import importlib
from functools import lru_cache
from types import ModuleType
from typing import Annotated, Any, Union

from pydantic import Field

from edge_agent.supervisor import Pipeline, PipelineConfigBase

PIPELINE_MODULES: tuple[str, ...] = (
    "edge_agent.pipelines.process",  # type: process - supervise an external command
    "edge_agent.pipelines.vision",  # type: vision - a camera: detect, track, zone events
    "edge_agent.pipelines.hardware",  # type: hardware - a shelf sensor board over USB serial
)


@lru_cache(maxsize=1)
def pipeline_types() -> dict[str, ModuleType]:
    """Return the module of every pipeline type, by its ``type`` value."""
    types: dict[str, ModuleType] = {}
    for name in PIPELINE_MODULES:
        module = importlib.import_module(name)
        config = module.Config
        if not issubclass(config, PipelineConfigBase):
            raise TypeError(f"{name}.Config must subclass edge_agent.supervisor.PipelineConfigBase")
        for value in config.model_fields["type"].annotation.__args__:  # Literal[...] values
            if value in types:
                raise TypeError(f"pipeline type {value!r} is defined by {types[value].__name__} and {name}")
            types[value] = module
    return types


def config_union() -> Any:
    """Return the discriminated union of every pipeline type's Config, for the agent config."""
    configs = tuple(dict.fromkeys(m.Config for m in pipeline_types().values()))
    return Annotated[Union[configs], Field(discriminator="type")]  # type: ignore[valid-type]


def build_pipeline(config: PipelineConfigBase) -> Pipeline:
    """Build the pipeline a validated config entry describes."""
    return pipeline_types()[config.type].build(config)  # type: ignore[attr-defined]
