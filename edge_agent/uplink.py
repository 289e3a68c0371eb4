"""The uplink: one thread that owns the MQTT connection and drains the outbox into it.

It connects with a Last Will (retained ``offline`` presence carrying a fresh session number),
announces itself with a retained ``online`` birth of the same session, subscribes to the node's
downlink topics, then loops: hand stored messages to the broker in ``seq`` order (at most
``inflight`` unacknowledged at a time, so a week of backlog never sits in memory twice), delete
each one when its PUBACK arrives, pass incoming messages to the agent. When the link drops it
reconnects with exponential backoff and jitter; paho re-sends what was unacknowledged.

A publish the broker **refuses** (MQTT 5 PUBACK reason code 0x80 or above, e.g. 0x87 "not
authorized" from the ACL; a 3.1.1 broker cannot say so) will never be accepted however often it is
sent: the message is removed from the outbox without being counted as sent, counted in
``shopfleet_agent_publishes_refused_total{reason}``, logged at ERROR with its topic and seq, and
reported in the next heartbeats' ``metrics`` (``mqtt_publishes_refused_total``). Keeping it would
resend it forever (and, with ``ack: controller``, hold the oldest unconfirmed message for good);
the controller sees its seq as missing. A refused subscription is counted and logged likewise.

One thread does all of it, so paho's callbacks never race with the outbox cursor, and the
thread sleeps in ``select`` until the socket has data, a new message is enqueued (``wake``
interrupts the select) or ``poll_interval_s`` passes, which keeps an idle agent's CPU share far
below 1% of a Pi core.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable, Sequence

from edge_agent.metrics import AgentMetrics
from edge_agent.mqtt import (
    ConnectFailed,
    ConnectRefused,
    InMessage,
    MqttLink,
    MqttSettings,
    OutMessage,
    Refusal,
)
from edge_agent.outbox import Outbox
from edge_agent.protocol import Channel, Presence, Topics, encode
from shopfleet.errors import PermanentError, TemporaryError

log = logging.getLogger(__name__)


def backoff_delay(attempt: int, minimum: float, maximum: float, rand: Callable[[], float] = random.random) -> float:
    """Return the delay before reconnect ``attempt`` (0-based): doubling, capped, with ±25% jitter."""
    base = min(minimum * (2**attempt), maximum)
    return base * (0.75 + 0.5 * rand())


class UplinkLoop:
    """Own the broker connection of one agent; thread-safe ``wake``/``stop`` from outside."""

    def __init__(
        self,
        settings: MqttSettings,
        outbox: Outbox,
        metrics: AgentMetrics,
        *,
        shop: str,
        node: str,
        on_downlink: Callable[[InMessage], None],
        subscriptions: Sequence[str] | None = None,
        agent_version: str = "",
        reconnect_min_s: float = 0.5,
        reconnect_max_s: float = 30.0,
        inflight: int = 50,
        poll_interval_s: float = 1.0,
        ack: str = "broker",
        ack_timeout_s: float = 30.0,
    ) -> None:
        if ack not in ("broker", "controller"):
            raise ValueError(f"uplink ack mode {ack!r}: use 'controller' or 'broker'")
        self.settings = settings
        self.outbox = outbox
        self.metrics = metrics
        self.shop = shop
        self.node = node
        self.subscriptions = tuple(subscriptions if subscriptions is not None else Topics.agent_subscriptions(shop, node))
        self.agent_version = agent_version
        self.reconnect_min_s = reconnect_min_s
        self.reconnect_max_s = reconnect_max_s
        self.inflight_limit = inflight
        self.poll_interval_s = poll_interval_s
        self.ack_mode = ack
        self.ack_timeout_s = ack_timeout_s
        self._stored_acks: list[tuple[str, int, tuple[tuple[int, int], ...]]] = []  # from the network thread
        # Controller mode: seq -> when the broker acknowledged its latest send, oldest first (re-inserted on every
        # send), so the messages to send again are a prefix. Confirmed seqs leave it lazily (checked against the outbox).
        self._awaiting: dict[int, float] = {}
        self._resend_tokens = float(inflight)  # re-sends allowed now; refilled at `inflight` per second
        self._resend_refilled = time.monotonic()
        self.resends = 0  # messages sent again because the controller had not confirmed them in ack_timeout_s
        self.on_drained: Callable[[], bool] | None = None
        """Called by a drain that emptied the outbox; returns True if it enqueued a last message (sent before the goodbye)."""
        self._presence_topic = Topics.node(shop, node, Channel.PRESENCE)
        self._link = MqttLink(settings, on_message=on_downlink, on_ack=self._on_ack, on_refused=self._on_refused, max_inflight=inflight)
        self._inflight: dict[int, int] = {}  # paho mid -> outbox seq
        self._inflight_topics: dict[int, str] = {}  # paho mid -> topic, for the log of a refusal
        self._refused: list[int] = []  # seqs the broker refused, removed from the outbox by the loop
        self.publishes_refused = 0
        self.subscriptions_refused = 0
        self._presence_mids: set[int] = set()
        self._acked: list[int] = []
        self._cursor = 0  # highest seq handed to paho in this process
        self._dirty = threading.Event()
        self._interrupted = threading.Event()  # cuts a reconnect backoff short on stop
        self._drain_deadline: float | None = None
        self.connected = threading.Event()
        self.session = 0
        self._session_used = False  # whether self.session has had a connection (then the next one takes a new number)
        self.last_ack: float | None = None
        self.ever_connected = False
        self._thread: threading.Thread | None = None
        self._connect_errors_logged: set[str] = set()

    # control -----------------------------------------------------------------------------------

    def start(self) -> None:
        """Start the uplink thread."""
        self._thread = threading.Thread(target=self._run, name=f"uplink-{self.shop}-{self.node}", daemon=True)
        self._thread.start()

    def wake(self) -> None:
        """Tell the loop that the outbox has new messages."""
        self._dirty.set()
        self._link.interrupt()

    def stop(self, drain_timeout: float) -> None:
        """Drain the outbox for up to ``drain_timeout`` s, send offline presence, disconnect, join."""
        self._drain_deadline = time.monotonic() + drain_timeout
        self._dirty.set()
        self._interrupted.set()
        self._link.interrupt()
        if self._thread is not None:
            self._thread.join(drain_timeout + 15)

    def _presence(self, state: str, reason: str = "") -> OutMessage:
        msg = Presence(shop=self.shop, node=self.node, state=state, session=self.session, agent_version=self.agent_version, reason=reason)  # type: ignore[arg-type]
        return OutMessage(self._presence_topic, encode(msg), qos=1, retain=True)

    # loop --------------------------------------------------------------------------------------

    def _draining_done(self) -> bool:
        if self._drain_deadline is None:
            return False
        if time.monotonic() >= self._drain_deadline:
            return True
        # Controller mode waits for the stored-acks too (up to the drain deadline).
        return self.outbox.depth() == 0 and not self._inflight

    def _run(self) -> None:
        attempt = 0
        try:
            while True:
                if self._drain_deadline is not None and time.monotonic() >= self._drain_deadline:
                    break
                try:
                    # The session counts connections, not attempts (docs/protocol.md): a number is
                    # taken once and reused by every failed attempt until one connects. A failed
                    # attempt never registered its Will, so reusing its number cannot confuse presence.
                    if self._session_used or self.session == 0:
                        self.session = self.outbox.next_session()
                        self._session_used = False
                    self._link.connect(will=self._presence("offline", "will"))
                    self._session_used = True
                except (ConnectFailed, ConnectRefused) as exc:
                    reason = exc.reason
                    self.metrics.connect_failures.labels(reason).inc()
                    level = logging.WARNING if reason not in self._connect_errors_logged else logging.DEBUG
                    self._connect_errors_logged.add(reason)
                    delay = backoff_delay(attempt, self.reconnect_min_s, self.reconnect_max_s)
                    log.log(level, "node %s/%s: %s; retrying in %.1fs", self.shop, self.node, exc, delay)
                    attempt += 1
                    self._wait(delay)
                    continue
                except PermanentError as exc:
                    log.error("node %s/%s: %s; the uplink stops", self.shop, self.node, exc)
                    return
                except Exception:
                    log.exception("node %s/%s: cannot connect", self.shop, self.node)
                    attempt += 1
                    self._wait(backoff_delay(attempt, self.reconnect_min_s, self.reconnect_max_s))
                    continue
                attempt = 0
                self._connect_errors_logged.clear()
                if self.ack_mode == "controller":
                    # Whatever the controller has not confirmed goes again on the new connection.
                    self._inflight.clear()
                    self._inflight_topics.clear()
                    self._awaiting.clear()  # the cursor sends them all again; the PUBACKs time them afresh
                    self._cursor = 0
                if self.ever_connected:
                    self.metrics.reconnects.inc()
                self.ever_connected = True
                log.info("node %s/%s connected to %s:%s (session %d)", self.shop, self.node, self.settings.host, self.settings.port, self.session)
                try:
                    self._presence_mids.add(self._link.publish(self._presence("online")))
                    self._link.subscribe(self.subscriptions)
                    self.connected.set()
                    self.metrics.connected.set(1)
                    self._dirty.set()
                    self._serve()
                    self._goodbye()
                    return
                except TemporaryError as exc:
                    log.warning("node %s/%s: %s; reconnecting", self.shop, self.node, exc)
                except Exception:
                    log.exception("node %s/%s: uplink error; reconnecting", self.shop, self.node)
                    self._link.disconnect()
                finally:
                    self.connected.clear()
                    self.metrics.connected.set(0)
                    self._commit_acks()
                self._wait(backoff_delay(0, self.reconnect_min_s, self.reconnect_max_s))
        finally:
            self._commit_acks()
            self._link.close()  # the wake-up socket pair; a late wake() is then a no-op

    def _wait(self, delay: float) -> None:
        if self._drain_deadline is not None:
            # Stopping while disconnected: keep trying until the drain deadline, never past it.
            time.sleep(max(min(delay, self._drain_deadline - time.monotonic()), 0))
        else:
            self._interrupted.wait(delay)

    def _serve(self) -> None:
        """Pump and poll until the link drops (raises TemporaryError) or a drain finished."""
        last_words = 0
        while True:
            self._pump()
            self._link.poll(self.poll_interval_s)
            self._commit_acks()
            self._resend_unconfirmed()
            if self._draining_done():
                # Drained before the deadline: a last message (the agent's final heartbeat with the eviction
                # reports still pending) goes up too, then the drain waits for it. A few rounds at most.
                if (self.on_drained is not None and last_words < 4 and self.outbox.depth() == 0
                        and self._drain_deadline is not None and time.monotonic() < self._drain_deadline):
                    last_words += 1
                    try:
                        if self.on_drained():
                            self._dirty.set()
                            continue
                    except Exception:
                        log.exception("node %s/%s: the last report before stopping failed", self.shop, self.node)
                return

    def _pump(self) -> None:
        room = self.inflight_limit - len(self._inflight)
        if room <= 0 or not self._dirty.is_set():
            return
        self._dirty.clear()
        for m in self.outbox.peek(after_seq=self._cursor, limit=room):
            mid = self._link.publish(OutMessage(m.topic, m.payload, qos=1, retain=m.retain))
            self._inflight[mid] = m.seq
            self._inflight_topics[mid] = m.topic
            self._cursor = m.seq
            room -= 1
        if room <= 0:
            self._dirty.set()  # there may be more; continue after acknowledgements

    def stored_ack(self, epoch: str, seq: int, missing: tuple[tuple[int, int], ...]) -> None:
        """Take the controller's stored-ack (called from the link's network thread); applied by the loop."""
        self._stored_acks.append((epoch, seq, missing))
        self._link.interrupt()

    def _resend_unconfirmed(self) -> None:
        """Controller mode: send again each message the controller has not confirmed ``ack_timeout_s`` after its send.

        Per message, so a hole a stored-ack keeps naming (what a killed controller replica held) goes again
        while newer messages are being confirmed. Bounded: only free in-flight room is used, at most
        ``inflight`` re-sends per second, and a message waits ``ack_timeout_s`` again after each re-send.
        """
        if self.ack_mode != "controller" or not self._awaiting:
            return
        now = time.monotonic()
        expired: list[int] = []
        for seq, at in self._awaiting.items():
            if now - at < self.ack_timeout_s or len(expired) >= 500:
                break
            expired.append(seq)
        if not expired:
            return
        self._resend_tokens = min(float(self.inflight_limit), self._resend_tokens + (now - self._resend_refilled) * self.inflight_limit)
        self._resend_refilled = now
        room = min(self.inflight_limit - len(self._inflight), int(self._resend_tokens))
        if room <= 0:
            return
        stored = {m.seq: m for m in self.outbox.get(expired)}
        on_the_way = set(self._inflight.values())
        resent = 0
        for seq in expired:
            m = stored.get(seq)
            if m is None or seq in on_the_way:  # confirmed (deleted), or being sent right now
                del self._awaiting[seq]
                continue
            if resent >= room:
                break
            del self._awaiting[seq]  # timed afresh by its PUBACK
            mid = self._link.publish(OutMessage(m.topic, m.payload, qos=1, retain=m.retain))
            self._inflight[mid] = m.seq
            self._inflight_topics[mid] = m.topic
            resent += 1
        if resent:
            self._resend_tokens -= resent
            self.resends += resent
            self.metrics.resent.inc(resent)
            log.info("node %s/%s: %d messages not confirmed by the controller %.0fs after sending (oldest seq %d); sent again",
                     self.shop, self.node, resent, self.ack_timeout_s, expired[0])

    def refusal_report(self) -> dict[str, float]:
        """Return what to add to the heartbeat's ``metrics``: the refusal counts since start, only once there are any."""
        out: dict[str, float] = {}
        if self.publishes_refused:
            out["mqtt_publishes_refused_total"] = float(self.publishes_refused)
        if self.subscriptions_refused:
            out["mqtt_subscriptions_refused_total"] = float(self.subscriptions_refused)
        return out

    def _on_refused(self, refusal: Refusal) -> None:
        """The broker refused a publish or subscription (called in the loop's thread, inside a poll)."""
        self.last_ack = time.monotonic()  # the broker did answer
        if refusal.kind == "subscribe":
            self.subscriptions_refused += 1
            self.metrics.subscriptions_refused.labels(refusal.reason).inc()
            log.error("node %s/%s: the broker refused the subscription to %r (%s, reason code 0x%02X): this node will not receive "
                      "it; check the node's ACL ('shopfleet broker-config') and its shop and node ids",
                      self.shop, self.node, refusal.topic, refusal.reason, refusal.code)
            return
        self.publishes_refused += 1
        self.metrics.publishes_refused.labels(refusal.reason).inc()
        topic = self._inflight_topics.pop(refusal.mid, "")
        seq = self._inflight.pop(refusal.mid, None)
        if refusal.mid in self._presence_mids:
            self._presence_mids.discard(refusal.mid)
            topic = self._presence_topic
        if seq is not None:
            self._refused.append(seq)
            self._dirty.set()
        log.error("node %s/%s: the broker refused the publish to %r%s (%s, reason code 0x%02X); it is dropped%s, never retried: "
                  "check the node's ACL ('shopfleet broker-config') and its shop and node ids",
                  self.shop, self.node, topic, f" (outbox seq {seq})" if seq is not None else "", refusal.reason, refusal.code,
                  " from the outbox" if seq is not None else "")

    def _on_ack(self, mid: int) -> None:
        self._inflight_topics.pop(mid, None)
        seq = self._inflight.pop(mid, None)
        if seq is not None:
            if self.ack_mode == "broker":
                self._acked.append(seq)
            else:  # sent, awaiting the controller's stored-ack; newest send time last
                self._awaiting.pop(seq, None)
                self._awaiting[seq] = time.monotonic()
            self._dirty.set()
        self._presence_mids.discard(mid)
        self.last_ack = time.monotonic()

    def _commit_acks(self) -> None:
        if self._refused:
            refused, self._refused = self._refused, []
            self.outbox.ack(refused)  # removed, not counted as sent
        if self._stored_acks:
            stored, self._stored_acks = self._stored_acks, []
            for epoch, seq, missing in stored:
                kinds = self.outbox.ack_stored(epoch, seq, missing)
                for kind in kinds:
                    self.metrics.sent.labels(kind).inc()
            if self._awaiting and self.outbox.depth() == 0:
                self._awaiting.clear()
        if not self._acked:
            return
        acked, self._acked = self._acked, []
        for kind in self.outbox.ack(acked):
            self.metrics.sent.labels(kind).inc()

    def _goodbye(self) -> None:
        """Publish offline presence (reason 'shutdown'), wait briefly for its ack, disconnect."""
        try:
            mid = self._link.publish(self._presence("offline", "shutdown"))
            self._presence_mids.add(mid)
            deadline = time.monotonic() + 3.0
            while mid in self._presence_mids and time.monotonic() < deadline:
                self._link.poll(0.05)
        except TemporaryError as exc:
            log.warning("node %s/%s: could not say goodbye: %s", self.shop, self.node, exc)
        finally:
            self._link.disconnect()
            log.info(
                "node %s/%s disconnected; %d messages left in the outbox for the next start",
                self.shop,
                self.node,
                self.outbox.depth(),
            )
