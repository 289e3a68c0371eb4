"""The registry on SQLite and PostgreSQL: batches, presence, sweeping, retention, reads, migrations."""

from __future__ import annotations

import pytest
from sqlalchemy import inspect

from fleet_controller.registry.db import Base
from fleet_controller.registry.migrations import alembic_config, pending
from fleet_controller.registry.read import NotFound
from fleet_controller.registry.store import (
    PresenceView,
    decide_presence,
    silence_presence,
)
from fleet_controller.settings import PresenceSettings, RetentionSettings
from tests.support.controller import T0, alert, batch, event, heartbeat, presence, telemetry

PS = PresenceSettings(stale_after_intervals=2.5, offline_after_intervals=6, default_interval_s=10)


# ----- pure decisions --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("current", "msg", "expected"),
    [
        pytest.param(PresenceView(0, "unknown", ""), presence(session=1), PresenceView(1, "online", "birth"), id="first-birth"),
        pytest.param(PresenceView(1, "online", "birth"), presence(state="offline", session=1), PresenceView(1, "offline", "will"), id="will-same-session"),
        pytest.param(PresenceView(2, "online", "birth"), presence(state="offline", session=1), None, id="late-will-older-session-ignored"),
        pytest.param(PresenceView(2, "online", "birth"), presence(session=1), None, id="stale-birth-older-session-ignored"),
        pytest.param(PresenceView(1, "offline", "will"), presence(session=2), PresenceView(2, "online", "birth"), id="reconnect-new-session"),
        pytest.param(PresenceView(1, "offline", "will"), presence(session=1), None, id="birth-cannot-undo-own-will"),
        pytest.param(PresenceView(1, "offline", "timeout"), presence(session=1), PresenceView(1, "online", "birth"), id="birth-after-timeout"),
        pytest.param(PresenceView(1, "online", "birth"), presence(session=1), None, id="redelivered-birth-no-change"),
        pytest.param(PresenceView(1, "online", "birth"), presence(state="offline", session=3), PresenceView(3, "offline", "will"), id="will-of-newer-session"),
    ],
)
def test_decide_presence(current, msg, expected):
    assert decide_presence(current, msg) == expected


@pytest.mark.parametrize(
    ("presence_now", "silent", "expected"),
    [
        pytest.param("online", 20, "online", id="two-intervals-still-online"),
        pytest.param("online", 26, "stale", id="past-2.5-intervals-stale"),
        pytest.param("stale", 61, "offline", id="past-6-intervals-offline"),
        pytest.param("online", 61, "offline", id="online-straight-to-offline"),
        pytest.param("offline", 1000, "offline", id="offline-stays"),
        pytest.param("unknown", 1000, "unknown", id="unknown-untouched"),
    ],
)
def test_silence_presence(presence_now, silent, expected):
    assert silence_presence(presence_now, silent, 10, PS) == expected


# ----- on both engines --------------------------------------------------------------------------


def test_migration_matches_models(registry):
    """The Alembic revision creates exactly the tables and columns the models declare."""
    insp = inspect(registry.engine)
    for table in ("shops", "nodes", "heartbeats", "events", "readings", "command_results", "node_reported_states"):
        db_cols = {c["name"] for c in insp.get_columns(table)}
        model_cols = {c.name for c in Base.metadata.tables[table].columns}
        assert db_cols == model_cols, table
    assert pending(registry.engine) == set()
    from alembic.script import ScriptDirectory

    assert "0001_registry" in {r.revision for r in ScriptDirectory.from_config(alembic_config()).walk_revisions()}


def test_first_message_creates_shop_and_node_with_facts(registry, reader):
    events = registry.write_batch(batch(heartbeat(seq=1)), T0)
    assert {e.topic for e in events} >= {"shop_added", "node_added", "presence"}
    node = reader.get_node("shop-a", "pi-1")
    assert node.arch == "arm64" and node.node_class == "pi" and node.presence == "online"
    assert node.facts["cpu_count"] == 4 and node.heartbeat_interval_s == 10
    assert node.last_seen == T0 and [h.seq for h in node.history] == [1]
    assert node.watermark == 1 and node.messages_total == 1


def test_readings_keep_latest_per_key_and_reported_state(registry, reader):
    registry.write_batch(batch(telemetry(seq=1, value=4.0, ts=T0), telemetry(seq=2, value=9.5, ts=T0 + 1)), T0)
    registry.write_batch(batch(telemetry(seq=3, value=5.5, ts=T0 + 2)), T0 + 2)
    shop = reader.get_shop("shop-a")
    assert [(r.name, r.value) for r in shop.readings] == [("temperature_c", 5.5)]
    assert shop.reported_state is None


def test_events_and_alerts_are_stored_newest_first(registry, reader):
    registry.write_batch(batch(event(seq=1), alert(seq=2), event(seq=3, type="person_entered")), T0)
    evs = reader.list_events("shop-a", kind=None)
    assert [(e.kind, e.type) for e in evs if e.kind != "presence"] == [
        ("event", "person_entered"), ("alert", "fridge_warm"), ("event", "door_opened")]
    first = min(e.id for e in evs)
    assert [e.seq for e in reader.list_events("shop-a", after_id=first, kind="event")] == [3]


def test_late_will_of_older_session_never_marks_newer_session_offline(registry, reader):
    registry.write_batch(batch(presence(session=1)), T0)
    registry.write_batch(batch(presence(session=2)), T0 + 1)  # reconnected before the old Will arrived
    events = registry.write_batch(batch(presence(state="offline", session=1)), T0 + 2)
    assert [e for e in events if e.topic == "presence"] == []
    node = reader.get_node("shop-a", "pi-1")
    assert (node.presence, node.session) == ("online", 2)
    registry.write_batch(batch(presence(state="offline", session=2)), T0 + 3)
    assert reader.get_node("shop-a", "pi-1").presence == "offline"


def test_sweep_marks_stale_then_offline_and_a_message_revives(registry, reader):
    registry.write_batch(batch(heartbeat(seq=1, interval=10)), T0)
    assert registry.sweep_presence(PS, T0 + 20) == []
    ev = registry.sweep_presence(PS, T0 + 26)
    assert [(e.data["old"], e.data["new"]) for e in ev] == [("online", "stale")]
    ev = registry.sweep_presence(PS, T0 + 61)
    assert [(e.data["old"], e.data["new"], e.data["reason"]) for e in ev] == [("stale", "offline", "timeout")]
    assert reader.presence_counts()["offline"] == 1
    ev = registry.write_batch(batch(heartbeat(seq=2), at=T0 + 70), T0 + 70)
    assert [(e.data["old"], e.data["new"]) for e in ev if e.topic == "presence"] == [("offline", "online")]


def test_a_presence_storm_is_marked_over_several_sweeps_longest_silent_first(registry, reader, caplog):
    """``presence.sweep_max_changes`` bounds one sweep; nodes already stale (no change due) never take the bound's room."""
    capped = PS.model_copy(update={"sweep_max_changes": 2})
    # pi-0 falls silent first and is marked stale alone; then five more go quiet one second apart.
    registry.write_batch(batch(heartbeat(node="pi-0", seq=1, ts=T0), at=T0), T0)
    assert [(e.node, e.data["new"]) for e in registry.sweep_presence(capped, T0 + 26)] == [("pi-0", "stale")]
    for i in range(1, 6):
        registry.write_batch(batch(heartbeat(node=f"pi-{i}", seq=1, ts=T0 + 5 + i), at=T0 + 5 + i), T0 + 5 + i)
    now = T0 + 45  # all five silent past 2.5 intervals, pi-0 not yet past 6
    with caplog.at_level("WARNING", logger="fleet_controller.registry.store"):
        first = registry.sweep_presence(capped, now)
    storm = ("presence_storm", None, {"marked": 2, "sweep_max_changes": 2})  # for the service's counter
    assert [(e.topic, e.node, e.data.get("new")) for e in first[:2]] == [("presence", "pi-1", "stale"), ("presence", "pi-2", "stale")]
    assert [(e.topic, e.node, e.data) for e in first[2:]] == [storm]
    assert registry.presence_storm_sweeps == 1 and "presence storm" in caplog.text
    second = registry.sweep_presence(capped, now + 1)
    assert [(e.topic, e.node) for e in second] == [("presence", "pi-3"), ("presence", "pi-4"), ("presence_storm", None)]
    assert [(e.topic, e.node) for e in registry.sweep_presence(capped, now + 2)] == [("presence", "pi-5")]  # not capped
    assert registry.presence_storm_sweeps == 2  # the last sweep fit under the bound
    assert registry.sweep_presence(capped, now + 3) == []
    assert reader.presence_counts()["stale"] == 6
    # pi-0 passes 6 intervals first, so it is first to go offline.
    assert [(e.node, e.data["new"]) for e in registry.sweep_presence(capped, T0 + 61)] == [("pi-0", "offline")]


def test_a_sweep_limited_to_some_shops_judges_only_their_nodes(registry, reader, monkeypatch):
    """A partitioned replica sweeps the shops it stores; the others' nodes stay as they are, whatever their silence."""
    import fleet_controller.registry.store as store

    monkeypatch.setattr(store, "SWEEP_SHOPS_CHUNK", 2)  # the chunked query path, merged in order
    for i, shop in enumerate(["shop-a", "shop-b", "shop-c", "shop-d", "shop-e"]):
        registry.write_batch(batch(heartbeat(shop=shop, node="pi-1", seq=1, ts=T0 + i), at=T0 + i), T0 + i)
    mine = ["shop-e", "shop-c", "shop-a", "shop-x"]  # unsorted, and one shop without nodes
    ev = registry.sweep_presence(PS, T0 + 40, shops=mine)
    assert [(e.shop, e.data["new"]) for e in ev] == [("shop-a", "stale"), ("shop-c", "stale"), ("shop-e", "stale")]
    assert [reader.get_node(s, "pi-1").presence for s in ("shop-b", "shop-d")] == ["online", "online"]
    # the bound applies across chunks, longest silent first
    capped = PS.model_copy(update={"sweep_max_changes": 1})
    ev = registry.sweep_presence(capped, T0 + 40, shops=["shop-d", "shop-b"])
    assert [(e.topic, e.shop) for e in ev] == [("presence", "shop-b"), ("presence_storm", "")]
    assert registry.sweep_presence(PS, T0 + 40, shops=[]) == []
    assert reader.get_node("shop-d", "pi-1").presence == "online"


def test_a_partitioned_sweep_walks_the_nodes_once_on_postgresql(registry, monkeypatch):
    """Each query of a sweep walks every online node: PostgreSQL gets the shops as one array, SQLite in chunks."""
    import sqlalchemy as sa

    import fleet_controller.registry.store as store

    monkeypatch.setattr(store, "SWEEP_SHOPS_CHUNK", 2)
    for i, shop in enumerate(["shop-a", "shop-b", "shop-c", "shop-d", "shop-e"]):
        registry.write_batch(batch(heartbeat(shop=shop, node="pi-1", seq=1, ts=T0 + i), at=T0 + i), T0 + i)
    queries: list[str] = []

    def count(conn, cursor, statement, *args):
        if statement.lstrip().upper().startswith("SELECT") and "FROM nodes" in statement and "presence" in statement:
            queries.append(statement)

    sa.event.listen(registry.engine, "before_cursor_execute", count)
    try:
        ev = registry.sweep_presence(PS, T0 + 40, shops=["shop-e", "shop-c", "shop-a"])
    finally:
        sa.event.remove(registry.engine, "before_cursor_execute", count)
    assert [(e.shop, e.data["new"]) for e in ev] == [("shop-a", "stale"), ("shop-c", "stale"), ("shop-e", "stale")]
    if registry.engine.dialect.name == "postgresql":
        assert len(queries) == 1 and "ANY" in queries[0].upper()
    else:
        assert len(queries) == 2  # three shops in chunks of two


def test_heartbeat_does_not_undo_a_will(registry, reader):
    """After a Will only a birth brings the node back (outbox replays may arrive first)."""
    registry.write_batch(batch(presence(session=1)), T0)
    registry.write_batch(batch(presence(state="offline", session=1)), T0 + 1)
    registry.write_batch(batch(heartbeat(seq=5), at=T0 + 2), T0 + 2)
    assert reader.get_node("shop-a", "pi-1").presence == "offline"


def test_retention_bounds_history_by_count_and_age(registry, reader):
    for i in range(1, 11):
        registry.write_batch(batch(heartbeat(seq=i), event(seq=100 + i), at=T0 + i), T0 + i)
    registry.write_batch(batch(heartbeat(node="pi-2", seq=1), at=T0 + 100), T0 + 100)
    deleted = registry.enforce_retention(
        RetentionSettings(heartbeats_per_node=3, heartbeat_max_age_s=1000, events_per_shop=4, event_max_age_s=1000), T0 + 100
    )
    assert deleted["heartbeats"] == 7
    assert [h.seq for h in reader.get_node("shop-a", "pi-1").history] == [10, 9, 8]
    assert [h.seq for h in reader.get_node("shop-a", "pi-2").history] == [1]
    assert len(reader.list_events("shop-a")) == 4
    deleted = registry.enforce_retention(
        RetentionSettings(heartbeats_per_node=3, heartbeat_max_age_s=50, events_per_shop=4, event_max_age_s=50), T0 + 100
    )
    assert [h.seq for h in reader.get_node("shop-a", "pi-1").history] == []
    assert [h.seq for h in reader.get_node("shop-a", "pi-2").history] == [1]


def test_register_shop_and_filters(registry, reader):
    registry.write_batch(batch(heartbeat(shop="shop-b"), heartbeat(shop="shop-a"), heartbeat(shop="shop-c")), T0)
    registry.register_shop("shop-a", name="Alexanderplatz", region="eu-central", labels={"tier": "pilot"}, timezone="Europe/Berlin")
    registry.register_shop("shop-b", region="eu-central")
    registry.register_shop("shop-new", name="Planned")
    items, total = reader.list_shops(region="eu-central")
    assert [i.id for i in items] == ["shop-a", "shop-b"] and total == 2
    items, _ = reader.list_shops(labels={"tier": "pilot"})
    assert [(i.id, i.name, i.timezone) for i in items] == [("shop-a", "Alexanderplatz", "Europe/Berlin")]
    items, total = reader.list_shops(limit=2, offset=1)
    assert [i.id for i in items] == ["shop-b", "shop-c"] and total == 4
    items, _ = reader.list_shops(q="planned")
    assert [(i.id, i.nodes) for i in items] == [("shop-new", 0)]
    items, _ = reader.list_shops(presence="online")
    assert [i.id for i in items] == ["shop-a", "shop-b", "shop-c"]
    with pytest.raises(NotFound):
        reader.get_shop("nope")
    with pytest.raises(NotFound):
        reader.get_node("shop-a", "nope")
    with pytest.raises(ValueError, match="invalid shop id"):
        registry.register_shop("Bad/Id")


def test_rolled_back_batch_recreates_its_node(registry, reader):
    """A batch that fails after creating a node must not leave the node 'known' but absent."""
    # The protocol refuses such a seq now; model_copy skips validation to reach the database anyway.
    bad = batch(heartbeat(shop="shop-z").model_copy(update={"seq": 2**70}))  # too big for a BIGINT: the insert fails after the node was created
    with pytest.raises(Exception):  # noqa: B017 - SQLite and PostgreSQL raise different overflow errors
        registry.write_batch(bad, T0)
    registry.write_batch(batch(heartbeat(shop="shop-z", seq=1)), T0)
    assert reader.get_node("shop-z", "pi-1").messages_total == 1
