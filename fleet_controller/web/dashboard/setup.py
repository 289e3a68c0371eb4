"""Wire accounts and the dashboard into a controller: one call for the service, one for tests.

:func:`attach` uses only the controller's documented extension points
(:class:`fleet_controller.host.ControllerHost`: ``add_router``, ``add_dependency``,
``add_worker``, ``bus``), so the controller core knows nothing of this package. The alert worker
is wired by the service itself (:func:`fleet_controller.alerts.install`); the dashboard only
shows its alerts. :func:`build_app` does the same for a bare app (tests, the benchmark) without a service.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from argon2 import PasswordHasher
from fastapi import FastAPI
from prometheus_client import CollectorRegistry

from fleet_controller.alerts.rules import AlertRules
from fleet_controller.host import ControllerHost
from fleet_controller.registry.bus import BusEvent, EventBus
from fleet_controller.registry.read import RegistryReader
from fleet_controller.web.accounts.store import AccountStore
from fleet_controller.web.accounts.web import Auth, announce_initial_admin, build_auth
from fleet_controller.web.admin import admin_router
from fleet_controller.web.app import create_app
from fleet_controller.web.dashboard.live import LiveHub
from fleet_controller.web.dashboard.router import dashboard_router

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Dashboard:
    """The parts :func:`attach` created, for callers that want to reach them (demo, tests)."""

    store: AccountStore
    hub: LiveHub
    auth: Auth


def bus_event_data(ev: BusEvent) -> dict[str, Any]:
    """Return what the browser gets for a bus event: the event's data plus shop, node and time."""
    return {**ev.data, "shop": ev.shop, "node": ev.node, "at": ev.at}


async def forward_bus(bus: EventBus, hub: LiveHub) -> None:
    """Forward every event of the controller's bus to the dashboard's live streams, until cancelled."""
    hub.bind(asyncio.get_running_loop())
    async with bus.subscribe(None) as sub:
        async for ev in sub:
            hub.publish(ev.topic, bus_event_data(ev))


def attach(service: ControllerHost, rules: AlertRules, *, hasher: PasswordHasher | None = None, open_metrics: bool = True,
           secure_cookies: bool | None = None, announce: Callable[[str], None] | None = None) -> Dashboard:
    """Add logins, the guard on every route and the dashboard to a controller service.

    Call before ``service.start()``. On start, if the database has no user, an admin is created
    and its one-time password passed to ``announce`` (default: the log).
    """
    store = AccountStore(service.engine, hasher)
    hub = LiveHub(service.metrics_registry)
    auth = build_auth(store, service.metrics_registry, open_metrics=open_metrics, secure_cookies=secure_cookies)

    async def live() -> None:
        # Runs after the migrations (workers start after them), so the users table exists.
        await asyncio.to_thread(announce_initial_admin, store, announce)
        await forward_bus(service.bus, hub)

    service.add_router(auth.router)
    service.add_router(dashboard_router(service.reader, hub, rules))
    service.add_router(admin_router(store))
    service.add_router(_actions_router(service))
    service.add_dependency(auth.dependency)
    service.add_worker("dashboard-live", live)
    return Dashboard(store, hub, auth)


def _actions_router(service: ControllerHost) -> Any:
    """Return the remote actions' router; commands are signed with the rollout signing key when there is one."""
    from fleet_controller.web.remote_actions import RemoteActions, actions_router

    rollout = getattr(service.settings, "rollout", None)
    return actions_router(RemoteActions(service.engine, service.reader, rollout.signing_key if rollout else None, lambda: service.mqtt))


def build_app(reader: RegistryReader, metrics_registry: CollectorRegistry, store: AccountStore, rules: AlertRules, *,
              hub: LiveHub | None = None, open_metrics: bool = True) -> tuple[FastAPI, LiveHub]:
    """Return the controller app with auth and the dashboard on ``reader``, without a service."""
    hub = hub or LiveHub(metrics_registry)
    auth = build_auth(store, metrics_registry, open_metrics=open_metrics)
    app = create_app(reader, metrics_registry, routers=[auth.router, dashboard_router(reader, hub, rules), admin_router(store)],
                     dependencies=[auth.dependency])
    return app, hub
