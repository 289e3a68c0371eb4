"""Apply path: signature and replay checks, the pure diff, the handler against an in-memory cluster.

Every object the handler sends is validated with the same strict Kubernetes schemas and policy as
``shopfleet manifests validate``: that is what a real API server would have been given.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry

from edge_agent.apply.cluster import InMemoryClusterClient
from edge_agent.apply.diff import HASH_ANNOTATION, ObjectRef, contains, diff, readiness
from edge_agent.apply.errors import ApplyFailed, StateStoreCorrupt
from edge_agent.apply.handler import ApplyMetrics
from edge_agent.apply.plugin import ApplyConfig
from edge_agent.apply.verify import AppliedRecord, RevisionStore, load_public_key
from edge_agent.protocol import (
    DesiredState,
    ReportedState,
    Signature,
    Topics,
    encode,
    parse_downlink,
    parse_message,
)
from fleet_controller.rollout import manifests
from fleet_controller.rollout.signing import Signer, generate_keypair, load_private_key
from tests.support.apply import SHOP, Rig, _forge, _state
from tests.support.wait import wait_for


def _validate_sent(client: InMemoryClusterClient) -> None:
    findings = manifests.validate([manifests.Sourced({k: v for k, v in o.items() if k != "status"}, "sent") for o in client.sent])
    assert findings == [], [f.describe() for f in findings]


# ----- signing and verification ---------------------------------------------------------------


def test_signed_state_survives_the_wire_and_verifies(keys):
    signer, verifier = keys
    state = _state(signer, 1)
    parsed = parse_downlink(Topics.desired(SHOP), encode(state))
    assert isinstance(parsed, DesiredState) and parsed.signature is not None
    verifier.verify(parsed)
    assert parsed.signature.key_id == signer.key_id == verifier.key_ids[0]


def _other_key(state: DesiredState, tmp_path: Path) -> DesiredState:
    generate_keypair(tmp_path / "other.pem")
    return Signer.from_file(tmp_path / "other.pem").sign(state)


def _bad_b64(state: DesiredState) -> DesiredState:
    return state.model_copy(update={"signature": Signature(key_id=state.signature.key_id, sig="!!not base64!!")})


REFUSALS = [
    pytest.param(lambda s, p: s.model_copy(update={"signature": None}), "unsigned", id="unsigned"),
    pytest.param(lambda s, p: _forge(s), "forged", id="content-changed-after-signing"),
    pytest.param(lambda s, p: _bad_b64(s), "forged", id="signature-not-base64"),
    pytest.param(lambda s, p: s.model_copy(update={"revision": s.revision + 1}), "forged", id="revision-bumped-after-signing"),
    pytest.param(_other_key, "unknown_key", id="signed-by-another-key"),
]


@pytest.mark.parametrize("tamper, reason", REFUSALS)
def test_handler_refuses_and_reports_without_touching_the_cluster(tmp_path, keys, tamper, reason):
    signer, verifier = keys
    rig = Rig(tmp_path, verifier)
    report = rig.handler.handle(tamper(_state(signer, 5), tmp_path))
    assert report.status == "refused" and report.error.startswith(reason)
    assert rig.reports == [report]
    assert rig.client.sent == [] and not rig.store.path.exists()
    assert rig.metric("shopfleet_agent_apply_refused_total", reason=reason) == 1


def test_wrong_shop_is_refused(tmp_path, keys):
    signer, verifier = keys
    rig = Rig(tmp_path, verifier)
    report = rig.handler.handle(_state(signer, 1, shop="oslo-2"))
    assert report.status == "refused" and report.error.startswith("wrong_shop")


def test_replay_is_refused_even_after_a_restart(tmp_path, keys):
    signer, verifier = keys
    old, new = _state(signer, 3, "r1"), _state(signer, 4, "r2")
    rig = Rig(tmp_path, verifier)
    assert rig.handler.handle(new).status == "applied"
    rig2 = Rig(tmp_path, verifier, client=rig.client)  # a new agent process, same state file
    report = rig2.handler.handle(old)
    assert report.status == "refused" and report.error.startswith("replay")
    assert rig2.metric("shopfleet_agent_apply_refused_total", reason="replay") == 1
    assert rig2.store.load() == AppliedRecord(4, "r2", "applied")
    assert {o["metadata"]["labels"]["shopfleet.io/release"] for o in rig.client.objects.values()} == {"r2"}


def test_same_revision_again_is_not_reapplied(tmp_path, keys):
    signer, verifier = keys
    rig = Rig(tmp_path, verifier)
    state = _state(signer, 2)
    rig.handler.handle(state)
    sent = len(rig.client.sent)
    again = rig.handler.handle(signer.sign(state))  # re-published after a controller restart
    assert again.status == "applied" and again.error == "already applied" and len(rig.client.sent) == sent
    assert rig.metric("shopfleet_agent_apply_total", outcome="unchanged") == 1


def test_corrupt_state_file_refuses_instead_of_unlocking_replays(tmp_path, keys):
    signer, verifier = keys
    rig = Rig(tmp_path, verifier)
    rig.store.path.parent.mkdir(parents=True)
    rig.store.path.write_text("{not json")
    report = rig.handler.handle(_state(signer, 1))
    assert report.status == "refused" and "state_store" in report.error and rig.client.sent == []


@settings(max_examples=80, deadline=None)
@given(st.binary(max_size=200))
def test_revision_store_parses_garbage_totally(tmp_path_factory, data):
    p = tmp_path_factory.mktemp("store") / "applied.json"
    p.write_bytes(data)
    try:
        rec = RevisionStore(p).load()
    except StateStoreCorrupt as exc:
        assert str(p) in str(exc)
    else:
        assert isinstance(rec.revision, int)


def test_public_key_loader_names_the_fix(tmp_path):
    with pytest.raises(ValueError, match="copy the controller's .pub"):
        load_public_key(b"garbage", "keys/controller.pub")
    generate_keypair(tmp_path / "k.pem")
    with pytest.raises(ValueError, match="copy the controller's .pub"):
        load_public_key((tmp_path / "k.pem").read_bytes(), "k.pem")  # a private key is not a public key
    assert load_private_key(tmp_path / "k.pem")
    assert oct(os.stat(tmp_path / "k.pem").st_mode & 0o777) == "0o600"


# ----- diff -----------------------------------------------------------------------------------


def _obj(kind: str, name: str, managed: bool = True, **extra) -> dict:
    labels = {"app.kubernetes.io/managed-by": "shopfleet", "shopfleet.io/shop": SHOP} if managed else {}
    api = "apps/v1" if kind in ("DaemonSet", "Deployment") else "v1"
    return {"apiVersion": api, "kind": kind, "metadata": {"name": name, "namespace": "shopfleet", "labels": labels}, **extra}


def _live(o: dict) -> dict:
    """``o`` as the cluster holds it after our apply (with our hash annotation)."""
    return diff([o], []).apply[0]


DIFFS = [
    pytest.param([_obj("ConfigMap", "a")], [], ["ConfigMap/shopfleet/a"], [], [], id="new-object-applied"),
    pytest.param([_obj("ConfigMap", "a")], [_live(_obj("ConfigMap", "a"))], [], ["ConfigMap/shopfleet/a"], [], id="same-hash-unchanged"),
    pytest.param([_obj("ConfigMap", "a", data={"x": "2"})], [_live(_obj("ConfigMap", "a", data={"x": "1"}))], ["ConfigMap/shopfleet/a"], [], [], id="changed-applied"),
    pytest.param([], [_live(_obj("DaemonSet", "old"))], [], [], ["DaemonSet/shopfleet/old"], id="managed-leftover-pruned"),
    pytest.param([], [_obj("DaemonSet", "theirs", managed=False)], [], [], [], id="unmanaged-never-pruned"),
    pytest.param(
        [_obj("DaemonSet", "d"), _obj("ConfigMap", "c"), {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "shopfleet"}}],
        [], ["Namespace/shopfleet", "ConfigMap/shopfleet/c", "DaemonSet/shopfleet/d"], [], [], id="dependency-order",
    ),
    pytest.param([], [_live(_obj("ConfigMap", "c")), _live(_obj("DaemonSet", "d"))], [], [], ["DaemonSet/shopfleet/d", "ConfigMap/shopfleet/c"], id="prune-reverse-order"),
]


@pytest.mark.parametrize("desired, live, apply, unchanged, prune", DIFFS)
def test_diff_table(desired, live, apply, unchanged, prune):
    plan = diff(desired, live)
    assert [str(ObjectRef.of(o)) for o in plan.apply] == apply
    assert [str(r) for r in plan.unchanged] == unchanged
    assert [str(r) for r in plan.prune] == prune
    assert all(HASH_ANNOTATION in o["metadata"]["annotations"] for o in plan.apply)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["ConfigMap", "DaemonSet", "Service"]), st.sampled_from("abcdef")), max_size=8, unique=True),
       st.lists(st.tuples(st.sampled_from(["ConfigMap", "DaemonSet", "Service"]), st.sampled_from("abcdef")), max_size=8, unique=True))
def test_diff_partitions_every_object(desired_keys, live_keys):
    desired = [_obj(k, n) for k, n in desired_keys]
    live = [_live(_obj(k, n)) for k, n in live_keys]
    plan = diff(desired, live)
    applied = {ObjectRef.of(o) for o in plan.apply}
    assert applied | set(plan.unchanged) == {ObjectRef.of(o) for o in desired}
    assert not applied & set(plan.unchanged)
    assert set(plan.prune) == {ObjectRef.of(o) for o in live} - {ObjectRef.of(o) for o in desired}


def _ds(gen=2, observed=2, desired=3, updated=3, available=3):
    return {"kind": "DaemonSet", "metadata": {"generation": gen},
            "status": {"observedGeneration": observed, "desiredNumberScheduled": desired, "updatedNumberScheduled": updated, "numberAvailable": available}}


def _deploy(replicas=2, observed=1, updated=2, total=2, available=2, conditions=()):
    return {"kind": "Deployment", "metadata": {"generation": 1}, "spec": {"replicas": replicas},
            "status": {"observedGeneration": observed, "replicas": total, "updatedReplicas": updated, "availableReplicas": available,
                       "conditions": list(conditions)}}


PDE = {"type": "Progressing", "status": "False", "reason": "ProgressDeadlineExceeded", "message": "ReplicaSet x has timed out progressing."}

READY = [
    pytest.param({"kind": "ConfigMap"}, "ready", id="configmap"),
    pytest.param(_ds(observed=1), "pending", id="ds-old-generation"),
    pytest.param(_ds(updated=2), "pending", id="ds-not-all-updated"),
    pytest.param(_ds(available=2), "pending", id="ds-not-all-available"),
    pytest.param(_ds(), "ready", id="ds-ready"),
    pytest.param(_deploy(observed=0), "pending", id="deploy-old-generation"),
    pytest.param(_deploy(available=1), "pending", id="deploy-unavailable"),
    pytest.param(_deploy(total=3), "pending", id="deploy-old-replica-still-running"),
    pytest.param(_deploy(updated=1, available=1, conditions=[PDE]), "failed", id="deploy-progress-deadline-exceeded"),
    pytest.param(_deploy(), "ready", id="deploy-ready"),
    pytest.param({"kind": "CustomResourceDefinition", "status": {"conditions": [{"type": "Established", "status": "False"}]}}, "pending", id="crd-not-established"),
    pytest.param({"kind": "CustomResourceDefinition", "status": {"conditions": [{"type": "Established", "status": "True"}]}}, "ready", id="crd-established"),
]


@pytest.mark.parametrize("obj, state", READY)
def test_readiness_table(obj, state):
    assert readiness(obj).state == state


def test_prune_never_touches_namespaces_crds_or_the_protected_agent():
    ns = _live({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "shopfleet", "labels": _obj("ConfigMap", "x")["metadata"]["labels"]}})
    crd = _live({"apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
                 "metadata": {"name": "things.shopfleet.io", "labels": _obj("ConfigMap", "x")["metadata"]["labels"]}})
    agent, other = _live(_obj("DaemonSet", "shopfleet-agent")), _live(_obj("DaemonSet", "old"))
    plan = diff([], [ns, crd, agent, other], protect=[ObjectRef.of(agent)])
    assert [str(r) for r in plan.prune] == ["DaemonSet/shopfleet/old"]


CONTAINS = [
    pytest.param({"a": 1, "b": {"c": [1, 2]}, "extra": 3}, {"a": 1, "b": {"c": [1, 2]}}, True, id="server-added-fields-ignored"),
    pytest.param({"a": 2}, {"a": 1}, False, id="changed-value"),
    pytest.param({"b": {}}, {"b": {"c": 1}}, False, id="missing-field"),
    pytest.param({"l": [{"x": 1, "d": 0}]}, {"l": [{"x": 1}]}, True, id="defaulted-field-in-list-item"),
    pytest.param({"l": [{"x": 1}, {"x": 2}]}, {"l": [{"x": 1}]}, False, id="extra-list-item"),
]


@pytest.mark.parametrize("live, want, expected", CONTAINS)
def test_drift_check_contains(live, want, expected):
    assert contains(live, want) is expected


# ----- handler against the in-memory cluster -------------------------------------------------


def test_apply_then_upgrade_prunes_and_every_sent_object_is_valid(tmp_path, keys):
    signer, verifier = keys
    rig = Rig(tmp_path, verifier)
    first = rig.handler.handle(_state(signer, 1, "r1", classes=frozenset({"pi", "gpu"})))
    assert first.status == "applied", first.error
    assert [r.status for r in rig.reports] == ["applying", "applied"]
    assert {o.status for o in first.objects} == {"applied", "ready"}
    assert any(r.name == "vision-gpu" for r in rig.client.objects)
    # The GPU node left the shop: the next revision has no vision-gpu; it is pruned.
    second = rig.handler.handle(_state(signer, 2, "r2", classes=frozenset({"pi"})))
    assert second.status == "applied", second.error
    assert not any(r.name == "vision-gpu" for r in rig.client.objects)
    assert any(o.name == "vision-gpu" and o.status == "pruned" for o in second.objects)
    assert {o["metadata"]["labels"]["shopfleet.io/revision"] for o in rig.client.objects.values()} == {"2"}
    _validate_sent(rig.client)
    assert rig.metric("shopfleet_agent_applied_revision") == 2
    # The report fits the wire protocol.
    msg = second.to_message(SHOP, "gpu-1", "e1", 7)
    assert parse_message(Topics.reported(SHOP, "gpu-1"), encode(msg)).revision == 2


def test_rejected_object_fails_and_keeps_what_runs(tmp_path, keys):
    signer, verifier = keys
    rig = Rig(tmp_path, verifier)
    rig.handler.handle(_state(signer, 1, "r1"))
    before = dict(rig.client.objects)
    rig.client._reject = lambda o: "admission webhook denied" if o["kind"] == "DaemonSet" and o["metadata"]["name"] == "vision-arm64" else None
    report = rig.handler.handle(_state(signer, 2, "r2", classes=frozenset({"pi"})))
    assert report.status == "failed" and "vision-arm64" in report.error
    failed = [o for o in report.objects if o.status == "failed"]
    assert [o.name for o in failed] == ["vision-arm64"] and "webhook" in failed[0].message
    assert ObjectRef("apps/v1", "DaemonSet", "shopfleet", "vision-gpu") in rig.client.objects  # no prune after a failure
    assert set(before) <= set(rig.client.objects)
    assert rig.store.load().status == "failed"
    # The same revision, delivered again, is retried (it failed), not skipped.
    rig.client._reject = None
    assert rig.handler.handle(_state(signer, 2, "r2", classes=frozenset({"pi"}))).status == "applied"


def test_workload_never_ready_fails_after_timeout(tmp_path, keys):
    signer, verifier = keys
    clock = [0.0]
    rig = Rig(tmp_path, verifier, ready_timeout_s=30, poll_interval_s=5, clock=lambda: clock[0], sleep=lambda s: clock.__setitem__(0, clock[0] + s))
    rig.client.hold.add("vision-arm64")
    report = rig.handler.handle(_state(signer, 1))
    assert report.status == "failed" and "not ready" in report.error and "vision-arm64" in report.error
    pending = [o for o in report.objects if o.status == "pending"]
    assert [o.name for o in pending] == ["vision-arm64"] and "0 of 3" in pending[0].message
    assert clock[0] >= 30


def test_apply_failed_error_type_from_client():
    c = InMemoryClusterClient(reject=lambda o: "nope")
    with pytest.raises(ApplyFailed, match="nope"):
        c.apply(_obj("ConfigMap", "x"))


# ----- docs -----------------------------------------------------------------------------------

APPLY_DOC = (Path(__file__).resolve().parents[2] / "docs" / "apply.md").read_text()


@pytest.mark.parametrize("key", sorted(ApplyConfig.model_fields))
def test_every_apply_config_key_documented(key):
    assert f"`apply.{key}`" in APPLY_DOC


def test_every_apply_metric_and_status_documented():
    registry = CollectorRegistry()
    ApplyMetrics(registry)
    for metric in registry.collect():
        name = metric.name if f"`{metric.name}`" in APPLY_DOC else f"{metric.name}_total"
        assert f"`{name}`" in APPLY_DOC, metric.name
    for status in ReportedState.model_fields["status"].annotation.__args__:
        assert f"| `{status}` |" in APPLY_DOC, status


class _FakeAgent:
    """The three things plugin.attach uses from an Agent."""

    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry as _Registry

        self.shop, self.registry, self.release = SHOP, _Registry(), None
        self.sent: list[dict] = []
        self.handler = None

    def send(self, _model, **fields) -> int:
        self.sent.append(fields)
        return len(self.sent)

    def register_desired_state_handler(self, handler, observe=None) -> None:
        self.handler, self.observe = handler, observe


def test_attach_starts_a_reconciler_that_resumes_an_unfinished_apply(tmp_path, keys):
    import threading

    from edge_agent.apply.plugin import attach

    signer, _ = keys
    pub = tmp_path / "k.pub"
    store = RevisionStore(tmp_path / "applied.json")
    state = _state(signer, 4, "r4")
    store.save_state(state)  # what an agent that replaced its own pod left behind
    store.save(AppliedRecord(4, "r4", "applying"))
    agent, client, stop = _FakeAgent(), InMemoryClusterClient(), threading.Event()
    config = ApplyConfig(enabled=True, public_keys=(pub,), state_path=store.path, drift_interval_s=0.05,
                         ready_timeout_s=1, poll_interval_s=0.01)
    try:
        handler = attach(agent, config, client=client, stop=stop)
        assert handler is not None and agent.handler == handler.handle
        wait_for(lambda: store.load().status == "applied", 10, "the reconciler to finish revision 4")
        assert agent.release == "r4" and agent.sent[-1]["status"] == "applied"
        assert ObjectRef("apps/v1", "DaemonSet", "shopfleet", "shopfleet-agent") in client.objects
    finally:
        stop.set()


def test_apply_config_names_the_fix():
    with pytest.raises(ValueError, match="lower retry_min_s"):
        ApplyConfig(retry_min_s=10, retry_max_s=1)
    with pytest.raises(ValueError, match="self_daemonset"):
        ApplyConfig(self_daemonset="no-slash")
