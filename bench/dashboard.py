"""Server time of the fleet page and the fleet API at 5,000 shops (median and p95).

Builds a registry of N shops (two nodes each, a mix of online / stale / offline, occupancy
readings, firing alerts) on SQLite (or ``--db-url``), then times requests in-process through the
whole app (guard included: session cookie for the page, API token for the API) with varied
queries: pages, sorts, filters, search. The page and the API share the dashboard's summary
cache (re-read every 2 s or on a state change), as in production; the "cold" line times the same
queries reading the database every time, the cost of a cache miss. The reference measured in the same run is the
controller's own ``GET /api/v1/shops`` with the same page size; ``/healthz`` shows the floor of
the framework. Last line: one-line JSON summary.

    .venv/bin/python bench/dashboard.py [--shops 5000] [--requests 200] [--db-url URL]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from argon2 import PasswordHasher
from fastapi.testclient import TestClient
from prometheus_client import CollectorRegistry

from edge_agent.protocol import Heartbeat, NodeFacts, Presence, Reading, Telemetry
from fleet_controller.alerts import store as alert_store
from fleet_controller.alerts.evaluator import Firing
from fleet_controller.alerts.rules import AlertRules
from fleet_controller.registry.db import create_engine
from fleet_controller.registry.migrations import upgrade
from fleet_controller.registry.read import RegistryReader
from fleet_controller.registry.store import NodeUpdate, RegistryStore, SeqCursor, WriteBatch
from fleet_controller.web.accounts.store import AccountStore
from fleet_controller.web.dashboard.fleetview import fleet_page
from fleet_controller.web.dashboard.router import parse_fleet_query
from fleet_controller.web.dashboard.setup import build_app

FACTS = NodeFacts(arch="arm64", node_class="pi", cpu_count=4, cpu_load_1m=0.3, mem_total_bytes=4 << 30,
                  mem_available_bytes=2 << 30, disk_total_bytes=32 << 30, disk_free_bytes=16 << 30)


def populate(registry: RegistryStore, shops: int, now: float) -> None:
    """Write ``shops`` shops of two nodes each through the registry's own batch writer."""
    regions = ["north", "south", "east", "west", "centre"]
    step = 250
    for start in range(0, shops, step):
        wb = WriteBatch()
        for i in range(start, min(start + step, shops)):
            shop = f"shop-{i:05d}"
            registry.register_shop(shop, name=f"Shop {i}", region=regions[i % 5], now=now)
            for node in ("pi-1", "gpu-1"):
                online = not (i % 7 == 0 or (node == "gpu-1" and i % 11 == 0))
                wb.presences.append((Presence(shop=shop, node=node, state="online" if online else "offline", session=1), now))
                wb.uplinks.append((Heartbeat(shop=shop, node=node, epoch="e", seq=1, interval_s=10, facts=FACTS,
                                             release=f"2026.{i % 3 + 9}"), now))
                wb.nodes[(shop, node)] = NodeUpdate(SeqCursor("e", 2), messages=2)
                wb.seen[(shop, node)] = now
            wb.uplinks.append((Telemetry(shop=shop, node="pi-1", epoch="e", seq=2,
                                         readings=(Reading(name="occupancy", value=i % 6),)), now))
        registry.write_batch(wb, now)
    alert_store.sync(registry.engine, [Firing(f"disk_low/shop-{i:05d}/pi-1/", "disk_low", f"shop-{i:05d}", "pi-1", "",
                                              "warning", "disk", 5.0) for i in range(0, shops, 17)], now)


def queries(rng: random.Random, shops: int) -> dict[str, str]:
    """Return a realistic mix of fleet queries."""
    kind = rng.random()
    if kind < 0.4:
        return {"page": str(rng.randint(1, max(1, shops // 50)))}
    if kind < 0.6:
        return {"sort": rng.choice(["alerts", "last_seen", "occupancy", "release", "name"]), "desc": rng.choice(["true", ""])}
    if kind < 0.8:
        return {"state": rng.choice(["offline", "stale", "online"]), "region": rng.choice(["", "north", "west"])}
    return {"q": f"shop {rng.randint(0, shops - 1)}"}


def timed(client: TestClient, path: str, params_list: list[dict[str, str]], **kw) -> list[float]:
    """Return the server time (ms) of each request; fail loudly on any non-200."""
    out = []
    for params in params_list:
        t0 = time.perf_counter()
        r = client.get(path, params=params, **kw)
        out.append((time.perf_counter() - t0) * 1000)
        if r.status_code != 200:
            raise SystemExit(f"{path} {params} answered {r.status_code}: {r.text[:200]}")
    return out


def p95(xs: list[float]) -> float:
    return statistics.quantiles(xs, n=20)[18] if len(xs) >= 20 else max(xs)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shops", type=int, default=5000, help="shops in the registry (default: %(default)s)")
    ap.add_argument("--requests", type=int, default=200, help="timed requests per endpoint (default: %(default)s)")
    ap.add_argument("--db-url", help="database to use (default: a fresh SQLite file)")
    args = ap.parse_args()
    url = args.db_url or f"sqlite:///{tempfile.mkdtemp(prefix='bench-dash-')}/controller.db"
    engine = create_engine(url)
    upgrade(engine)
    registry = RegistryStore(engine)
    reader = RegistryReader(engine)
    now = time.time()
    t0 = time.perf_counter()
    print(f"populating {args.shops} shops ({2 * args.shops} nodes) on {engine.url.get_backend_name()}...", file=sys.stderr)
    populate(registry, args.shops, now)
    print(f"populated in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    store = AccountStore(engine, PasswordHasher(time_cost=1, memory_cost=1024, parallelism=1))
    store.add_user("bench", "bench-password-1", "viewer")
    token = store.create_token("bench", "bench")
    sid, _ = store.create_session("bench")
    app, _ = build_app(reader, CollectorRegistry(), store, AlertRules())
    rng = random.Random(6)
    params = [queries(rng, args.shops) for _ in range(args.requests)]
    with TestClient(app) as c:
        c.cookies.set("sf_session", sid)
        bearer = {"Authorization": f"Bearer {token}"}
        timed(c, "/fleet", params[:10])  # warm-up: templates compiled, caches filled
        page = timed(c, "/fleet", params)
        api = timed(c, "/api/v1/fleet", params, headers=bearer)
        ref_params = [{"limit": "50", "offset": str(50 * (int(p.get("page", "1")) - 1))} for p in params]
        ref = timed(c, "/api/v1/shops", ref_params, headers=bearer)
        floor = timed(c, "/healthz", [{}] * args.requests)
    cold = []
    for p in params[: max(20, args.requests // 5)]:  # the summaries read from the database every time
        t1 = time.perf_counter()
        fleet_page(reader, parse_fleet_query(p))
        cold.append((time.perf_counter() - t1) * 1000)
    rows = [("fleet page  GET /fleet", page), ("fleet API   GET /api/v1/fleet", api),
            ("cold        fleet_page() without the summary cache (no HTTP)", cold),
            ("reference   GET /api/v1/shops (registry list, same page size)", ref), ("floor       GET /healthz", floor)]
    for name, xs in rows:
        print(f"{name:<64} median {statistics.median(xs):7.1f} ms   p95 {p95(xs):7.1f} ms")
    ratio_page = p95(page) / p95(ref)
    ratio_api = p95(api) / p95(ref)
    print(f"ratio p95 fleet page / reference: {ratio_page:.2f}; fleet API / reference: {ratio_api:.2f}")
    print(json.dumps({
        "shops": args.shops, "requests": args.requests, "engine": engine.url.get_backend_name(),
        "fleet_page_median_ms": round(statistics.median(page), 1), "fleet_page_p95_ms": round(p95(page), 1),
        "fleet_api_median_ms": round(statistics.median(api), 1), "fleet_api_p95_ms": round(p95(api), 1),
        "fleet_cold_median_ms": round(statistics.median(cold), 1), "fleet_cold_p95_ms": round(p95(cold), 1),
        "reference_shops_api_p95_ms": round(p95(ref), 1), "healthz_p95_ms": round(p95(floor), 1),
        "ratio_page_vs_reference": round(ratio_page, 2), "ratio_api_vs_reference": round(ratio_api, 2),
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
