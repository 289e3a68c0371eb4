"""A simulated shelf sensor board on a real pseudo-terminal, read by the real hardware pipeline.

The first shop's fridge (the board's thermometer) warms up for a while now and then, so the demo
shows a lasting alert: the node's ``temperature_high`` at once, the controller's ``fridge_warm``
once it has been warm for the rule's ``for_s`` (10 min by default).
"""

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

    FRIDGE_COLD_C = 4.0
    FRIDGE_WARM_C = 10.5  # above the 8 degC limit of the board and of the fridge_warm rule
    WARM_AFTER_S = 60.0  # cold at first, so the demo starts calm
    WARM_FOR_S = 15 * 60.0  # longer than fridge_warm's for_s, so the controller's alert opens too
    COLD_FOR_S = 5 * 60.0

    def __init__(self, shop: str, workdir: Path, seed: int, warm_fridge: bool | None = None) -> None:
        """``warm_fridge``: run the warm-fridge cycle (default: only the first shop's board, ``seed`` 0)."""
        from hardware.scenario import build_boards, default_scenario

        workdir.mkdir(parents=True, exist_ok=True)
        self.scenario = default_scenario(1)
        self.board = build_boards(self.scenario, link_dir=workdir, seed=seed)["shelf-1"]
        self.link = workdir / "shelf-1"
        self.planogram = workdir / "planogram.yaml"
        self.planogram.write_text(PLANOGRAM)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._fridge_thread: threading.Thread | None = None
        self.shop = shop
        self.warm_fridge = seed == 0 if warm_fridge is None else warm_fridge
        kinds = [c.kind for c in self.scenario.boards[0].channels]
        self.fridge_channel = kinds.index("temperature") if "temperature" in kinds else None

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
        if self.warm_fridge and self.fridge_channel is not None:
            self._fridge_thread = threading.Thread(target=self._fridge_cycle, name=f"warm-fridge-{self.shop}", daemon=True)
            self._fridge_thread.start()

    def _fridge_cycle(self) -> None:
        """Warm the fridge for WARM_FOR_S, cool it for COLD_FOR_S, again and again, until stopped."""
        assert self.fridge_channel is not None
        if self._stop.wait(self.WARM_AFTER_S):
            return
        while True:
            self.board.set_value(self.fridge_channel, self.FRIDGE_WARM_C)
            if self._stop.wait(self.WARM_FOR_S):
                return
            self.board.set_value(self.fridge_channel, self.FRIDGE_COLD_C)
            if self._stop.wait(self.COLD_FOR_S):
                return

    def stop(self) -> None:
        """Stop the scenario, the fridge cycle and the board."""
        self._stop.set()
        for t in (self._thread, self._fridge_thread):
            if t is not None:
                t.join(5)
        self.board.stop()
