"""``type: fusion``: the shop's carts, made on the shop's own broker so they keep coming with the uplink down.

**Inputs.** Fusion needs what the shop's other pipelines see, from every node of the shop:

* shop events, as their agents already send them through their outboxes to the shop broker
  (``fleet/v1/{shop}/+/events``): ``person_entered`` / ``person_exited`` (door crossings),
  ``zone_enter`` / ``zone_exit`` / ``dwell``, ``shelf_change``, ``door_opened`` /
  ``door_closed``, and the ``sensor_board_disconnected`` alert (a board away: its slots are blind);
* track positions, on the shop-local topic ``local/v1/{shop}/tracks/{node}/{camera}`` (see
  :func:`track_topic`), published by a ``type: vision`` pipeline that has ``tracks:`` set (or a
  ``type: floor`` pipeline): a throttled stream of each confirmed track's floor position. Tracks
  are high-rate and only fusion needs them, so they stay in the shop: the topic is outside
  ``fleet/v1/`` and the shop broker's bridge forwards an explicit list of ``fleet/v1`` topics only
  (``fleet_controller.broker_config.bridge_topics``), so no bridge line can ever match it.

**Bound publisher.** ``{node}`` is the node part of the publisher's broker user
``<shop>.<node>``, and the shop broker lets each node user write only under its own node, so a
topic names who published it. Fusion takes tracks only from ``track_node`` (its config); a
track message of its ``camera`` (of any camera when that is unset) under any other node is counted
(``track_wrong_node``) and dropped (another camera's stream is simply not read), as is one whose
body names another camera than its topic (``track_camera_mismatch``): one node's stolen
credentials cannot feed fusion positions, so cannot move a pick to another shopper's cart.

Events are bound the same way: the topic's ``{node}`` of ``fleet/v1/{shop}/{node}/events`` is
its publisher (the shop broker's ACL), and the layout's ``publishers`` block (required) names
the node each kind comes from: vision events (``person_entered``, ``person_exited``,
``zone_enter``, ``zone_exit``, ``dwell``) from ``publishers.vision``, ``door_opened`` /
``door_closed`` from ``publishers.door``, a board's ``shelf_change`` and
``sensor_board_disconnected`` from ``publishers.boards[board]`` (a board the layout does not
name: from any node some board is bound to, so fusion still flags it ``unknown-slot``). Any
other node's is counted (``event_wrong_node``, warned once per node and kind) and never fused:
one node's stolen credentials cannot open a session or charge a pick.

This pipeline opens its own MQTT connection to the shop broker (``broker:``). Mosquitto binds
the client id to the user name there, so it needs a user of its own (see docs/fusion.md); a
second connection as the node's user would take over the agent's session.

**Order.** Messages from several nodes and two topics arrive slightly out of time order; they
wait in a buffer until the newest input is ``reorder_delay_s`` younger, and go to
:class:`fusion.engine.Fusion` sorted by time (node clocks are kept in step by the agents' clock
beacon). Fusion's clock is the inputs' time: when nothing arrives for ``reorder_delay_s`` it runs
on from the newest input at the wall clock's pace, so carts close in an empty shop, and a
backlog delivered late (a node reconnecting) keeps its own timing. An event delivered twice (an
outbox replay) is recognised by its (node, epoch, seq) and fed once.

**Output.** Each closed cart goes out with ``sink.event("cart_receipt" | "cart_review", ...)``,
through this agent's outbox like any event: durable across a lost uplink and a restart, and
exactly once at the controller, which stores carts keyed on ``cart_id``. Cart ids carry this
run's start time, so a restarted pipeline never reuses an id. ``cart_review_rate`` (carts sent
to review / carts closed over ``review_window_s``) goes to rollout gates through
``sink.gate_metric`` (:data:`GATE_METRICS`).
"""

from __future__ import annotations

import heapq
import json
import logging
import threading
import time
from collections import Counter, OrderedDict, deque
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator

from edge_agent.config import BrokerConfig
from edge_agent.protocol import LOCAL_ROOT, LocalStream, Topics, validate_id
from edge_agent.supervisor import EventSink, PipelineConfigBase

log = logging.getLogger(__name__)

GATE_METRICS = {
    "cart_review_rate": "carts sent to review / carts closed, over review_window_s (reported once min_carts closed in it)",
}
"""Gate metrics this pipeline reports (name -> meaning); docs/agent.md lists them for policies."""

VISION_EVENTS = frozenset({"person_entered", "person_exited", "zone_enter", "zone_exit", "dwell"})
DOOR_EVENTS = frozenset({"door_opened", "door_closed"})
SHOP_EVENTS = VISION_EVENTS | DOOR_EVENTS | {"shelf_change"}


def stream_node(username: str | None, shop: str, what: str) -> str:
    """Return the node part of a shop-local stream publisher's broker user ``<shop>.<node>``.

    A stream's topic carries the node of the user that publishes it
    (``local/v1/{shop}/{tracks|detections}/{node}/{stream}``), and the shop broker lets each node
    user write only under its own node (``fleet_controller.broker_config.shop_local_acl``), so the
    topic is the publisher's identity. ``what`` names the config key in the error (e.g.
    ``tracks.broker.username``). Raise ``ValueError`` saying what to set.
    """
    if not username:
        raise ValueError(
            f"{what} is required: the stream goes to local/v1/{shop}/.../<node>/..., where <node> is the node part of this "
            f"broker user '{shop}.<node>' (broker-config's node list), the only node the shop broker lets it publish under"
        )
    user_shop, dot, node = username.partition(".")
    if not dot or user_shop != shop:
        raise ValueError(
            f"{what} {username!r} is not a user of shop {shop!r}: set '{shop}.<node>' as broker-config writes it (the topic's "
            f"node is the part after the dot, the only node the shop broker lets this user publish under)"
        )
    return validate_id(node, f"node part of {what} {username!r}")


def track_topic(shop: str, node: str, stream: str) -> str:
    """Return the shop-local topic of a track stream: ``local/v1/{shop}/tracks/{node}/{stream}``.

    ``node`` is the node part of the publisher's broker user (:func:`stream_node`), ``stream`` the
    camera (or merged view, e.g. ``floor``) the tracks are of.
    """
    return Topics.local(shop, LocalStream.TRACKS, node, stream)


def track_subscription(shop: str) -> str:
    """Return the subscription to every track stream of a shop (every publisher's, every camera's)."""
    return Topics.local_filter(shop, LocalStream.TRACKS)


def broker_settings(b: BrokerConfig, client_id: str) -> Any:
    """Return ``MqttSettings`` for a pipeline's own connection to the shop broker."""
    from edge_agent.mqtt_core import MqttSettings, TlsSettings

    tls = None
    if b.tls is not None:
        tls = TlsSettings(ca_file=b.tls.ca_file, cert_file=b.tls.cert_file, key_file=b.tls.key_file, insecure=b.tls.insecure)
    return MqttSettings(host=b.host, port=b.port, client_id=client_id, username=b.username, password=b.secret(), tls=tls,
                        keepalive_s=b.keepalive_s)


class Config(PipelineConfigBase):
    """Fusion of one shop: sessions, attribution, carts."""

    type: Literal["fusion"] = Field(description="Pipeline type: shopper sessions and carts from the shop's tracks and shelf events.")
    shop: str = Field(min_length=1, description="Shop id whose events and tracks to fuse (this node's shop).")
    layout: str = Field(
        min_length=1,
        description="Shop layout YAML: door line, slots with board/channel, product and price, and publishers: the node each kind of "
        "event is taken from (required here; docs/fusion.md).",
    )
    broker: BrokerConfig = Field(default_factory=BrokerConfig, description="The shop broker, with a user of this pipeline's own (docs/fusion.md).")
    track_node: str = Field(
        min_length=1,
        description="Node part of the broker user ('<shop>.<node>') that publishes the track stream fusion reads (vision-gpu's "
        "track-stream, a floor pipeline's user): tracks are taken from local/v1/{shop}/tracks/{track_node}/... only; camera's "
        "tracks under any other node are counted (track_wrong_node) and dropped.",
    )
    camera: str | None = Field(
        None, description="Use only this camera's tracks (the stream track_node publishes, e.g. floor) and door crossings; default: all of track_node's streams."
    )
    reorder_delay_s: float = Field(
        1.0, ge=0, le=30, description="Hold inputs this long to sort them by time. Longer tolerates slower links between nodes; carts close that much later."
    )
    review_window_s: float = Field(3600.0, gt=0, description="Window of cart_review_rate. Shorter reacts sooner to a bad release; longer is steadier.")
    gate_interval_s: float = Field(5.0, gt=0, le=3600, description="Report cart_review_rate this often.")
    min_carts: int = Field(
        10, ge=1, description="Report cart_review_rate only once this many carts closed in the window: a rate over two carts would fail a rollout gate by chance."
    )
    fusion: dict[str, Any] = Field(default_factory=dict, description="FusionConfig keys (docs/fusion.md 'Configuration'), e.g. confidence_bar.")
    inbox_max: int = Field(
        20000, ge=100, le=10_000_000,
        description="Track messages waiting to be fused beyond this are dropped (tracks_inbox_full); events only past five times it (inbox_full). Bounds memory against a flooding publisher.",
    )

    @field_validator("track_node")
    @classmethod
    def _node(cls, v: str) -> str:
        return validate_id(v, "track_node (a node id)")

    @field_validator("camera")
    @classmethod
    def _camera(cls, v: str | None) -> str | None:
        return None if v is None else validate_id(v, "camera name")


class FusionPipeline:
    """Run fusion of one shop under the agent's supervisor."""

    kind = "fusion"

    def __init__(self, config: Config, clock: Any = time.time) -> None:
        self.config = config
        self.name = config.name
        self.clock = clock
        self._lock = threading.Lock()
        self._errors: Counter[str] = Counter()
        self._detail = "not started"
        self._inbox: deque[tuple[str, bytes]] = deque()
        self._wake = threading.Event()
        self._seen: OrderedDict[tuple[str, str, int], None] = OrderedDict()
        self._closed: deque[tuple[float, bool]] = deque()  # (when, sent to review)
        self._stats: Counter[str] = Counter()
        self._fusion: Any = None
        self._logged: set[str] = set()
        self._read: Counter[str] = Counter()  # track messages and events read (health detail)
        self._publishers: Any = None  # fusion.layout.PublishersSpec once bound (bind): no event is taken before

    def bind(self, layout: Any) -> None:
        """Take events only from the nodes ``layout.publishers`` names; raise ``ValueError`` saying what to add when it has none."""
        pub = layout.publishers
        if pub is None:
            raise ValueError(
                f"layout {self.config.layout} has no publishers: fusion takes each kind of event only from the node that publishes it "
                "(the <node> of fleet/v1/<shop>/<node>/events); add publishers: {vision: <node of the camera's agent>, door: <node reading "
                "the door contact>, boards: {<board>: <node reading it>, ...}} (docs/fusion.md, 'Events bound to their publisher')"
            )
        self._publishers = pub
        log.info("fusion %s: events taken from: vision events from %s, door events from %s, shelf events by board %s; any other node's are dropped "
                 "(event_wrong_node)", self.name, pub.vision, pub.door, ", ".join(f"{b}: {n}" for b, n in sorted(pub.boards.items())))

    def _bound(self, kind: str, board: str | None) -> tuple[frozenset[str], str]:
        """Return the nodes an event of ``kind`` (of ``board``) is taken from, and the config that says so."""
        pub = self._publishers
        if pub is None:
            return frozenset(), "no layout bound yet"
        if kind in VISION_EVENTS:
            return frozenset({pub.vision}), f"publishers.vision is {pub.vision!r}"
        if kind in DOOR_EVENTS:
            return frozenset({pub.door}), f"publishers.door is {pub.door!r}"
        node = pub.boards.get(board)
        if node is not None:
            return frozenset({node}), f"publishers.boards[{board}] is {node!r}"
        return pub.board_nodes(), f"board {board!r} is not in the layout, so only a board node ({', '.join(sorted(pub.board_nodes()))}) is taken"

    def _from_bound(self, kind: str, node: str, board: str | None = None) -> bool:
        """Return True when ``node`` publishes ``kind`` (of ``board``) for fusion; else count and log it (event_wrong_node)."""
        nodes, why = self._bound(kind, board)
        if node in nodes:
            return True
        what = f"{kind} of board {board!r}" if board is not None else kind
        self._refuse("event_wrong_node", node, f"a {what} from node {node!r}, but {why}", kind)
        return False

    # ----- intake of MQTT messages (network thread: hand off only) ---------------------------

    def _on_message(self, msg: Any) -> None:
        # Bounded, so a publisher flooding the shop broker cannot exhaust the node's memory. Tracks go
        # first (a lost position is replaced a tenth of a second later); events, which carts are made
        # of, only past five times the bound.
        waiting, bound = len(self._inbox), self.config.inbox_max
        if waiting >= bound:
            local = msg.topic.startswith(LOCAL_ROOT + "/")
            if local or waiting >= 5 * bound:
                reason = "tracks_inbox_full" if local else "inbox_full"
                self._count(reason)
                if reason not in self._logged:
                    self._logged.add(reason)
                    log.warning("fusion %s: %d messages waiting (inbox_max %d): dropping %s until it drains", self.name, waiting, bound,
                                "track messages" if local else "events: carts will go to review")
                return
        self._inbox.append((msg.topic, msg.payload))
        self._wake.set()

    def _count(self, reason: str) -> None:
        with self._lock:
            self._errors[reason] += 1

    def _refuse(self, reason: str, node: str, detail: str, kind: str = "") -> None:
        """Count a message refused for where it came from; warn once per reason, node and event kind (then debug)."""
        self._count(reason)
        key = f"{reason}/{node}/{kind}"
        level = logging.DEBUG if key in self._logged else logging.WARNING
        self._logged.add(key)
        log.log(level, "fusion %s: dropped %s (%s)%s", self.name, detail, reason,
                "" if level == logging.DEBUG else f"; further ones of this node{' and kind' if kind else ''} and reason are logged at debug level")

    def _decode(self, topic: str, payload: bytes) -> list[Any]:
        """Turn one message into fusion inputs; count and drop what is not usable."""
        from edge_agent.protocol import Alert, Event, ProtocolError, parse_message
        from fusion.types import (
            BoardLink,
            DoorContact,
            DoorCrossing,
            ShelfChange,
            TrackLost,
            TrackObservation,
            ZoneVisit,
        )

        cam = self.config.camera
        try:
            if topic.startswith(LOCAL_ROOT + "/"):
                where = Topics.parse_local(topic)
                if where is None:
                    raise ValueError(f"not a track stream topic: {topic}")
                node, camera = where
                if cam is not None and camera != cam:
                    return []  # another camera's stream: not fusion's input, from whoever
                if node != self.config.track_node:
                    # Fusion's camera published under another node's prefix: only that node's user could have (the
                    # shop broker's ACL), and it is not the publisher this pipeline is bound to. Never fused.
                    self._refuse("track_wrong_node", node, f"tracks of {camera!r} from node {node!r}, but track_node is {self.config.track_node!r}")
                    return []
                body = json.loads(payload)
                if str(body.get("camera", "")) != camera:
                    self._refuse("track_camera_mismatch", node, f"the message names camera {body.get('camera')!r} but came on {topic}")
                    return []
                ts = float(body["ts"])
                out: list[Any] = [TrackObservation(int(t[0]), ts, float(t[1]), float(t[2]), camera=camera) for t in body.get("tracks", [])]
                out += [TrackLost(int(t), ts, camera=camera) for t in body.get("ended", [])]
                with self._lock:
                    self._read["track_messages"] += 1
                return out
            msg = parse_message(topic, payload)
        except (ProtocolError, ValueError, KeyError, TypeError, IndexError) as exc:
            self._count("bad_track_message" if topic.startswith(LOCAL_ROOT) else "bad_event")
            log.debug("fusion %s: dropped a message on %s: %s", self.name, topic, exc)
            return []
        if not isinstance(msg, Event | Alert):
            return []
        with self._lock:
            self._read["events"] += 1
        try:
            # What it is and whether its publisher is the node bound to it, before anything is remembered of it: another
            # node's messages, however many, never push the genuine ones out of the duplicate memory.
            board: str | None = None
            if isinstance(msg, Alert):
                if msg.name != "sensor_board_disconnected":
                    return []
                kind, board, d, at = msg.name, msg.source, {}, msg.ts
            else:
                if msg.type not in SHOP_EVENTS:
                    return []
                kind, d, at = msg.type, msg.data, (msg.at if msg.at is not None else msg.ts)
                if kind in VISION_EVENTS and cam is not None and d.get("camera", msg.source) != cam:
                    return []  # another camera's events: not fusion's input, from whoever
                if kind == "shelf_change":
                    board = str(d["board"])
            if not self._from_bound(kind, msg.node, board):
                return []
            key = (msg.node, msg.epoch, msg.seq)
            if key in self._seen:
                self._count("duplicate")
                return []
            self._seen[key] = None
            if len(self._seen) > 100_000:
                self._seen.popitem(last=False)
            if isinstance(msg, Alert):
                return [BoardLink(msg.source, msg.state == "resolved", msg.ts)]
            if kind in VISION_EVENTS:
                if d.get("track_id") is None:
                    return []
                if kind == "person_entered":
                    return [DoorCrossing(int(d["track_id"]), at, "in")]
                if kind == "person_exited":
                    return [DoorCrossing(int(d["track_id"]), at, "out")]
                return [ZoneVisit(int(d["track_id"]), at, str(d.get("zone") or ""), kind)]  # type: ignore[arg-type]
            if kind == "shelf_change":
                return [ShelfChange(f"{msg.node}/{msg.epoch}/{msg.seq}", str(d["board"]), int(d["channel"]), str(d.get("slot") or ""),
                                    str(d.get("product") or ""), int(d["quantity"]), float(d["delta_g"]), float(d["confidence"]), at)]
            return [DoorContact(at, kind == "door_opened", str(d.get("board", msg.source)))]
        except (KeyError, TypeError, ValueError) as exc:
            self._count(f"bad_{msg.type}" if isinstance(msg, Event) else "bad_alert")
            log.warning("fusion %s: a %s from %s lacks what fusion needs (%s); dropped", self.name, getattr(msg, "type", "message"), msg.node, exc)
            return []

    # ----- the loop -------------------------------------------------------------------------

    def run(self, stop: threading.Event, sink: EventSink) -> None:
        """Subscribe on the shop broker and fuse until ``stop``; closed carts go out through ``sink``."""
        import yaml

        from edge_agent.mqtt_core import ThreadedLink
        from edge_agent.protocol import Channel, Topics
        from fusion.engine import Fusion, FusionConfig
        from fusion.layout import parse_layout

        cfg = self.config
        try:
            layout = parse_layout(yaml.safe_load(Path(cfg.layout).read_text()), source=cfg.layout)
            self.bind(layout)
            fcfg = FusionConfig.model_validate(cfg.fusion)
        except OSError as exc:
            raise RuntimeError(f"pipelines[{cfg.name}]: cannot read layout {cfg.layout}: {exc}") from None
        except ValueError as exc:  # LayoutInvalid, pydantic ValidationError, YAML errors
            raise RuntimeError(f"pipelines[{cfg.name}]: {exc}") from None
        fusion = Fusion(layout, fcfg)
        self._fusion = fusion
        run_id = format(int(self.clock() * 1000), "x")  # a restart never reuses a cart id
        subs = (f"{Topics.root}/{cfg.shop}/+/{Channel.EVENTS.value}", track_subscription(cfg.shop))
        link = ThreadedLink(broker_settings(cfg.broker, f"fusion-{cfg.shop}-{cfg.name}"), self._on_message, subscriptions=subs,
                            reconnect_min_s=max(1, int(cfg.broker.reconnect_min_s)), reconnect_max_s=max(1, int(cfg.broker.reconnect_max_s)))
        link.start()
        self._detail = f"fusing shop {cfg.shop} ({len(layout.slots)} slots) from {cfg.broker.host}:{cfg.broker.port}"
        pending: list[tuple[float, int, Any]] = []
        n = 0
        last_gate = 0.0
        newest = -float("inf")  # newest input time seen (data time: the nodes' clocks)
        arrived = time.monotonic()  # when the last message came
        try:
            while not stop.is_set():
                self._wake.wait(0.2)
                self._wake.clear()
                while self._inbox:
                    topic, payload = self._inbox.popleft()
                    arrived = time.monotonic()
                    for item in self._decode(topic, payload):
                        heapq.heappush(pending, (item.ts, n, item))
                        newest = max(newest, item.ts)
                        n += 1
                # Feed what is older than the newest input by the reorder delay; when nothing has come for
                # that long, feed everything and let fusion's clock run on from the newest input at the
                # wall clock's pace, so carts close in an empty shop (and a replayed backlog keeps its own time).
                idle = time.monotonic() - arrived
                horizon = newest - cfg.reorder_delay_s if idle < cfg.reorder_delay_s else newest + idle - cfg.reorder_delay_s
                closed = []
                while pending and (pending[0][0] <= horizon or idle >= cfg.reorder_delay_s):
                    closed += fusion.feed(heapq.heappop(pending)[2])
                if idle >= cfg.reorder_delay_s and newest > -float("inf"):
                    closed += fusion.advance(horizon)
                for cart in closed:
                    self._send(cart, run_id, sink)
                now = time.monotonic()
                if now - last_gate >= cfg.gate_interval_s:
                    last_gate = now
                    self.report_gates(sink)
        finally:
            link.stop()

    def _send(self, cart: Any, run_id: str, sink: EventSink) -> None:
        event = cart.to_event()
        cart_id = f"{cart.cart_id}-{run_id}"
        event["cart_id"] = cart_id
        for a in event.get("attributions", []):
            if a.get("cart_id"):
                a["cart_id"] = f"{a['cart_id']}-{run_id}"
        kind = event.pop("type")
        sink.event(kind, self.name, event, at=cart.closed_at)
        review = kind == "cart_review"
        with self._lock:
            self._stats["carts_review" if review else "carts_receipt"] += 1
            self._closed.append((self.clock(), review))

    def review_rate(self) -> float | None:
        """Return carts sent to review / carts closed over the window (None until ``min_carts`` closed in it)."""
        with self._lock:
            cutoff = self.clock() - self.config.review_window_s
            while self._closed and self._closed[0][0] < cutoff:
                self._closed.popleft()
            if len(self._closed) < self.config.min_carts:
                return None
            return sum(r for _, r in self._closed) / len(self._closed)

    def report_gates(self, sink: EventSink) -> None:
        """Report :data:`GATE_METRICS` through ``sink`` (nothing until ``min_carts`` carts closed)."""
        rate = self.review_rate()
        if rate is not None:
            sink.gate_metric("cart_review_rate", rate, "higher")

    def health(self) -> dict[str, Any]:
        """Return open sessions, carts made, and errors by reason (bad input and fusion's own counts)."""
        with self._lock:
            errors = dict(self._errors)
            stats = dict(self._stats)
            read = dict(self._read)
        fusion = self._fusion
        if fusion is not None:
            for reason, count in fusion.errors.items():
                errors[f"fusion_{reason}"] = errors.get(f"fusion_{reason}", 0) + count
        sessions = len(fusion.open_sessions()) if fusion is not None else 0
        detail = (f"{self._detail}; {sessions} shoppers inside, {stats.get('carts_receipt', 0)} receipts, {stats.get('carts_review', 0)} to review; "
                  f"read {read.get('track_messages', 0)} track messages, {read.get('events', 0)} events")
        return {"detail": detail, "errors": sum(errors.values()), "errors_by_reason": errors}


def build(config: Config) -> FusionPipeline:
    """Return the pipeline for a ``type: fusion`` config entry."""
    return FusionPipeline(config)
