"""Pipeline types the agent can supervise, chosen by the ``type:`` key of each config entry.

Each module named in :data:`PIPELINE_MODULES` provides

* ``Config``: a pydantic model, subclass of ``edge_agent.supervisor.PipelineConfigBase``, with
  ``type: Literal["..."]`` naming the type; and
* ``build(config) -> Pipeline``: make the pipeline object (see ``edge_agent.supervisor``).

The config's ``pipelines:`` list (``AgentConfig.pipelines``, a list of :data:`PipelineEntry`) is
a union discriminated on ``type`` (Frigate picks its detector so): each entry is validated by the
``Config`` of the type it names, and that type's module is imported only then, so a node without
a camera never loads the vision stack; a module's ``build`` may import heavier libraries still.
"""

from __future__ import annotations

import importlib
from functools import cache
from types import ModuleType
from typing import Annotated, Any

from pydantic import PlainValidator
from pydantic_core import PydanticCustomError

from edge_agent.supervisor import Pipeline, PipelineConfigBase

PIPELINE_MODULES: dict[str, str] = {
    "process": "edge_agent.pipelines.process",  # supervise an external command
    "vision": "edge_agent.pipelines.vision",  # a camera: detect, track, zone events
    "hardware": "edge_agent.pipelines.hardware",  # a shelf sensor board over USB serial
    "floor": "edge_agent.pipelines.floor",  # one shop-wide tracker over the ceiling cameras' detection streams
    "fusion": "edge_agent.pipelines.fusion",  # shopper sessions and carts from the shop's tracks and shelf events
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


def pipeline_config(type_name: str) -> type[PipelineConfigBase]:
    """Return the ``Config`` model of one pipeline type (importing its module)."""
    config: type[PipelineConfigBase] = pipeline_module(type_name).Config
    return config


def validate_pipeline_entry(value: Any) -> PipelineConfigBase:
    """Validate one ``pipelines:`` entry with the Config of the type its ``type`` key names.

    Errors are pydantic's own: a missing or unknown ``type`` gives ``union_tag_not_found`` /
    ``union_tag_invalid`` (as a discriminated union does), a bad key the Config's error under
    the entry's location.
    """
    if isinstance(value, PipelineConfigBase):
        return value
    if not isinstance(value, dict):
        raise PydanticCustomError("model_type", "Input should be a mapping of pipeline keys such as 'type' and 'name'")
    tag = value.get("type")
    if tag is None:
        raise PydanticCustomError(
            "union_tag_not_found", "Unable to extract tag using discriminator {discriminator}", {"discriminator": "'type'"}
        )
    if not isinstance(tag, str) or tag not in PIPELINE_MODULES:
        expected = ", ".join(repr(t) for t in PIPELINE_MODULES)
        raise PydanticCustomError(
            "union_tag_invalid",
            "Input tag {tag} found using {discriminator} does not match any of the expected tags: {expected_tags}",
            {"tag": repr(tag), "discriminator": "'type'", "expected_tags": expected},
        )
    return pipeline_config(tag).model_validate(value)


PipelineEntry = Annotated[PipelineConfigBase, PlainValidator(validate_pipeline_entry)]
"""One entry of the config's ``pipelines:`` list: the ``Config`` of the type it names."""


def build_pipeline(config: PipelineConfigBase) -> Pipeline:
    """Build the pipeline a validated config entry describes."""
    pipeline: Pipeline = pipeline_module(config.type).build(config)  # type: ignore[attr-defined]
    return pipeline
