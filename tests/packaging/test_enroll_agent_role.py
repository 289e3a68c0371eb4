"""``shopfleet agent enroll`` from the agent role's wheel alone (no controller packages) against a real HTTPS controller."""

from __future__ import annotations

import stat
import subprocess
from pathlib import Path

import pytest

from fleet_controller.settings import EnrollmentSettings
from tests.support.enrollment import enrollment_app, https_api, serve, server_pki
from tests.support.roles import HEAVY, build_wheel, installed, make_role_venv

pytestmark = pytest.mark.slow


def test_agent_role_enrolls_with_only_its_own_packages(tmp_path_factory: pytest.TempPathFactory) -> None:
    wheel = build_wheel(tmp_path_factory.mktemp("wheel"))
    agent_bin = make_role_venv(tmp_path_factory.mktemp("agent") / "venv", wheel, "agent")
    assert installed(agent_bin, [*HEAVY, "fastapi", "sqlalchemy", "httpx"]) == []  # nothing of the controller's stack
    tmp = tmp_path_factory.mktemp("enroll")
    pki = server_pki(tmp / "pki")
    ea = enrollment_app(tmp, EnrollmentSettings(pki_dir=pki.root, broker_address="broker.example.com:8883"))
    assert ea.creds is not None
    token, _ = ea.creds.create_token("shop-a", "pi-5", None, "admin")
    (tmp / "token").write_text(token + "\n")
    out = tmp / "tls"
    with serve(ea.app, https_api(pki)) as port:
        proc = subprocess.run(
            [str(agent_bin / "shopfleet"), "agent", "enroll", "--controller", f"https://127.0.0.1:{port}",
             "--token-file", str(tmp / "token"), "--ca-file", str(pki.ca_cert_path), "--out", str(out)],
            capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "enrolled as shop-a.pi-5" in proc.stdout and "host: broker.example.com" in proc.stdout
    assert stat.S_IMODE((out / "node.key").stat().st_mode) == 0o600
    assert pki.current("shop-a.pi-5") is not None and Path(out / "node.crt").read_text().startswith("-----BEGIN CERTIFICATE-----")
