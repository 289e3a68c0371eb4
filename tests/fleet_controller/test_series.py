"""Time series on SQLite and PostgreSQL: samples from heartbeats and telemetry, rollup, retention, reads, API."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml
from sqlalchemy import func, inspect, select

from edge_agent.protocol import NodeFacts, PipelineHealth, Reading, Telemetry
from fleet_controller.registry.db import Base
from fleet_controller.registry.series import (
    NODE_SERIES,
    RAW,
    ROLLUP,
    SeriesRangeError,
    choose_tier,
    points_from,
    read_series,
)
from fleet_controller.registry.store import WriteBatch
from fleet_controller.settings import (
    RetentionSettings,
    SeriesSettings,
    SettingsError,
    load_settings,
)
from tests.support.controller import heartbeat
from tests.support.metric_names import (
    defined_metrics,
    exposed_metrics,
    promtool_check_rules,
    used_metrics,
)

T0 = 1_800_000_000.0  # a multiple of 3600, so bucket boundaries are easy to reason about
FACTS = NodeFacts(arch="arm64", node_class="pi", cpu_count=4, cpu_load_1m=0.5, cpu_percent=25.0, mem_total_bytes=1000,
                  mem_available_bytes=250, disk_total_bytes=2000, disk_free_bytes=1500, cpu_temp_c=51.5)
CAM = {"cam-1": PipelineHealth(kind="vision", state="running", fps=9.5), "shelf": PipelineHealth(kind="hardware", state="running")}


def fridge(seq: int, ts: float, value: float, shop: str = "shop-a", source: str = "fridge-1") -> Telemetry:
    return Telemetry(shop=shop, node="pi-1", seq=seq, epoch="ep1", ts=ts,
                     readings=(Reading(name="temperature_c", value=value, unit="C", source=source),))


def write(registry, *msgs, at: float) -> None:
    wb = WriteBatch()
    for m in msgs:
        wb.uplinks.append((m, at))
        wb.seen[(m.shop, m.node)] = at
    registry.write_batch(wb, at)


def count(engine, table, **where) -> int:
    with engine.connect() as conn:
        return conn.execute(select(func.count()).select_from(table).where(*(table.c[k] == v for k, v in where.items()))).scalar_one()


# ----- pure ---------------------------------------------------------------------------------------


def test_points_from_heartbeat_derive_node_series_and_camera_fps():
    hb = heartbeat(seq=1, ts=T0, facts=FACTS, pipelines=CAM)
    pts = {(p[0], p[1]): p[2] for p in points_from(hb)}
    assert pts == {("cpu_percent", ""): 25.0, ("cpu_load_1m", ""): 0.5, ("mem_used_percent", ""): 75.0,
                   ("disk_used_percent", ""): 25.0, ("cpu_temp_c", ""): 51.5, ("fps", "cam-1"): 9.5}


def test_points_skip_what_cannot_be_charted():
    """A pipeline without fps, a node without temperature and a NaN reading give no sample (not a zero)."""
    facts = FACTS.model_copy(update={"cpu_temp_c": None, "cpu_percent": None})
    names = {p[0] for p in points_from(heartbeat(seq=1, facts=facts, pipelines={"shelf": CAM["shelf"]}))}
    assert names == {"cpu_load_1m", "mem_used_percent", "disk_used_percent"}
    # The protocol refuses NaN on the wire; a value built around validation (an old stored row) is still skipped.
    nan = Reading.model_construct(name="x", value=float("nan"), unit="", source="", labels={})
    tel = Telemetry(shop="s", node="n", seq=1, epoch="e", readings=(Reading(name="y", value=2),)).model_copy(
        update={"readings": (nan, Reading(name="y", value=2))})
    assert points_from(tel) == [("y", "", 2.0)]


S = SeriesSettings()


@pytest.mark.parametrize(
    ("span", "step", "expected"),
    [
        (3600, None, ("raw", 0, 6.0)),  # 1 h: raw samples, 6 s buckets
        (86400, None, ("1m", 60, 180.0)),  # 24 h: minute buckets, 144 s rounded up to 3 min
        (7 * 86400, None, ("1m", 60, 1020.0)),  # 7 d: still minutes (hours would be coarser than wanted)
        (30 * 86400, None, ("1h", 3600, 7200.0)),  # beyond minutes' age: hours
        (3600, 300, ("1m", 60, 300.0)),  # a wide step reads the coarser tier
    ],
)
def test_choose_tier_from_range(span, step, expected):
    now = T0
    assert choose_tier(now - span + 1, now, now, S, step) == expected


def test_choose_tier_old_hour_reads_minutes_and_empty_range_is_refused():
    now = T0
    assert choose_tier(now - 7 * 86400 - 2, now, now, S)[0] == "1m"  # a browser's "7 d" a moment ago still reads minutes
    assert choose_tier(now - 8 * 86400, now, now, S)[0] == "1h"
    assert choose_tier(now - 3 * 86400, now - 3 * 86400 + 3600, now, S)[0] == "1m"  # raw no longer holds it
    with pytest.raises(SeriesRangeError, match="from < to"):
        choose_tier(now, now - 1, now, S)


def test_settings_refuse_tiers_out_of_order():
    with pytest.raises(SettingsError, match="raw_max_age_s <= minute_max_age_s"):
        load_settings(None, {"retention": {"series": {"raw_max_age_s": 900000}}}, environ={})
    s = load_settings(None, {}, environ={"SHOPFLEET_CONTROLLER_RETENTION__SERIES__MAX_POINTS": "300"})
    assert s.retention.series.max_points == 300


# ----- on both engines ------------------------------------------------------------------------------


def test_migration_matches_models(registry):
    insp = inspect(registry.engine)
    for table in ("series_raw", "series_rollup", "series_cursors"):
        assert {c["name"] for c in insp.get_columns(table)} == {c.name for c in Base.metadata.tables[table].columns}, table


def test_batches_store_samples_and_reads_align_lines(registry):
    write(registry, heartbeat(seq=1, ts=T0 + 10, facts=FACTS, pipelines=CAM), fridge(2, T0 + 10, 4.0), at=T0 + 10)
    write(registry, fridge(3, T0 + 20, 6.0), fridge(4, T0 + 20, 3.0, source="fridge-2"), at=T0 + 20)
    assert count(registry.engine, RAW) == 4  # one row per message
    data = read_series(registry.engine, "shop-a", "temperature_c", start=T0, end=T0 + 3600, now=T0 + 3600)
    assert data.resolution == "raw" and data.unit == "C" and data.step == 6.0
    assert data.times == [T0 + 6, T0 + 18]
    lines = {ln.source: ln.mean for ln in data.lines}
    assert lines == {"fridge-1": [4.0, 6.0], "fridge-2": [None, 3.0]}
    fps = read_series(registry.engine, "shop-a", "fps", start=T0, end=T0 + 3600, now=T0 + 3600, source="cam-1")
    assert [(ln.node, ln.source, ln.mean) for ln in fps.lines] == [("pi-1", "cam-1", [9.5])] and fps.unit == "fps"
    assert read_series(registry.engine, "shop-a", "fps", start=T0, end=T0 + 3600, now=T0 + 3600, node="pi-2").lines == []
    total = read_series(registry.engine, "shop-a", "temperature_c", start=T0, end=T0 + 3600, now=T0 + 3600, total=True)
    assert total.lines[-1].source == "total" and total.lines[-1].mean == [4.0, 9.0]


def test_raw_rows_keep_every_value_exactly(registry):
    """The batch's raw rows (one statement of a JSON array on PostgreSQL, executemany on SQLite) keep ids, the
    timestamp to the last bit and every sample value: awkward floats, tiny, huge, negative zero, odd ids."""
    values = [0.1 + 0.2, 1e-7, 1.7976931348623157e308, -0.0, 123456789.123456789, 5e-324]
    msgs = [Telemetry(shop="shop-x", node=f"n-{i}", seq=1, epoch="ep1", ts=T0 + 0.123456789 * (i + 1),
                      readings=(Reading(name="w.g:1", value=v, source=f"slot-{i}"),)) for i, v in enumerate(values)]
    write(registry, *msgs, heartbeat(shop="shop-x", node="pi-9", seq=1, ts=T0 + 1 / 3, facts=FACTS, pipelines=CAM), at=T0 + 2)
    with registry.engine.connect() as conn:
        rows = conn.execute(select(RAW.c.shop_id, RAW.c.node_id, RAW.c.ts, RAW.c.samples).order_by(RAW.c.id)).all()
    assert [(r.shop_id, r.node_id, r.ts) for r in rows] == [("shop-x", m.node, m.ts) for m in msgs] + [("shop-x", "pi-9", T0 + 1 / 3)]
    assert [json.loads(r.samples) for r in rows[:-1]] == [[["w.g:1", f"slot-{i}", v]] for i, v in enumerate(values)]
    assert [tuple(p) for p in json.loads(rows[-1].samples)] == points_from(
        heartbeat(shop="shop-x", node="pi-9", seq=1, ts=T0 + 1 / 3, facts=FACTS, pipelines=CAM))


def test_rollup_then_retention_keeps_every_sample_in_the_coarser_tiers(registry):
    """Samples are folded into minute and hour buckets before raw ones age out; a late sample lands in its old bucket."""
    write(registry, *[fridge(i + 1, T0 + i * 20, float(i)) for i in range(6)], at=T0 + 120)  # 0..100 s: minutes 0 and 1
    retention = RetentionSettings(series=SeriesSettings(raw_max_age_s=3600, minute_max_age_s=86400, hour_max_age_s=7 * 86400))
    deleted = registry.enforce_retention(retention, T0 + 180)
    assert deleted["series_raw"] == 0 and count(registry.engine, RAW) == 6
    with registry.engine.connect() as conn:
        rows = conn.execute(select(ROLLUP.c.step, ROLLUP.c.bucket, ROLLUP.c.n, ROLLUP.c.total, ROLLUP.c.lo, ROLLUP.c.hi)
                            .order_by(ROLLUP.c.step, ROLLUP.c.bucket)).all()
    assert [tuple(r) for r in rows] == [(60, T0, 3, 3.0, 0.0, 2.0), (60, T0 + 60, 3, 12.0, 3.0, 5.0), (3600, T0, 6, 15.0, 0.0, 5.0)]
    # A replayed, late sample of minute 0 arrives after the rollup: the next run merges it into that bucket.
    write(registry, fridge(7, T0 + 30, -9.0), at=T0 + 200)
    registry.enforce_retention(retention, T0 + 240)
    with registry.engine.connect() as conn:
        m0 = conn.execute(select(ROLLUP.c.n, ROLLUP.c.lo).where(ROLLUP.c.step == 60, ROLLUP.c.bucket == T0)).one()
    assert tuple(m0) == (4, -9.0)
    # Two hours on: raw samples are gone, the minute buckets answer a 24 h chart with the same values.
    deleted = registry.enforce_retention(retention, T0 + 7200)
    assert deleted["series_raw"] == 7 and count(registry.engine, RAW) == 0
    data = read_series(registry.engine, "shop-a", "temperature_c", start=T0 + 7200 - 86400, end=T0 + 7200,
                       settings=retention.series, now=T0 + 7200)
    assert data.resolution == "1m" and len(data.lines) == 1
    assert data.lines[0].min == [-9.0] and data.lines[0].max == [5.0]  # both minutes fall in one 180 s bucket
    assert data.lines[0].mean == [pytest.approx(6.0 / 7, abs=1e-3)]
    # Past the minutes' age, the hour bucket still holds them; past the hours' age, nothing.
    deleted = registry.enforce_retention(retention, T0 + 86400 + 120)
    assert deleted["series_rollup"] == 2 and count(registry.engine, ROLLUP, step=3600) == 1
    registry.enforce_retention(retention, T0 + 7 * 86400 + 3601)
    assert count(registry.engine, ROLLUP) == 0


def test_reads_stay_within_max_points(registry):
    write(registry, *[fridge(i + 1, T0 + i, float(i % 7)) for i in range(400)], at=T0 + 400)
    data = read_series(registry.engine, "shop-a", "temperature_c", start=T0, end=T0 + 400,
                       settings=SeriesSettings(max_points=50), now=T0 + 400)
    assert len(data.times) <= 51 and data.step == 8.0
    assert max(v for v in data.lines[0].max if v is not None) == 6.0


# ----- API ---------------------------------------------------------------------------------------


def test_series_api(api_client, registry):
    import time

    now = time.time()
    write(registry, fridge(1, now - 30, 4.5), fridge(2, now - 20, 5.5), at=now)
    r = api_client.get("/api/v1/shops/shop-a/series", params={"name": "temperature_c", "from": now - 3600, "to": now})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["resolution"] == "raw" and body["lines"][0]["source"] == "fridge-1"
    assert [v for v in body["lines"][0]["mean"] if v is not None] == [4.5, 5.5]
    assert api_client.get("/api/v1/shops/shop-a/series", params={"name": "temperature_c"}).json()["lines"]  # default: last hour
    r = api_client.get("/api/v1/shops/nowhere/series", params={"name": "fps"})
    assert r.status_code == 404 and "GET /api/v1/shops" in r.json()["detail"]
    r = api_client.get("/api/v1/shops/shop-a/series", params={"name": "fps", "from": now, "to": now - 10})
    assert r.status_code == 422 and "from < to" in r.json()["detail"]
    assert api_client.get("/api/v1/shops/shop-a/series", params={"name": "bad name/"}).status_code == 422


def test_vendored_uplot_is_served_without_login(api_client):
    api_client.headers.pop("Authorization")
    r = api_client.get("/static/vendor/uplot/uPlot.iife.min.js")
    assert r.status_code == 200 and "uPlot" in r.text[:2000]
    assert api_client.get("/static/vendor/uplot/LICENSE").text.startswith("The MIT License")
    assert api_client.get("/static/vendor/uplot/..%2Fseries_api.py").status_code == 404
    assert api_client.get("/api/v1/shops/shop-a/series", params={"name": "fps"}).status_code == 401


# ----- Grafana dashboard and Prometheus recording rules ----------------------------------------------

ROOT = Path(__file__).resolve().parents[2]
RULES = ROOT / "docs" / "prometheus" / "recording-rules.yaml"
GRAFANA = ROOT / "docs" / "grafana" / "shopfleet.json"


def rule_exprs() -> tuple[set[str], list[str]]:
    doc = yaml.safe_load(RULES.read_text())
    rules = [r for g in doc["groups"] for r in g["rules"]]
    return {r["record"] for r in rules}, [r["expr"] for r in rules]


def grafana_targets() -> list[dict]:
    doc = json.loads(GRAFANA.read_text())
    return [t for p in doc["panels"] for t in p.get("targets", [])]


def test_every_metric_the_rules_and_dashboard_use_is_exported():
    assert {"shopfleet_controller_ingested", "shopfleet_vision_fps", "shopfleet_controller_nodes"} <= defined_metrics()
    exposed = exposed_metrics()
    assert {"shopfleet_vision_fps", "shopfleet_controller_ingested_total", "shopfleet_nope_total"} - exposed == {"shopfleet_nope_total"}
    recorded, exprs = rule_exprs()
    prom = [t["expr"] for t in grafana_targets() if "expr" in t]
    used = used_metrics(exprs + prom)
    assert len(used) >= 15 and used - exposed == set()
    # The dashboard's recording-rule series (level:metric:operation) are all recorded by the rules file.
    used_rules = {m for e in prom for m in re.findall(r"\b[a-z_]+:[a-z0-9_]+:[a-z0-9_]+\b", e)}
    assert used_rules and used_rules <= recorded, used_rules - recorded


def test_dashboard_sql_panels_read_existing_series_columns():
    from fleet_controller.registry import series  # noqa: F401  (declares the series tables on Base)

    sqls = [t["rawSql"] for t in grafana_targets() if "rawSql" in t]
    assert len(sqls) >= 5
    cols = {c.name for c in Base.metadata.tables["series_rollup"].columns}
    for q in sqls:
        assert set(re.findall(r"\bFROM (\w+)", q)) == {"series_rollup"}, q
        assert {"bucket", "total", "n", "step", "shop_id", "name"} <= cols
        names = re.findall(r"name = '(\w+)'", q)
        assert names and all(n in NODE_SERIES or n in ("temperature_c", "shelf_weight_g") for n in names), q


def test_recording_rules_pass_promtool():
    promtool_check_rules(RULES)
