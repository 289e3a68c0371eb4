"""Run a real controller with the rollout executor in this process, until killed.

The fleet tests start it as a child process (``python -m tests.rollout.controller_proc SETTINGS``)
so that "the controller is killed mid-rollout" is a real SIGKILL: no graceful shutdown, no lease
released, a tick possibly cut in half.
"""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import sys

from fleet_controller.rollout import install
from fleet_controller.rollout.executor import ExecutorSettings
from fleet_controller.service import ControllerService
from fleet_controller.settings import load_settings


async def main(config: dict) -> None:
    service = ControllerService(load_settings(None, config["controller"], environ={}))
    install(service, ExecutorSettings.model_validate(config["executor"]))
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    await service.start()
    print(f"READY {service.api_url}", flush=True)
    await stop.wait()
    await service.stop()


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    asyncio.run(main(json.loads(sys.argv[1])))
