"""A real controller (service, dashboard, alerts) on a real broker, simulated shops, and Debian's Chromium.

The controller runs in-process on its own loop thread with the dashboard attached exactly as
production attaches it; shops are plain paho clients speaking the wire protocol (with a Will, so
killing one is a real crash the broker reports). Chromium is the system binary
(``/usr/bin/chromium``), never a downloaded browser.
"""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Iterator

import pytest
from playwright.sync_api import Browser

from edge_agent.protocol import PipelineHealth, Reading, Telemetry
from edge_agent.protocol import Topics as Topic
from tests.support.browser import CHROMIUM, SHOPS, Controller, Session, chromium, facts
from tests.support.controller import (
    Node,
    controller_settings,
    heartbeat,
    presence,
)
from tests.support.wait import wait_for


@pytest.fixture(scope="module")
def fleet(shared_broker, tmp_path_factory) -> Iterator[tuple[Controller, dict[str, Node]]]:
    """A controller with three shops reporting; shop-c's disk is nearly full (an alert to acknowledge)."""
    if not shutil.which(CHROMIUM):
        pytest.skip(f"{CHROMIUM} is not installed: apt-get install chromium (scripts/install-system-deps.sh)")
    tmp = tmp_path_factory.mktemp("ctl")
    # Each module's controller has its own client id on the shared broker: a controller another
    # module left behind can then never take this one's session over.
    settings = controller_settings(shared_broker, tmp, presence={"stale_after_intervals": 3, "offline_after_intervals": 6,
                                                                  "sweep_interval_s": 0.2},
                                   broker={"client_id": f"browser-{tmp.name}"})
    # The broker is shared with earlier modules, which may have left these nodes' retained Wills
    # ("offline", session 1): a fresh registry would take them, and then a birth of the same
    # session does not undo them. Clear them first, as a node's first boot finds a clean broker.
    cleaner = Node(shared_broker, "shop-a", "cleaner", will=False)
    for shop in SHOPS:
        cleaner.send(b"", topic=Topic.node(shop, "pi-1", "presence"), retain=True)
    cleaner.close()
    ctl = Controller(settings)
    nodes: dict[str, Node] = {}
    for i, (shop, name) in enumerate(SHOPS.items()):
        ctl.call(ctl.service.writer.register_shop(shop, name=name, region="north" if i < 2 else "south"))
        n = Node(shared_broker, shop, "pi-1")
        n.send(presence(shop, "pi-1"), retain=True)
        pipes = {"cam-entrance": PipelineHealth(kind="vision", state="running", fps=14.8, last_frame_age_s=0.07),
                 "arduino-shelf": PipelineHealth(kind="hardware", state="running")}
        for seq in range(1, 6):
            n.send(heartbeat(shop, "pi-1", seq=seq, interval=30, facts=facts(2.0 if shop == "shop-c" else 40.0 - seq, f"{shop}-pi"),
                             pipelines=pipes, release="2026.11-r1"))
        n.send(Telemetry(shop=shop, node="pi-1", epoch="ep1", seq=6, readings=(
            Reading(name="occupancy", value=2 + i), Reading(name="temperature_c", value=4.1 + i, unit="C", source="fridge-1"),
            Reading(name="shelf_weight_g", value=1520.0 - 35 * i, unit="g", source="shelf-1/slot-1"),
            Reading(name="door_open", value=0, source="door"))))
        nodes[shop] = n
    try:
        wait_for(lambda: ctl.service.reader.list_shops()[1] == 3 and all(
            n.presence == "online" for s in SHOPS for n in ctl.service.reader.get_shop(s).nodes), what="three shops online")
        ctl.start_rollout()
    except BaseException:
        for n in nodes.values():
            n.close()
        ctl.stop()
        raise
    yield ctl, nodes
    for n in nodes.values():
        with contextlib.suppress(Exception):
            n.close()
    ctl.stop()


@pytest.fixture(scope="module")
def browser(fleet) -> Iterator[Browser]:
    """One Chromium per module (after ``fleet``, which skips without Chromium)."""
    with chromium() as b:
        yield b


@pytest.fixture
def login(browser, fleet):
    """``login(user, **context)``: a :class:`Session` of that role's test user; each must end with no console errors."""
    ctl, _ = fleet
    opened: list[Session] = []

    def _login(user: str, **ctx) -> Session:
        s = Session(browser, ctl.url, user, ctl.creds[user], **ctx)
        opened.append(s)
        return s

    yield _login
    for s in opened:
        assert s.errors == [], f"console errors: {s.errors}"
        s.close()
