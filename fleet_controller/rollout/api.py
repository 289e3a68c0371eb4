"""REST API of releases and rollouts: the same actions as the CLI, under /api/v1.

``build_router(engine, dependencies=...)`` returns a router the controller includes through
``service.add_router``; ``dependencies`` (e.g. authentication requiring the ml-engineer role) guard
every route of it. Errors map to status codes a client can act on: 404 unknown release or rollout,
409 a request the current state does not allow (another rollout active, release exists, wrong
transition), 422 an invalid policy or release, each with a ``detail`` sentence naming the fix.

Destructive actions are confirmed on the server, not only by a browser dialog: ``abort`` and
``rollback`` need the ``confirm`` token of ``GET /api/v1/rollouts/{id}/{action}/scope``, which
names what the action would touch, and are refused (409) if that scope changed since. Starting a
rollout can be previewed (``POST /api/v1/rollouts/preview``: waves, shops, windows, gates) and
confirmed with the preview's token, refused (409) if the plan moved since.
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
    DESTRUCTIVE,
    RolloutError,
    RolloutNotFound,
    action_scope,
    list_rollouts,
    preview_rollout,
    request_action,
    rollout_status,
    start_rollout,
)


class StartRollout(BaseModel):
    """Body of POST /api/v1/rollouts."""

    model_config = ConfigDict(extra="forbid")
    release: str = Field(description="Name of an existing release.")
    policy: dict[str, Any] = Field(default_factory=dict, description="Rollout policy (see docs/rollouts.md); empty = defaults.")
    confirm: str | None = Field(None, max_length=64, description="Token of POST /api/v1/rollouts/preview: start only if the plan is still that one.")


class PreviewRollout(BaseModel):
    """Body of POST /api/v1/rollouts/preview."""

    model_config = ConfigDict(extra="forbid")
    release: str = Field(description="Name of an existing release.")
    policy: dict[str, Any] = Field(default_factory=dict, description="Rollout policy (see docs/rollouts.md); empty = defaults.")


class ActionBody(BaseModel):
    """Body of POST /api/v1/rollouts/{id}/{action}."""

    model_config = ConfigDict(extra="forbid")
    reason: str = Field("", max_length=500, description="Why, for the rollout's event log.")
    confirm: str | None = Field(None, max_length=64, description="Token of GET .../{action}/scope; required for abort and rollback.")


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

    @router.post("/rollouts/preview", summary="Plan a rollout without starting it: waves, shops, windows, and a token to confirm it")
    def post_preview(body: PreviewRollout) -> dict[str, Any]:
        try:
            return preview_rollout(engine, body.release, policy_from_dict(body.policy, "policy"))
        except PolicyError as exc:
            raise HTTPException(422, str(exc)) from None
        except ReleaseError as exc:
            raise _release_error(exc) from None

    @router.post("/rollouts", status_code=201, summary="Plan and start a rollout of a release")
    def post_rollout(body: StartRollout) -> dict[str, Any]:
        try:
            policy = policy_from_dict(body.policy, "policy")
            started = start_rollout(engine, body.release, policy, confirm=body.confirm)
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

    @router.get("/rollouts/{rollout_id}/{action}/scope", summary="What an action would do now, and the token that confirms it")
    def get_scope(rollout_id: int, action: str) -> dict[str, Any]:
        try:
            return action_scope(engine, rollout_id, action)
        except RolloutNotFound as exc:
            raise HTTPException(404, str(exc)) from None
        except RolloutError as exc:
            raise HTTPException(409 if action in ACTIONS else 404, str(exc)) from None

    @router.post("/rollouts/{rollout_id}/{action}", summary=f"Act on a rollout: {', '.join(ACTIONS)} ({' and '.join(DESTRUCTIVE)} need a confirm token)")
    def act(rollout_id: int, action: str, body: ActionBody | None = None) -> dict[str, Any]:
        confirm = body.confirm if body else None
        if action in DESTRUCTIVE and not confirm:
            raise HTTPException(428, f"'{action}' needs confirmation: GET /api/v1/rollouts/{rollout_id}/{action}/scope, "
                                     "show its scope, then send its token as 'confirm'")
        try:
            done = request_action(engine, rollout_id, action, body.reason if body else "", confirm=confirm)
            audit.record_here(f"rollout.{action}", f"rollout {rollout_id}", {"reason": body.reason if body else ""})
            return done
        except RolloutNotFound as exc:
            raise HTTPException(404, str(exc)) from None
        except RolloutError as exc:
            raise HTTPException(409 if action in ACTIONS else 404, str(exc)) from None

    return router
