"""Staged rollouts of releases to the fleet: policy, pure planner, persistent executor, API and CLI.

``policy`` (what the ML engineer asks for) and ``planner`` (``plan_rollout``, pure) decide;
``executor`` does the I/O (database, signed MQTT desired state) and is the only stateful part;
``api`` and ``cli`` expose the same actions. See docs/rollouts.md.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def install(service: Any, settings: Any | None, *, dependencies: Sequence[Any] = ()) -> None:
    """Add the releases/rollouts API to a ``ControllerService``, and the executor when ``settings`` is given.

    ``settings`` is an :class:`~fleet_controller.rollout.executor.ExecutorSettings` (or None: API
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
