"""Remote actions on a shop: restart a pipeline, maintenance on/off, re-send the desired state.

Each action an operator asks for (``POST /api/v1/actions``, or the buttons of the shop page) is a
row of ``remote_actions`` (:mod:`fleet_controller.registry.maintenance`) with its result, and a
line of the audit log. How each one works, and how its result is known:

* **restart_pipeline** (a node): a :class:`~edge_agent.protocol.Command` signed with the
  controller's ed25519 key (the desired-state key, ``rollout.signing_key``), bound to the node
  (``shop``, ``node``), with an expiry and the node's next counter, published on the node's
  ``commands`` topic. The agent verifies it (``commands.public_keys``) and its supervisor
  restarts the pipeline; the row is settled by the node's ``CommandResult`` (same correlation
  id), or marked ``expired`` when none came back before the command expired.
* **maintenance_on / maintenance_off** (a shop, controller-side): the shop's maintenance row;
  while it lasts the rollout executor starts no new update there and its alerts are muted. Done
  at once (``ok``).
* **resend_desired_state** (a shop): the controller renders and signs the shop's current desired
  revision again and publishes it retained on the shop's desired-state topic. The agent verifies
  it like any other and applies it idempotently (an applied revision is reported applied again,
  nothing changes; a failed or unfinished one is applied again). The row is settled by the
  applier's next report on that revision.

Pending rows are settled when someone looks (``GET /api/v1/actions``, the shop page), from what
the registry already holds; no worker and no in-memory state, so any controller replica answers.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from fastapi import APIRouter, Depends, HTTPException, Query, Request
from pydantic import BaseModel, ConfigDict, Field, model_validator
from sqlalchemy import select
from sqlalchemy.engine import Engine
from starlette.concurrency import run_in_threadpool

from edge_agent.protocol import ID_PATTERN, Command, Signature, Topics, b64, encode
from fleet_controller.host import Publisher
from fleet_controller.registry import maintenance as mt
from fleet_controller.registry.audit import AuditLog, request_actor
from fleet_controller.registry.read import NotFound, RegistryReader
from fleet_controller.rollout import manifests
from fleet_controller.rollout.releases import ReleaseError, ReleaseStore, desired_state_for
from fleet_controller.rollout.signing import Signer, key_id, load_private_key
from fleet_controller.rollout.store import DESIRED, OVERLAY_LABEL, load_fleet
from fleet_controller.web.accounts.roles import Permission
from fleet_controller.web.accounts.web import require

COMMAND_TTL_S = 60.0
"""How long a node may take to receive a command (it may be reconnecting); past it the node ignores
the command and the action shows ``expired``. Longer tolerates longer outages, keeps a captured
command replayable for longer (the counter still refuses it)."""
RESULT_GRACE_S = 15.0
"""Extra wait after the expiry for a result still in a node's outbox."""
RESEND_TIMEOUT_S = 900.0
"""How long a re-sent desired state may take to be reported on before the action shows ``expired``."""
MAINTENANCE_DEFAULT_S = 4 * 3600.0
MAINTENANCE_MAX_S = 7 * 86400.0

ActionName = Literal["restart_pipeline", "maintenance_on", "maintenance_off", "resend_desired_state"]


class ActionRequest(BaseModel):
    """Body of ``POST /api/v1/actions``."""

    model_config = ConfigDict(extra="forbid")
    shop: str = Field(pattern=ID_PATTERN, description="The shop.")
    action: ActionName = Field(description="What to do.")
    node: str | None = Field(None, pattern=ID_PATTERN, description="restart_pipeline: the node running the pipeline.")
    pipeline: str | None = Field(None, min_length=1, max_length=64, description="restart_pipeline: the pipeline's name.")
    reason: str = Field("", max_length=500, description="Why, for the shop page and the audit log.")
    duration_s: float = Field(MAINTENANCE_DEFAULT_S, gt=0, le=MAINTENANCE_MAX_S,
                              description="maintenance_on: how long (maintenance always ends by itself; at most 7 days).")

    @model_validator(mode="after")
    def _target(self) -> ActionRequest:
        if self.action == "restart_pipeline" and not (self.node and self.pipeline):
            raise ValueError("restart_pipeline needs node and pipeline: name the node and the pipeline to restart")
        return self


class ActionUnavailable(RuntimeError):
    """The controller cannot do this action (no signing key, no broker connection); the message says what to set."""


class CommandSigner:
    """Sign commands with the controller's ed25519 key (the one that signs desired states)."""

    def __init__(self, key: Ed25519PrivateKey) -> None:
        self._key = key
        self.key_id = key_id(key.public_key())

    @classmethod
    def from_file(cls, path: str | Path) -> CommandSigner:
        """Return a signer for the PEM private key at ``path``."""
        return cls(load_private_key(path))

    def sign(self, cmd: Command) -> Command:
        """Return ``cmd`` with a signature over its signing bytes."""
        unsigned = cmd.model_copy(update={"signature": None})
        return unsigned.model_copy(update={"signature": Signature(key_id=self.key_id, sig=b64(self._key.sign(unsigned.signing_bytes())))})


@dataclass
class RemoteActions:
    """Do remote actions and settle their results; one per controller process."""

    engine: Engine
    reader: RegistryReader
    signing_key: Path | None
    publisher: Callable[[], Publisher | None]
    clock: Callable[[], float] = time.time
    command_ttl_s: float = COMMAND_TTL_S
    manifests_root: Path = manifests.MANIFESTS_ROOT

    def __post_init__(self) -> None:
        self.audit = AuditLog(self.engine, self.clock)
        self._signer: CommandSigner | None = None
        self._state_signer: Signer | None = None

    def _keys(self) -> tuple[CommandSigner, Signer]:
        if self.signing_key is None:
            raise ActionUnavailable("this controller has no signing key: set rollout.signing_key (the key that signs desired states) "
                                    "to send signed commands and desired states")
        if self._signer is None or self._state_signer is None:
            key = load_private_key(self.signing_key)
            self._signer, self._state_signer = CommandSigner(key), Signer(key)
        return self._signer, self._state_signer

    def _publish(self, topic: str, payload: bytes, *, retain: bool) -> None:
        pub = self.publisher()
        if pub is None:
            raise ActionUnavailable("this controller has no broker connection to publish on; run it as 'shopfleet controller'")
        pub.publish_sync(topic, payload, retain=retain, qos=1)

    def _actor(self) -> str:
        who = request_actor()
        return who.actor if who else "system"

    # ----- the actions --------------------------------------------------------------------------

    def do(self, req: ActionRequest) -> mt.RemoteActionView:
        """Do ``req``; return the stored action (pending for commands and re-sends). Raise ``NotFound``/``ActionUnavailable``."""
        shop = self.reader.shop(req.shop)  # NotFound for an unknown shop
        if req.action == "restart_pipeline":
            assert req.node and req.pipeline
            if req.node not in {n.node for n in self.reader.get_shop(shop.id).nodes}:
                raise NotFound(f"shop {req.shop!r} has no node {req.node!r}")
            return self.send_command(req.shop, req.node, "restart_pipeline", {"pipeline": req.pipeline}, reason=req.reason)
        if req.action == "maintenance_on":
            now = self.clock()
            m = mt.set_maintenance(self.engine, req.shop, self._actor(), now, until=now + req.duration_s, reason=req.reason)
            self.audit.record_here("shop.maintenance_on", req.shop, {"until": m.until, "reason": req.reason}, shop=req.shop)
            return mt.add_action(self.engine, shop=req.shop, node=None, action=req.action, args={"until": m.until, "reason": req.reason},
                                 requested_by=self._actor(), now=now, status="ok",
                                 message=f"in maintenance for {req.duration_s / 3600:.1f} h: rollouts hold, alerts muted")
        if req.action == "maintenance_off":
            was = mt.clear_maintenance(self.engine, req.shop)
            self.audit.record_here("shop.maintenance_off", req.shop, {"was_on": was}, shop=req.shop)
            return mt.add_action(self.engine, shop=req.shop, node=None, action=req.action, args={}, requested_by=self._actor(),
                                 now=self.clock(), status="ok", message="maintenance ended" if was else "was not in maintenance")
        return self.resend_desired(req.shop, reason=req.reason)

    def send_command(self, shop: str, node: str, name: str, args: dict[str, Any], *, reason: str = "") -> mt.RemoteActionView:
        """Sign and publish a command to one node; return its pending action."""
        signer, _ = self._keys()
        now = self.clock()
        cmd = signer.sign(Command(name=name, args=args, expires_at=now + self.command_ttl_s, shop=shop, node=node,
                                  counter=mt.next_counter(self.engine, shop, node)))
        action = mt.add_action(self.engine, shop=shop, node=node, action=name, args={**args, "reason": reason} if reason else args,
                               requested_by=self._actor(), now=now, correlation_id=cmd.correlation_id, expires_at=cmd.expires_at)
        self.audit.record_here(f"command.{name}", f"{shop}/{node}", {**args, "correlation_id": cmd.correlation_id,
                                                                      "counter": cmd.counter, "reason": reason}, shop=shop)
        try:
            self._publish(Topics.node(shop, node, "commands"), encode(cmd), retain=False)
        except Exception as exc:
            mt.finish_action(self.engine, action.id, "failed", f"not published: {exc}", self.clock())
            raise
        return action

    def resend_desired(self, shop: str, *, reason: str = "") -> mt.RemoteActionView:
        """Render, sign and publish the shop's current desired revision again; return its pending action."""
        _, signer = self._keys()
        with self.engine.connect() as conn:
            row = conn.execute(select(DESIRED).where(DESIRED.c.shop_id == shop)).first()
            fleet = {f.id: f for f in load_fleet(self.reader, conn) if f.id == shop}
        if row is None:
            raise NotFound(f"shop {shop!r} has no desired state yet: start a rollout that includes it")
        try:
            spec = ReleaseStore(self.engine).get(row.release)
        except ReleaseError as exc:
            raise ActionUnavailable(f"cannot re-send revision {row.revision}: {exc}") from None
        f = fleet.get(shop)
        overlay = (f.labels.get(OVERLAY_LABEL) if f else None) or manifests.DEFAULT_EDGE_OVERLAY
        base = manifests.load_overlay(manifests.edge_overlay_dir(overlay, self.manifests_root))
        state = desired_state_for(shop, spec, row.revision, signer, node_classes=f.node_classes if f else frozenset(), base=base)
        now = self.clock()
        action = mt.add_action(self.engine, shop=shop, node=None, action="resend_desired_state",
                               args={"release": row.release, "revision": row.revision, **({"reason": reason} if reason else {})},
                               requested_by=self._actor(), now=now, revision=row.revision, expires_at=now + RESEND_TIMEOUT_S)
        self.audit.record_here("shop.resend_desired_state", shop, {"release": row.release, "revision": row.revision, "reason": reason},
                               shop=shop)
        try:
            self._publish(Topics.desired(shop), encode(state), retain=True)
        except Exception as exc:
            mt.finish_action(self.engine, action.id, "failed", f"not published: {exc}", self.clock())
            raise
        return action

    # ----- results ------------------------------------------------------------------------------

    def settle(self, shop: str | None = None, limit: int = 20) -> list[mt.RemoteActionView]:
        """Settle pending actions from the stored command results and reports; return the newest actions."""
        now = self.clock()
        rows = mt.list_actions(self.engine, shop=shop, limit=limit)
        changed = False
        for a in rows:
            if a.status != "pending":
                continue
            if a.correlation_id is not None:
                res = self.reader.command_result(a.correlation_id)
                if res is not None:
                    detail = res.result if res.ok else res.error
                    changed |= mt.finish_action(self.engine, a.id, "ok" if res.ok else "failed", _message(detail), now)
                    continue
                if a.expires_at is not None and now > a.expires_at + RESULT_GRACE_S:
                    changed |= mt.finish_action(self.engine, a.id, "expired",
                                                f"no answer from {a.node} within {self.command_ttl_s:.0f} s: offline, or the command "
                                                "expired before it arrived", now)
                continue
            if a.revision is not None:
                rep = self.reader.reported_states([a.shop]).get(a.shop)
                if rep is not None and rep.revision == a.revision and rep.received_at >= a.requested_at and rep.status in ("applied", "failed", "refused"):
                    ok = rep.status == "applied"
                    msg = f"{rep.node}: {rep.status}" + (f": {rep.error}" if rep.error else "")
                    changed |= mt.finish_action(self.engine, a.id, "ok" if ok else "failed", msg, now)
                elif a.expires_at is not None and now > a.expires_at:
                    changed |= mt.finish_action(self.engine, a.id, "expired", f"no report on revision {a.revision} within "
                                                f"{RESEND_TIMEOUT_S:.0f} s", now)
        return mt.list_actions(self.engine, shop=shop, limit=limit) if changed else rows


def _message(detail: Any) -> str:
    if isinstance(detail, dict):
        return ", ".join(f"{k}={v}" for k, v in detail.items())[:2000]
    return str(detail)[:2000]


def actions_router(actions: RemoteActions) -> APIRouter:
    """Return ``/api/v1/actions``: list (with the shop's maintenance) and request remote actions."""
    router = APIRouter(prefix="/api/v1/actions", tags=["remote actions"])

    @router.get("", summary="Recent remote actions of a shop (or all) and the shop's maintenance")
    def list_actions(shop: str | None = Query(None, pattern=ID_PATTERN), limit: int = Query(20, ge=1, le=500)) -> dict[str, Any]:
        rows = actions.settle(shop, limit)
        m = mt.maintenance(actions.engine, shop, actions.clock()) if shop else None
        return {"maintenance": m.as_dict() if m else None, "actions": [a.as_dict() for a in rows]}

    @router.post("", status_code=202, summary="Restart a pipeline, put a shop in maintenance or take it out, re-send its desired state",
                 dependencies=[Depends(require(Permission.ACTIONS))])
    async def post_action(body: ActionRequest, request: Request) -> dict[str, Any]:
        try:
            action = await run_in_threadpool(actions.do, body)
        except NotFound as exc:
            raise HTTPException(404, str(exc)) from None
        except ActionUnavailable as exc:
            raise HTTPException(503, str(exc)) from None
        except TimeoutError as exc:
            raise HTTPException(503, f"the broker did not acknowledge the publish: {exc}; try again") from None
        return action.as_dict()

    return router
