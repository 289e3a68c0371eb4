"""The built wheel, installed per role into fresh venvs: each role gets only its own extra and its
commands work there; the manifests ship inside the wheel.

One wheel is built per session and each venv is made once per module. pip's cache makes the
installs quick after the first run (README.md, "Install per role"; ``make packaging``).
"""

from __future__ import annotations

import subprocess
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from tests.support.roles import HEAVY, build_wheel, installed, make_role_venv

pytestmark = pytest.mark.slow

DIGEST = "sha256:" + "ab" * 32


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_wheel(tmp_path_factory.mktemp("wheel"))


@pytest.fixture(scope="module")
def agent_bin(tmp_path_factory: pytest.TempPathFactory, wheel: Path) -> Iterator[Path]:
    yield make_role_venv(tmp_path_factory.mktemp("agent") / "venv", wheel, "agent")


@pytest.fixture(scope="module")
def controller_bin(tmp_path_factory: pytest.TempPathFactory, wheel: Path) -> Iterator[Path]:
    yield make_role_venv(tmp_path_factory.mktemp("controller") / "venv", wheel, "controller")


def run(bin_dir: Path, *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(bin_dir / "shopfleet"), *args], capture_output=True, text=True, timeout=120, cwd=cwd)


def test_the_wheel_ships_the_manifests_and_no_tests(wheel: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    manifests = {n for n in names if n.startswith("shopfleet/manifests/")}
    assert "shopfleet/manifests/edge/overlays/production/kustomization.yaml" in manifests
    assert "shopfleet/manifests/central/base/controller.yaml" in manifests
    assert len(manifests) >= 16
    assert not [n for n in names if n.startswith("tests/")]
    metadata = next(zipfile.ZipFile(wheel).read(n).decode() for n in names if n.endswith(".dist-info/METADATA"))
    assert "License-Expression: Apache-2.0" in metadata
    assert "Provides-Extra: agent" in metadata and "Provides-Extra: controller" in metadata


def test_agent_role_has_none_of_the_heavy_packages(agent_bin: Path) -> None:
    assert installed(agent_bin, HEAVY) == []
    assert installed(agent_bin, ["paho", "pydantic", "yaml", "prometheus_client", "psutil", "serial", "cryptography"]) == [
        "paho", "pydantic", "yaml", "prometheus_client", "psutil", "serial", "cryptography"]


def test_agent_role_runs_help_and_checks_a_config(agent_bin: Path, tmp_path: Path) -> None:
    top = run(agent_bin, "--help")
    assert top.returncode == 0, top.stderr
    assert "agent" in top.stdout and "controller" in top.stdout  # every command is listed, installed or not
    assert run(agent_bin, "agent", "--help").returncode == 0
    assert run(agent_bin, "hw", "--help").returncode == 0

    config = tmp_path / "agent.yaml"
    config.write_text(yaml.safe_dump({
        "shop": "s1", "node": "pi-1",
        "pipelines": [{"type": "hardware", "name": "shelf", "serial": {"port": "/dev/ttyACM0"}}],
    }))
    ok = run(agent_bin, "agent", "--check-config", "--config", str(config))
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "config OK: shop=s1 node=pi-1" in ok.stdout and "pipelines=['shelf']" in ok.stdout


def test_agent_role_reports_a_bad_config(agent_bin: Path, tmp_path: Path) -> None:
    config = tmp_path / "agent.yaml"
    config.write_text(yaml.safe_dump({"shop": "s1", "node": "pi-1", "broker": {"port": "nope"}}))
    bad = run(agent_bin, "agent", "--check-config", "--config", str(config))
    assert bad.returncode == 2 and "broker.port" in bad.stderr, bad.stdout + bad.stderr


@pytest.mark.parametrize("argv,extra", [
    (["controller", "--help"], "controller"),
    (["manifests", "render", "--shop", "s1", "--out", "x"], "controller"),
    (["vision", "--help"], "vision"),
    (["demo"], "demo"),
])
def test_agent_role_names_the_extra_other_commands_need(agent_bin: Path, argv: list[str], extra: str) -> None:
    proc = run(agent_bin, *argv)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert f"shopfleet {argv[0]}: needs the '{extra}' extra: pip install 'shopfleet[{extra}]'" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_controller_role_renders_and_validates_the_packaged_manifests(controller_bin: Path, tmp_path: Path) -> None:
    assert installed(controller_bin, ["cv2", "onnxruntime", "scipy", "psutil", "serial"]) == []
    out = tmp_path / "out"
    # run outside any checkout, so only the wheel's copy of the manifests can be found
    proc = run(controller_bin, "manifests", "render", "--shop", "berlin-01", "--node-classes", "pi",
               "--image", f"vision=reg.example/vision@{DIGEST}", "--out", str(out), cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "0 problems" in proc.stdout
    objs = [yaml.safe_load(p.read_text()) for p in sorted(out.rglob("*.yaml"))]
    assert objs and all(o["metadata"]["labels"]["shopfleet.io/shop"] == "berlin-01" for o in objs)
    assert any(o["kind"] == "DaemonSet" for o in objs)

    valid = run(controller_bin, "manifests", "validate", cwd=tmp_path)
    assert valid.returncode == 0, valid.stdout + valid.stderr
    assert ": 0 problems" in valid.stdout
    for command in ("controller", "users", "tokens", "release", "rollout", "broker-config"):
        assert run(controller_bin, command, "--help").returncode == 0, command
