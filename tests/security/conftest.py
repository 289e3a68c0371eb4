"""Real Mosquitto run with the files ``shopfleet broker-config`` generates, exactly as deployed.

The generated ``mosquitto.conf`` is started as it is (``mosquitto -c FILE``); only what a test
must change is passed to the generator as options: free ports instead of 1883/8883 and
directories under a temporary deploy directory. When the suite runs as root, Mosquitto drops to
the ``mosquitto`` user as it does in production, so the files are generated with
``--owner mosquitto`` and the deploy directory is world-traversable: a file the broker cannot
read fails these tests the way it would fail a first deployment.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from fleet_controller.broker_config import BrokerOptions, write_broker_config
from fleet_controller.pki import Pki
from shopfleet.broker import free_port
from tests.support.security import (
    PAIRS,
    Deployment,
    broker_owner,
)


@pytest.fixture
def deploy_dir() -> Iterator[Path]:
    """A temporary directory the ``mosquitto`` user can traverse (pytest's tmp_path is 0700)."""
    d = Path(tempfile.mkdtemp(prefix="shopfleet-sec-", dir="/tmp"))
    d.chmod(0o755)
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def deploy(deploy_dir) -> Iterator[callable]:
    """Return ``make(pairs=PAIRS, **option overrides) -> Deployment``; every broker is stopped afterwards."""
    made: list[Deployment] = []

    def make(pairs=PAIRS, name: str = "cfg", **overrides) -> Deployment:
        pki_dir = deploy_dir / "pki"
        pki = Pki(pki_dir) if (pki_dir / "ca.crt").exists() else Pki.init(pki_dir)
        opts = {
            "port": free_port(),
            "tls_port": free_port(),
            "pki_dir": pki_dir,
            "server_names": ("localhost", "127.0.0.1"),
            "persistence_dir": deploy_dir / f"{name}-data",
            "owner": broker_owner(),
        }
        if overrides.get("shop_brokers"):
            opts |= {"central": f"127.0.0.1:{opts['tls_port']}", "shop_port": free_port(), "shop_tls_port": free_port(),
                     "shop_persistence_dir": deploy_dir / f"{name}-shop-data"}
        opts |= overrides
        options = BrokerOptions(**opts)
        files = write_broker_config(pairs, deploy_dir / name, options=options)
        dep = Deployment(deploy_dir, pki, files, options)
        made.append(dep)
        return dep

    yield make
    for dep in made:
        for b in dep.brokers:
            b.stop()

