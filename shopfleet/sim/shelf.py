"""A simulated shelf sensor board on a real pseudo-terminal, read by the real hardware pipeline."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

PLANOGRAM = """slots:
  - {board: shelf-1, channel: 0, slot: A1, product: cola-330, unit_weight_g: 345, unit_weight_sd_g: 3}
  - {board: shelf-1, channel: 1, slot: A2, product: choc-50, unit_weight_g: 50, unit_weight_sd_g: 1}
"""


class ShelfBoard:
    """A simulated sensor board on a real pseudo-terminal, playing the built-in shelf scenario."""

    def __init__(self, shop: str, workdir: Path, seed: int) -> None:
        from hardware.scenario import build_boards, default_scenario

        workdir.mkdir(parents=True, exist_ok=True)
        self.scenario = default_scenario(1)
        self.board = build_boards(self.scenario, link_dir=workdir, seed=seed)["shelf-1"]
        self.link = workdir / "shelf-1"
        self.planogram = workdir / "planogram.yaml"
        self.planogram.write_text(PLANOGRAM)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.shop = shop

    def pipeline_config(self, heartbeat_s: float) -> dict[str, Any]:
        """Return the agent's ``type: hardware`` pipeline entry that reads this board."""
        return {"type": "hardware", "name": "shelf-board", "planogram": str(self.planogram),
                "telemetry_interval_s": max(heartbeat_s, 1.0), "telemetry_reduce": "last",
                "serial": {"port": str(self.link), "hello_timeout_s": 10}}

    def start(self) -> None:
        """Start the board and the scenario that puts items on and takes them off its shelf."""
        from hardware.scenario import play

        self.board.start()
        self._thread = threading.Thread(target=play, args=(self.scenario, {"shelf-1": self.board}, self._stop),
                                        name=f"shelf-scenario-{self.shop}", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop the scenario and the board."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
        self.board.stop()
