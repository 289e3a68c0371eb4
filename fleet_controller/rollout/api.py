"""REST API of releases and rollouts: the same actions as the CLI, under /api/v1.

``build_router(engine, dependencies=...)`` returns a router the controller includes through
``service.add_router``; ``dependencies`` (e.g. authentication requiring the ml-engineer role) guard
every route of it. Errors map to status codes a client can act on: 404 unknown release or rollout,
409 a request the current state does not allow (another rollout active, release exists, wrong
transition), 422 an invalid policy or release, each with a ``detail`` sentence naming the fix.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from fastapi import APIRouter, HTTPException
from fastapi.params import Depends
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy.engine import Engine

from fleet_controller.registry.audit import AuditLog
from fleet_controller.rollout.policy import PolicyError, policy_from_dict
from fleet_controller.rollout.releases import ReleaseError, ReleaseSpec, ReleaseStore
from fleet_controller.rollout.store import (
    ACTIONS,
    RolloutError,
    RolloutNotFound,
    list_rollouts,
    request_action,
    rollout_status,
    start_rollout,
)


class StartRollout(BaseModel):
    """Body of POST /api/v1/rollouts."""

    model_config = ConfigDict(extra="forbid")
    release: str = Field(description="Name of an existing release.")
    policy: dict[str, Any] = Field(default_factory=dict, description="Rollout policy (see docs/rollouts.md); empty = defaults.")


class ActionBody(BaseModel):
    """Body of POST /api/v1/rollouts/{id}/{action}."""

    model_config = ConfigDict(extra="forbid")
    reason: str = Field("", max_length=500, description="Why, for the rollout's event log.")


def _release_error(exc: ReleaseError) -> HTTPException:
    return HTTPException(404 if "no release named" in str(exc) else 409, str(exc))


def build_router(engine: Engine, *, dependencies: Sequence[Depends] = ()) -> APIRouter:
    """Return the releases and rollouts router; ``dependencies`` guard every route."""
    router = APIRouter(prefix="/api/v1", tags=["releases and rollouts"], dependencies=list(dependencies))
    releases = ReleaseStore(engine)
    audit = AuditLog(engine)

    @router.post("/releases", status_code=201, summary="Create a release (images pinned by digest)")
    def create_release(spec: ReleaseSpec) -> dict[str, Any]:
        try:
            created = releases.create(spec).model_dump()
        except ReleaseError as exc:
            raise _release_error(exc) from None
        audit.record_here("release.create", spec.name, {"version": spec.version, "images": spec.images})
        return created

    @router.get("/releases", summary="List releases, newest first")
    def get_releases() -> list[dict[str, Any]]:
        return releases.list()

    @router.get("/releases/{name}", summary="One release")
    def get_release(name: str) -> dict[str, Any]:
        try:
            return releases.get(name).model_dump()
        except ReleaseError as exc:
            raise _release_error(exc) from None

    @router.post("/rollouts", status_code=201, summary="Plan and start a rollout of a release")
    def post_rollout(body: StartRollout) -> dict[str, Any]:
        try:
            policy = policy_from_dict(body.policy, "policy")
            started = start_rollout(engine, body.release, policy)
            audit.record_here("rollout.start", f"rollout {started.get('id')}", {"release": body.release, "policy": body.policy})
            return started
        except PolicyError as exc:
            raise HTTPException(422, str(exc)) from None
        except ReleaseError as exc:
            raise _release_error(exc) from None
        except RolloutError as exc:
            raise HTTPException(409, str(exc)) from None

    @router.get("/rollouts", summary="List rollouts, newest first")
    def get_rollouts(limit: int = 50) -> list[dict[str, Any]]:
        return list_rollouts(engine, limit)

    @router.get("/rollouts/{rollout_id}", summary="A rollout with progress per wave and its latest events")
    def get_rollout(rollout_id: int) -> dict[str, Any]:
        try:
            return rollout_status(engine, rollout_id)
        except RolloutNotFound as exc:
            raise HTTPException(404, str(exc)) from None

    @router.post("/rollouts/{rollout_id}/{action}", summary=f"Act on a rollout: {', '.join(ACTIONS)}")
    def act(rollout_id: int, action: str, body: ActionBody | None = None) -> dict[str, Any]:
        try:
            done = request_action(engine, rollout_id, action, body.reason if body else "")
            audit.record_here(f"rollout.{action}", f"rollout {rollout_id}", {"reason": body.reason if body else ""})
            return done
        except RolloutNotFound as exc:
            raise HTTPException(404, str(exc)) from None
        except RolloutError as exc:
            raise HTTPException(409 if action in ACTIONS else 404, str(exc)) from None

    return router
