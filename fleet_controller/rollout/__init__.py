"""Releases and staged rollouts: releases, manifest rendering, signing, policy, planner, gates, executor.

``releases`` stores what to ship, ``manifests`` renders it per shop and ``signing`` signs the
desired state; ``policy`` (what the ML engineer asks for), ``planner`` (``plan_rollout``) and
``gates`` decide, all pure; ``executor`` applies the pure step of :mod:`.step` to the database
and MQTT; ``api`` and ``cli`` expose the same actions. See docs/rollouts.md.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from fastapi.params import Depends

    from fleet_controller.host import ControllerHost
    from fleet_controller.settings import ExecutorSettings


def install(service: ControllerHost, settings: ExecutorSettings | None, *, dependencies: Sequence[Depends] = ()) -> None:
    """Add the releases/rollouts API to a controller service, and the executor when ``settings`` is given.

    ``settings`` is an :class:`~fleet_controller.settings.ExecutorSettings` (or None: API
    only, e.g. a replica without the signing key). ``dependencies`` (``Depends(...)`` values, e.g.
    requiring the ml-engineer role) guard every route of the router.
    """
    from fleet_controller.rollout.api import build_router
    from fleet_controller.rollout.executor import RolloutExecutor

    service.add_router(build_router(service.engine, dependencies=dependencies))
    if settings is None:
        return
    executor = RolloutExecutor.from_settings(
        service.engine,
        settings,
        lambda topic, payload, retain, qos: service.mqtt.publish_sync(topic, payload, retain=retain, qos=qos),
        instance=service.settings.instance,
        metrics_registry=service.metrics_registry,
    )
    service.app_state["rollout_executor"] = executor
    service.add_worker("rollout-executor", executor.run)
