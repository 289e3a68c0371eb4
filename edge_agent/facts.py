"""Node facts for heartbeats: architecture, OS, load, memory, disk, temperature, ONNX, GPU.

What is cheap is read on every heartbeat (load, memory, disk, temperature); what is expensive
and does not change while the agent runs (ONNX Runtime providers, the GPU model) is probed once,
in a background thread, in a child process: importing onnxruntime costs tens of megabytes that
a Pi beside a vision pipeline should not pay for the agent's whole life.

Facts are behind the small :class:`FactsProvider` protocol so a node's config can replace a
measured fact (``facts_override``, :class:`OverriddenFacts`: a node class the hardware cannot
report, or an arm64 Pi stood in for by a laptop) and tests can pin values.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

import psutil

from edge_agent.protocol import NodeFacts

log = logging.getLogger(__name__)

GO_ARCH = {
    "x86_64": "amd64",
    "amd64": "amd64",
    "aarch64": "arm64",
    "arm64": "arm64",
    "armv7l": "arm",
    "armv6l": "arm",
    "armv8l": "arm",
    "i386": "386",
    "i686": "386",
    "riscv64": "riscv64",
    "ppc64le": "ppc64le",
    "s390x": "s390x",
}
"""``uname -m`` names to the Go/Kubernetes names (``kubernetes.io/arch``) rollouts target."""

_CPU_SENSORS = ("cpu_thermal", "coretemp", "k10temp", "zenpower", "soc_thermal", "cpu-thermal", "acpitz")
"""psutil sensor groups that measure the CPU, most specific first (Pi: cpu_thermal)."""


def go_arch(machine: str) -> str:
    """Return the Go/Kubernetes name of a ``uname -m`` machine type (unknown ones lowercased)."""
    return GO_ARCH.get(machine.lower(), machine.lower() or "unknown")


def thermal_zone_temp(root: str | os.PathLike[str] = "/sys/class/thermal") -> float | None:
    """Return the first readable thermal zone in °C (millidegrees in sysfs), else None."""
    zones = sorted(Path(root).glob("thermal_zone*/temp"))
    for zone in zones:
        try:
            return int(zone.read_text().strip()) / 1000.0
        except (OSError, ValueError):
            continue
    return None


def cpu_temperature() -> float | None:
    """Return the CPU temperature in °C where the platform exposes one, else None."""
    read = getattr(psutil, "sensors_temperatures", None)
    if read is not None:
        try:
            groups = read()
        except (OSError, RuntimeError):
            groups = {}
        for name in _CPU_SENSORS:
            for entry in groups.get(name, ()):
                if entry.current is not None:
                    return float(entry.current)
    return thermal_zone_temp()


_ONNX_PROBE = "import json, onnxruntime as o; print(json.dumps(o.get_available_providers()))"


def probe_onnx_providers(python: str = sys.executable, timeout: float = 60.0) -> tuple[str, ...]:
    """Return ONNX Runtime's available providers, asked in a child process; () if not installed."""
    try:
        out = subprocess.run([python, "-c", _ONNX_PROBE], capture_output=True, timeout=timeout, check=True, text=True)
        providers = json.loads(out.stdout.strip().splitlines()[-1])
        return tuple(str(p) for p in providers)
    except (OSError, subprocess.SubprocessError, ValueError, IndexError) as exc:
        log.info("onnxruntime not usable here, reporting no providers: %s", str(exc)[:200])
        return ()


def probe_gpu(proc_root: str | os.PathLike[str] = "/proc/driver/nvidia/gpus") -> str | None:
    """Return the GPU model from nvidia-smi or /proc/driver/nvidia, else None."""
    smi = shutil.which("nvidia-smi")
    if smi:
        try:
            out = subprocess.run([smi, "--query-gpu=name", "--format=csv,noheader"], capture_output=True, text=True, timeout=10)
            names = [line.strip() for line in out.stdout.splitlines() if line.strip()]
            if out.returncode == 0 and names:
                return ", ".join(names)[:200]
        except (OSError, subprocess.SubprocessError):
            pass
    for info in sorted(Path(proc_root).glob("*/information")):
        try:
            for line in info.read_text().splitlines():
                if line.startswith("Model:"):
                    return line.split(":", 1)[1].strip()[:200]
        except OSError:
            continue
    return None


def os_name() -> str:
    """Return a human name of the OS, e.g. 'Debian GNU/Linux 12 (bookworm)'."""
    try:
        return platform.freedesktop_os_release().get("PRETTY_NAME", platform.system())
    except OSError:
        return f"{platform.system()} {platform.release()}"


_PROBED: dict[str, Any] = {}
"""Results of the one-off probes, shared by every SystemFacts of the process (the demo runs dozens)."""
_PROBE_LOCK = threading.Lock()
_PROBE_DONE = threading.Event()


def _start_probes() -> None:
    """Run the GPU and ONNX Runtime probes once per process, in the background."""
    with _PROBE_LOCK:
        if _PROBED.get("started"):
            return
        _PROBED["started"] = True

    def run() -> None:
        try:
            _PROBED["gpu"] = probe_gpu()
            _PROBED["onnx"] = probe_onnx_providers()
        finally:
            _PROBE_DONE.set()

    threading.Thread(target=run, name="facts-probe", daemon=True).start()


def wait_for_probes(timeout: float) -> bool:
    """Block until the one-off probes finished (tests, or a first heartbeat that must be complete)."""
    return _PROBE_DONE.wait(timeout)


class FactsProvider(Protocol):
    """Anything that can tell the facts of a node."""

    def collect(self) -> NodeFacts:
        """Return the facts as of now."""


class SystemFacts:
    """Facts of the machine the agent runs on."""

    def __init__(
        self,
        *,
        node_class: str = "",
        disk_path: str | os.PathLike[str] = "/",
        agent_version: str = "",
        probe: bool = True,
    ) -> None:
        self.node_class = node_class
        self.disk_path = str(disk_path)
        self.agent_version = agent_version
        self._static = {
            "hostname": socket.gethostname()[:255],
            "arch": go_arch(platform.machine()),
            "os": os_name()[:200],
            "kernel": platform.release()[:200],
            "cpu_count": psutil.cpu_count() or 1,
        }
        self._boot = psutil.boot_time()
        psutil.cpu_percent(interval=None)  # prime: the next call measures since now
        self.probe = probe
        if probe:
            _start_probes()

    def collect(self) -> NodeFacts:
        """Return facts measured now."""
        mem = psutil.virtual_memory()
        try:
            disk = psutil.disk_usage(self.disk_path)
            disk_total, disk_free = disk.total, disk.free
        except OSError:
            disk_total = disk_free = 0
        return NodeFacts(
            **self._static,
            node_class=self.node_class,
            cpu_load_1m=os.getloadavg()[0],
            cpu_percent=psutil.cpu_percent(interval=None),
            mem_total_bytes=mem.total,
            mem_available_bytes=mem.available,
            disk_total_bytes=disk_total,
            disk_free_bytes=disk_free,
            cpu_temp_c=cpu_temperature(),
            onnx_providers=_PROBED.get("onnx", ()) if self.probe else (),
            gpu=_PROBED.get("gpu") if self.probe else None,
            uptime_s=max(time.time() - self._boot, 0.0),
            agent_version=self.agent_version[:64],
        )


class OverriddenFacts:
    """Facts of another provider with some keys replaced (``facts_override`` in the agent config)."""

    def __init__(self, base: FactsProvider, overrides: Mapping[str, Any]) -> None:
        unknown = set(overrides) - set(NodeFacts.model_fields)
        if unknown:
            raise ValueError(f"unknown NodeFacts keys {sorted(unknown)}: use {', '.join(NodeFacts.model_fields)}")
        self.base = base
        self.overrides = dict(overrides)

    def collect(self) -> NodeFacts:
        """Return the base facts with the overrides applied and validated."""
        return NodeFacts.model_validate({**self.base.collect().model_dump(), **self.overrides})
