"""Node facts (real psutil on this machine, injectable overrides) and the clock offset filter."""

from __future__ import annotations

import platform
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from edge_agent.clock import ClockOffsetEstimator, estimate_offset
from edge_agent.facts import (
    OverriddenFacts,
    SystemFacts,
    go_arch,
    probe_gpu,
    probe_onnx_providers,
    thermal_zone_temp,
    wait_for_probes,
)
from edge_agent.protocol import NodeFacts


@pytest.mark.parametrize(
    ("machine", "arch"),
    [
        pytest.param("x86_64", "amd64", id="pc"),
        pytest.param("aarch64", "arm64", id="pi4-64bit"),
        pytest.param("armv7l", "arm", id="pi-32bit"),
        pytest.param("i686", "386", id="old-pc"),
        pytest.param("", "unknown", id="empty"),
        pytest.param("Weird9", "weird9", id="unknown-lowercased"),
    ],
)
def test_go_arch(machine: str, arch: str) -> None:
    assert go_arch(machine) == arch


def test_system_facts_on_this_machine(tmp_path: Path) -> None:
    f = SystemFacts(node_class="gpu", disk_path=tmp_path, agent_version="1.2.3", probe=False)
    facts = f.collect()
    assert facts.arch == go_arch(platform.machine())
    assert facts.cpu_count >= 1 and facts.mem_total_bytes > facts.mem_available_bytes > 0
    assert facts.disk_total_bytes > 0 and facts.node_class == "gpu" and facts.agent_version == "1.2.3"
    assert facts.uptime_s > 0


def test_onnx_providers_probed_in_a_child_process() -> None:
    providers = probe_onnx_providers()
    assert "CPUExecutionProvider" in providers  # onnxruntime is a project dependency
    assert probe_onnx_providers(python="/nonexistent/python") == ()


def test_system_facts_report_probed_providers_once_per_process(tmp_path: Path) -> None:
    first, second = SystemFacts(disk_path=tmp_path), SystemFacts(disk_path=tmp_path)
    assert wait_for_probes(120)
    assert "CPUExecutionProvider" in first.collect().onnx_providers
    assert first.collect().onnx_providers == second.collect().onnx_providers
    assert SystemFacts(disk_path=tmp_path, probe=False).collect().onnx_providers == ()


def test_thermal_zone_reading(tmp_path: Path) -> None:
    (tmp_path / "thermal_zone0").mkdir()
    (tmp_path / "thermal_zone0" / "temp").write_text("garbage\n")
    (tmp_path / "thermal_zone1").mkdir()
    (tmp_path / "thermal_zone1" / "temp").write_text("48312\n")
    assert thermal_zone_temp(tmp_path) == pytest.approx(48.312)
    assert thermal_zone_temp(tmp_path / "none") is None


def test_gpu_from_proc(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # no nvidia-smi
    gpu = tmp_path / "0000:01:00.0"
    gpu.mkdir()
    (gpu / "information").write_text("Model: \t\t NVIDIA GeForce RTX 3060\nIRQ: 130\n")
    assert probe_gpu(tmp_path) == "NVIDIA GeForce RTX 3060"
    assert probe_gpu(tmp_path / "none") is None


def test_overridden_facts_simulate_a_pi(tmp_path: Path) -> None:
    base = SystemFacts(disk_path=tmp_path, probe=False)
    pi = OverriddenFacts(base, {"arch": "arm64", "node_class": "pi", "gpu": None, "onnx_providers": ["CPUExecutionProvider"]})
    facts = pi.collect()
    assert (facts.arch, facts.node_class, facts.gpu, facts.onnx_providers) == ("arm64", "pi", None, ("CPUExecutionProvider",))
    with pytest.raises(ValueError, match="unknown NodeFacts keys"):
        OverriddenFacts(base, {"cpu": 1})
    with pytest.raises(ValueError):
        OverriddenFacts(base, {"cpu_count": 0}).collect()  # validated like real facts


def test_offset_uses_minimum_delay_sample() -> None:
    est = ClockOffsetEstimator(window=4)
    assert est.offset() is None
    # true offset +5 s; delays 0.3, 0.05, 0.2
    for delay in (0.3, 0.05, 0.2):
        est.add(controller_ts=1000.0, received_at=1000.0 - 5 + delay)
    assert est.offset() == pytest.approx(4.95)
    for _ in range(4):  # the lucky sample leaves the window
        est.add(controller_ts=2000.0, received_at=2000.0 - 5 + 0.1)
    assert est.offset() == pytest.approx(4.9)


@given(offset=st.floats(-1e5, 1e5), delays=st.lists(st.floats(0, 10), min_size=1, max_size=20))
def test_estimate_never_exceeds_true_offset_and_is_exact_for_zero_delay(offset: float, delays: list[float]) -> None:
    samples = [offset - d for d in delays]
    est = estimate_offset(samples)
    assert est is not None and est <= offset + 1e-9
    assert est == pytest.approx(offset - min(delays))


def test_nodefacts_roundtrip_of_collected_facts(tmp_path: Path) -> None:
    facts = SystemFacts(disk_path=tmp_path, probe=False).collect()
    assert NodeFacts.model_validate_json(facts.model_dump_json()) == facts
