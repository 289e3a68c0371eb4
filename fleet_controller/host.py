"""What a part of the controller that plugs into the service may use of it: typed, as Protocols.

The dashboard, the alert worker and the rollout executor are written against
:class:`ControllerHost`, not against :class:`fleet_controller.service.ControllerService`, so
they never import the composition root that imports them (the layers contract in pyproject.toml
keeps it so) and a test can hand them any object with these members.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from fastapi import APIRouter
from fastapi.params import Depends
from prometheus_client import CollectorRegistry
from sqlalchemy.engine import Engine

from fleet_controller.registry.bus import BusEvent, EventBus
from fleet_controller.registry.read import RegistryReader
from fleet_controller.settings import ControllerSettings


class Publisher(Protocol):
    """The controller's MQTT connection, as far as plug-ins publish on it."""

    def publish_sync(self, topic: str, payload: bytes, *, retain: bool = False, qos: int = 1, timeout: float = 10.0) -> None:
        """Publish and block until the broker acknowledged it; raise on failure."""
        ...


class ShopWriter(Protocol):
    """The part of the single registry writer that operators' requests reach: shop registration, node removal."""

    async def register_shop(
        self, shop: str, *, name: str | None = None, region: str | None = None,
        labels: dict[str, str] | None = None, timezone: str | None = None, applier: str | None = None,
    ) -> None:
        """Create a shop or update its name, region, labels, time zone and applier node, on the writer."""
        ...

    async def remove_node(self, shop: str, node: str) -> BusEvent:
        """Remove a node from the registry, on the writer; raise ``NodeNotRemovable`` (not found, or its shop's applier)."""
        ...


class ControllerHost(Protocol):
    """The extension points of the controller service (see :mod:`fleet_controller.service`)."""

    settings: ControllerSettings
    engine: Engine
    reader: RegistryReader
    bus: EventBus
    metrics_registry: CollectorRegistry
    app_state: dict[str, Any]

    @property
    def mqtt(self) -> Publisher:
        """The broker connection (publish signed desired state and the like)."""
        ...

    def add_worker(self, name: str, coro_fn: Callable[[], Awaitable[None]]) -> None:
        """Run ``coro_fn()`` as a supervised background task."""
        ...

    def add_router(self, router: APIRouter) -> None:
        """Include ``router`` in the API (before start)."""
        ...

    def add_dependency(self, dependency: Depends) -> None:
        """Guard every API route with ``dependency`` (before start)."""
        ...
