"""Human messages for alerts: what, where (in words), the cause in short, and what to do.

Operators read alerts on a phone at night: "fridge 1 on shop-a/pi-1 at 9.4 °C", not
"/tmp/shopfleet-x/shelf-1: [Errno 5] Input/output error". Everything here is pure text shaping;
the raw text a node sent is kept apart (the alert's ``details``) for whoever debugs it.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

RUNBOOKS: dict[str, str] = {
    "node_offline": "Check the node's power and network (switch port, uplink); if the shop is closed, silence it; if "
                    "the node was retired on purpose, remove it (Remove node on the shop page, admins).",
    "camera_fps_low": "Open the shop page: if the node's CPU is saturated, a release may be too heavy (roll back); "
                      "otherwise check the camera's cable, focus and lighting.",
    "fridge_warm": "Check the fridge door is closed and the compressor runs; move chilled stock to another fridge "
                   "if it stays warm (food safety).",
    "disk_low": "Free space on the node (old images, logs) or raise the retention limits; a full disk stops the "
                "pipelines.",
    "clock_skew": "Check the node's NTP service and its reach to the time server; skewed clocks misorder events.",
    "node:sensor_board_disconnected": "Check the sensor board's USB cable and power at the shelf; the node reconnects "
                                      "by itself once the board answers again.",
    "node:camera_dark": "Check the camera's cable and power, and that nothing blocks the lens.",
    "node:temperature_high": "Check the fridge door and compressor; move chilled stock if it stays warm.",
    "node:temperature_low": "Check the fridge thermostat; frozen stock may be damaged.",
}
"""What to do, per alert rule (``node:<name>`` for alerts the nodes raise); a rule's ``runbook`` key overrides."""

DEFAULT_RUNBOOK = "Open the shop page for the node's pipelines and recent events."

# (pattern in raw text, short cause) - first match wins; the raw text stays in the alert's details.
_CAUSES: tuple[tuple[re.Pattern[str], str], ...] = tuple((re.compile(p, re.I), c) for p, c in (
    (r"errno 2\b|no such file or directory|no such device", "the USB device is gone (cable unplugged?)"),
    (r"errno 5\b|input/output error|\bEIO\b", "the USB link failed (I/O error)"),
    (r"errno 13\b|permission denied", "no permission to open the device"),
    (r"errno 16\b|device or resource busy", "the device is busy (opened by another program?)"),
    (r"timed? ?out|timeout", "no answer in time"),
    (r"connection refused|errno 111\b", "the connection was refused"),
    (r"stopped answering|no frames?|delivered no frame", "it stopped sending data"),
))

_PATH = re.compile(r"(?:/[\w.\-]+){2,}")


def cause(raw: str) -> str:
    """Return a short cause for the raw error text ``raw`` (empty when nothing known matches)."""
    for pattern, text in _CAUSES:
        if pattern.search(raw):
            return text
    return ""


def strip_paths(text: str) -> str:
    """Replace file-system paths in ``text`` by their last part (``/tmp/x/shelf-1`` -> ``shelf-1``)."""
    return _PATH.sub(lambda m: m.group(0).rsplit("/", 1)[-1], text)


def source_words(source: str, labels: Mapping[str, str] | None = None) -> str:
    """Return a source in words: ``fridge-1`` -> ``fridge 1``; a board channel with a slot -> ``slot A1 (cola-330)``."""
    labels = labels or {}
    if labels.get("sensor") == "fridge-thermometer":
        board, _, channel = source.partition("/")
        return f"fridge thermometer on {board}" + (f" (channel {channel})" if channel else "")
    if labels.get("slot"):
        return f"slot {labels['slot']}" + (f" ({labels['product']})" if labels.get("product") else "")
    if not source:
        return ""
    name = strip_paths(source) if source.startswith("/") else source
    if "/" in name:
        board, _, channel = name.partition("/")
        return f"{board.replace('-', ' ')} channel {channel}"
    return name.replace("-", " ").replace("_", " ")


def where(shop: str, node: str, source: str = "", labels: Mapping[str, str] | None = None) -> str:
    """Return where an alert is, in words: ``fridge 1 on shop-a/pi-1``."""
    place = f"{shop}/{node}" if node else shop
    words = source_words(source, labels)
    return f"{words} on {place}" if words else place


def runbook(rule: str, override: str | None = None) -> str:
    """Return what to do about alerts of ``rule``: the rule's own line, else the built-in one."""
    return override or RUNBOOKS.get(rule, DEFAULT_RUNBOOK)


_NODE_WHAT = {
    "sensor_board_disconnected": "sensor board not answering",
    "camera_dark": "camera delivers no frames",
    "temperature_high": "fridge too warm",
    "temperature_low": "fridge too cold",
}


def node_alert_summary(name: str, shop: str, node: str, source: str, message: str,
                       data: Mapping[str, object] | None = None) -> str:
    """Return the human summary of an alert a node raised: what, where, and the cause in short.

    The node's own message often carries device paths and OS error text; those stay in the
    alert's details (the raw message), and the summary names the cause in a few words.
    """
    what = _NODE_WHAT.get(name, name.replace("_", " "))
    data = data or {}
    value = data.get("value_c")
    if name.startswith("temperature_") and isinstance(value, int | float):
        limit = data.get("threshold_c")
        what += f" at {value:.1f} °C" + (f" (limit {limit:.1f} °C)" if isinstance(limit, int | float) else "")
    text = f"{what}: {where(shop, node, source)}"
    why = cause(message)
    if why:
        text += f" - {why}"
    elif message and not name.startswith("temperature_") and name not in _NODE_WHAT:
        text += f" - {strip_paths(message)[:200]}"
    return text
