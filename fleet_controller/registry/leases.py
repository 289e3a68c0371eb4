"""Intake partitions leased through the database, so controller replicas split the fleet by shop.

Every shop belongs to one of ``P`` partitions (:func:`partition_of`, a CRC-32 of the shop id, the
same on every replica and across restarts). Replicas that share a database hold those partitions
by lease (table ``intake_leases``, one row per partition: ``owner``, ``expires_at``,
``generation``, ``active``, ``shops``) and announce themselves in ``intake_members`` (a row per live replica,
renewed with its leases). :meth:`LeaseBook.tick` is one round of the protocol, run by every
replica every ``ttl / 3`` seconds in one transaction:

1. renew its member row; the live members (unexpired rows), sorted by name, give each replica its
   quota: ``P // n`` partitions, one more for the first ``P % n`` names;
2. renew its own leases (``UPDATE ... WHERE owner = me``: a lease someone else took is gone);
3. above its quota, release the highest partitions it holds (owner set to NULL);
4. below its quota, claim free or expired partitions, each with a conditional
   ``UPDATE ... WHERE partition = p AND (owner IS NULL OR expires_at < now)`` (one row or none,
   so two replicas can never both claim one lease; PostgreSQL re-checks the condition after the
   row lock, SQLite serialises writers).

A claim bumps ``generation`` and clears ``active``; the new owner sets ``active`` once the broker
confirmed its subscriptions (:meth:`LeaseBook.activate`), and the replica that released the
partition keeps its own subscriptions until then (:meth:`LeaseBook.owners`), so a graceful
hand-over has an overlap, never a hole. Expiry uses the replicas' clocks (keep them in NTP sync;
skew shorter than the TTL only moves a takeover by that much).

Declared here (table definitions), created by revision ``0016_intake_leases``.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from sqlalchemy import Boolean, Float, Integer, String, delete, insert, select, update
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Mapped, mapped_column

from fleet_controller.registry.db import Base, table_of


class IntakeMember(Base):
    """A live controller replica taking part in intake partitioning."""

    __tablename__ = "intake_members"

    replica: Mapped[str] = mapped_column(String(128), primary_key=True)
    expires_at: Mapped[float] = mapped_column(Float)
    started_at: Mapped[float] = mapped_column(Float)


class IntakeLease(Base):
    """Who holds an intake partition, until when, and whether its subscriptions are up."""

    __tablename__ = "intake_leases"

    partition: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    owner: Mapped[str | None] = mapped_column(String(128), nullable=True)
    expires_at: Mapped[float] = mapped_column(Float, default=0.0)
    generation: Mapped[int] = mapped_column(Integer, default=0)
    active: Mapped[bool] = mapped_column(Boolean, default=False)
    acquired_at: Mapped[float] = mapped_column(Float, default=0.0)
    shops: Mapped[int] = mapped_column(Integer, default=0)  # shops of the partition its owner's subscriptions cover


MEMBERS = table_of(IntakeMember)
LEASES = table_of(IntakeLease)

FORGET_MEMBERS_AFTER_S = 3600.0
"""Member rows expired this long ago are deleted (they no longer count either way)."""


class PartitionCountMismatch(ValueError):
    """The database holds another partition count and live replicas use it."""


def partition_of(shop: str, partitions: int) -> int:
    """Return the partition of ``shop``: CRC-32 of its id modulo ``partitions`` (stable everywhere)."""
    return zlib.crc32(shop.encode()) % partitions


def quota(me: str, live: Sequence[str], partitions: int) -> int:
    """Return how many partitions ``me`` should hold among the sorted ``live`` replicas."""
    if me not in live:
        return 0
    n = len(live)
    return partitions // n + (1 if live.index(me) < partitions % n else 0)


@dataclass
class TickResult:
    """What one round of the lease protocol left this replica with."""

    held: dict[int, int] = field(default_factory=dict)  # partition -> generation
    claimed: list[int] = field(default_factory=list)
    released: list[int] = field(default_factory=list)
    lost: list[int] = field(default_factory=list)  # held before, taken by another replica after our lease expired
    live: list[str] = field(default_factory=list)
    quota: int = 0


class LeaseBook:
    """The lease protocol of one replica against the shared database (see the module docstring)."""

    def __init__(self, engine: Engine, replica: str, partitions: int, ttl_s: float) -> None:
        if partitions < 1:
            raise ValueError("partitions must be at least 1")
        self.engine = engine
        self.replica = replica
        self.partitions = partitions
        self.ttl_s = ttl_s
        self._held: dict[int, int] = {}

    def ensure_partitions(self, now: float) -> None:
        """Create the partition rows; refuse another count while live replicas use the old one."""
        with self.engine.begin() as c:
            existing = set(c.scalars(select(LEASES.c.partition)))
            wanted = set(range(self.partitions))
            if existing and existing != wanted:
                others = [r for r in c.scalars(select(MEMBERS.c.replica).where(MEMBERS.c.expires_at > now))
                          if r != self.replica]
                if others:
                    raise PartitionCountMismatch(
                        f"intake.partitions is {self.partitions} but the database has {len(existing)} partitions, used "
                        f"by live replicas {sorted(others)}: give every replica the same intake.partitions, or stop them "
                        "all before changing it"
                    )
                c.execute(delete(LEASES).where(LEASES.c.partition.not_in(wanted)))
        for p in sorted(wanted - existing):
            try:
                with self.engine.begin() as c:
                    c.execute(insert(LEASES).values(partition=p, owner=None, expires_at=0.0, generation=0, active=False,
                                                    acquired_at=0.0, shops=0))
            except IntegrityError:
                continue  # another replica created it first

    def tick(self, now: float) -> TickResult:
        """Run one round: renew, rebalance to the quota, claim or release; return what is held now."""
        out = TickResult()
        with self.engine.begin() as c:
            self._renew_member(c, now, join=True)
            out.live = list(c.scalars(select(MEMBERS.c.replica).where(MEMBERS.c.expires_at > now).order_by(MEMBERS.c.replica)))
            out.quota = quota(self.replica, out.live, self.partitions)
            self._extend_leases(c, now)
            held = {int(p): int(g) for p, g in c.execute(select(LEASES.c.partition, LEASES.c.generation).where(LEASES.c.owner == self.replica))}
            out.lost = sorted(set(self._held) - set(held))
            extra = sorted(held)[out.quota:] if len(held) > out.quota else []
            if extra:
                c.execute(update(LEASES).where(LEASES.c.partition.in_(extra), LEASES.c.owner == self.replica)
                          .values(owner=None, expires_at=0.0, active=False, shops=0))
                for p in extra:
                    held.pop(p)
                out.released = extra
            want = out.quota - len(held)
            if want > 0:
                free = c.scalars(select(LEASES.c.partition)
                                 .where((LEASES.c.owner.is_(None)) | (LEASES.c.expires_at < now))
                                 .order_by(LEASES.c.partition)).all()
                for p in free:
                    if want == 0:
                        break
                    res = c.execute(
                        update(LEASES)
                        .where(LEASES.c.partition == p, (LEASES.c.owner.is_(None)) | (LEASES.c.expires_at < now))
                        .values(owner=self.replica, expires_at=now + self.ttl_s, generation=LEASES.c.generation + 1,
                                active=False, acquired_at=now, shops=0)
                    )
                    if res.rowcount == 1:
                        gen = c.scalar(select(LEASES.c.generation).where(LEASES.c.partition == p))
                        held[int(p)] = int(gen or 0)
                        out.claimed.append(int(p))
                        want -= 1
            c.execute(delete(MEMBERS).where(MEMBERS.c.expires_at < now - FORGET_MEMBERS_AFTER_S))
        self._held = dict(held)
        out.held = dict(held)
        return out

    def renew(self, now: float) -> int:
        """Extend our membership and the leases we hold, nothing else; return how many leases were renewed.

        What :meth:`tick` does first, alone: the router calls it when a tick is late (a tick that
        waits on the broker's answers to thousands of subscriptions can outlast the TTL), so slow
        subscription work never lets the leases lapse. It claims and releases nothing, and it never
        creates the membership row: after :meth:`leave` it renews nothing.
        """
        with self.engine.begin() as c:
            self._renew_member(c, now, join=False)
            return self._extend_leases(c, now)

    def _renew_member(self, c: Connection, now: float, *, join: bool) -> None:
        """Extend our membership row; with ``join``, create it if it is missing (a tick joins, a renewal never does)."""
        res = c.execute(update(MEMBERS).where(MEMBERS.c.replica == self.replica).values(expires_at=now + self.ttl_s))
        if res.rowcount == 0 and join:
            c.execute(insert(MEMBERS).values(replica=self.replica, expires_at=now + self.ttl_s, started_at=now))

    def _extend_leases(self, c: Connection, now: float) -> int:
        res = c.execute(update(LEASES).where(LEASES.c.owner == self.replica).values(expires_at=now + self.ttl_s))
        return int(res.rowcount or 0)

    def activate(self, partition: int, generation: int) -> bool:
        """Mark ``partition`` active (its subscriptions are confirmed) if we still hold that generation."""
        with self.engine.begin() as c:
            res = c.execute(update(LEASES).where(LEASES.c.partition == partition, LEASES.c.owner == self.replica,
                                                 LEASES.c.generation == generation).values(active=True))
            return res.rowcount == 1

    def report_shops(self, counts: dict[int, int]) -> None:
        """Record how many shops of each held partition our subscriptions cover (status for operators and tests)."""
        with self.engine.begin() as c:
            for p, n in counts.items():
                c.execute(update(LEASES).where(LEASES.c.partition == p, LEASES.c.owner == self.replica).values(shops=n))

    def owners(self, partitions: Iterable[int], now: float) -> dict[int, tuple[str | None, bool]]:
        """Return ``partition -> (owner, active)`` for unexpired leases (owner None when free or expired)."""
        ps = list(partitions)
        if not ps:
            return {}
        with self.engine.connect() as c:
            rows = c.execute(select(LEASES.c.partition, LEASES.c.owner, LEASES.c.active, LEASES.c.expires_at)
                             .where(LEASES.c.partition.in_(ps))).all()
        return {int(p): ((o, bool(a)) if o is not None and e >= now else (None, False)) for p, o, a, e in rows}

    def tick_live(self, now: float) -> list[str]:
        """Return the live members (unexpired rows), sorted, without renewing anything."""
        with self.engine.connect() as c:
            return list(c.scalars(select(MEMBERS.c.replica).where(MEMBERS.c.expires_at > now).order_by(MEMBERS.c.replica)))

    def leave(self) -> None:
        """Give every lease and the membership back (a clean stop: the others take over at once)."""
        with self.engine.begin() as c:
            c.execute(update(LEASES).where(LEASES.c.owner == self.replica).values(owner=None, expires_at=0.0, active=False, shops=0))
            c.execute(delete(MEMBERS).where(MEMBERS.c.replica == self.replica))
        self._held = {}

    def all_leases(self) -> list[tuple[int, str | None, float, int, bool]]:
        """Return every lease row (partition, owner, expires_at, generation, active), for tests and status."""
        with self.engine.connect() as c:
            return [(int(p), o, float(e), int(g), bool(a)) for p, o, e, g, a in c.execute(
                select(LEASES.c.partition, LEASES.c.owner, LEASES.c.expires_at, LEASES.c.generation, LEASES.c.active)
                .order_by(LEASES.c.partition))]
