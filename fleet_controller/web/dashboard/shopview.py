"""Shape one shop for its page: nodes with health charts, cameras, shelves, door, fridges.

Pure: it takes the registry's read models (``get_shop``, ``get_node`` per node) and the alert
rules, returns the template's context (plain values for Jinja), and sorts readings into the panels by their names (conventions in docs/dashboard.md):
``*weight*`` is a shelf slot, ``door*`` the door contact (1 = open), the fridge rule's reading
from a fridge source a fridge, ``occupancy`` the shopper count.
"""

from __future__ import annotations

from typing import Any

from fleet_controller.alerts.rules import AlertRules
from fleet_controller.registry.read import NodeDetail, ShopDetail
from fleet_controller.web.dashboard.charts import sparkline

CHARTS = (
    ("cpu_load_1m", "CPU load", ""),
    ("cpu_temp_c", "CPU temp", "°C"),
    ("mem_available_bytes", "Free memory", "B"),
    ("disk_free_bytes", "Free disk", "B"),
)


def _is_fridge(r: dict[str, Any], rules: AlertRules) -> bool:
    f = rules.fridge_warm
    return r["name"] == f.reading and (f.source_contains in r["source"] or any(f.source_contains in v for v in r["labels"].values()))


def shape_shop(detail: ShopDetail, node_details: list[NodeDetail], rules: AlertRules, now: float) -> dict[str, Any]:
    """Return the template context of a shop page."""
    f = rules.fridge_warm
    shop = detail.model_dump()
    nodes = [n.model_dump() for n in node_details]
    out_nodes: list[dict[str, Any]] = []
    cameras: list[dict[str, Any]] = []
    for n in nodes:
        history = list(reversed(n.get("history", [])))  # oldest first
        charts = []
        for key, label, unit in CHARTS:
            values = [h.get(key) for h in history]
            last = next((v for v in reversed(values) if v is not None), None)
            charts.append({"key": key, "label": label, "unit": unit, "points": sparkline(values), "last": last})
        facts = n.get("facts") or {}
        out_nodes.append({**n, "facts": facts, "charts": charts})
        for name, p in sorted((n.get("pipelines") or {}).items()):
            if p.get("kind") == rules.camera_fps_low.pipeline_kind:
                fps = p.get("fps")
                cameras.append({"node": n["node"], "name": name, "state": p.get("state", ""), "fps": fps,
                                "last_frame_age_s": p.get("last_frame_age_s"),
                                "low": fps is not None and fps < rules.camera_fps_low.min_fps})
    shelves, door, fridges, other, occupancy = [], None, [], [], None
    for r in shop.get("readings", []):
        name = r["name"]
        if _is_fridge(r, rules):
            status = "warm" if r["value"] > f.max_c else ("cooling" if r["value"] > f.clear_below_c else "ok")
            fridges.append({**r, "max_c": f.max_c, "clear_below_c": f.clear_below_c, "status": status})
        elif "weight" in name:
            shelves.append(r)
        elif name.startswith("door"):
            door = {**r, "open": r["value"] >= 0.5, "age_s": now - r["ts"]}
        elif name == "occupancy":
            occupancy = r["value"] if occupancy is None else max(occupancy, r["value"])
        else:
            other.append(r)
    return {"shop": shop, "nodes": out_nodes, "cameras": cameras, "shelves": shelves, "door": door,
            "fridges": fridges, "other_readings": other, "occupancy": occupancy}
