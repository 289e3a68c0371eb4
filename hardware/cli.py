"""``shopfleet hw``: run simulated sensor boards, read a board, tare and calibrate a load cell.

The handlers are thin: they parse options, build the library objects (SimulatedBoard, Driver,
BoardConnection) and print. ``read`` prints JSON lines so its output can be piped into jq or a
test; ``simulate`` prints one line per board with the path to open, so another terminal can run
``shopfleet hw read --port PATH`` against it. Docs: docs/hardware.md.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import threading
import time
from pathlib import Path

log = logging.getLogger(__name__)


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``hw`` command and its subcommands."""
    hw = subparsers.add_parser(
        "hw",
        help="sensor boards over serial: simulate, read, calibrate",
        description="Work with the shelf sensor boards (load cells, door contact, fridge thermometer) that talk "
        "to a shop node over USB serial. See docs/hardware.md and docs/serial-protocol.md.",
    )
    sub = hw.add_subparsers(dest="hw_command", metavar="SUBCOMMAND", required=True)

    sim = sub.add_parser(
        "simulate",
        help="run virtual boards on pseudo-terminals",
        description="Run virtual boards that speak the serial protocol on pseudo-terminals and play scripted shelf "
        "activity (picks, put-backs, door, drift, a pulled cable). Prints 'BOARD PATH' per board, then runs "
        "until Ctrl-C or --duration.",
    )
    sim.add_argument("--boards", type=int, default=1, metavar="N", help="number of boards of the built-in scenario (default: %(default)s)")
    sim.add_argument("--scenario", type=Path, metavar="FILE", help="YAML scenario file (format: docs/hardware.md); overrides --boards")
    sim.add_argument(
        "--link-dir",
        type=Path,
        metavar="DIR",
        help="also create DIR/BOARD_ID symlinks to the ptys, re-pointed on every replug like /dev/serial/by-id",
    )
    sim.add_argument("--duration", type=float, metavar="S", help="stop after S seconds (default: run until Ctrl-C)")
    sim.add_argument("--seed", type=int, default=0, help="random seed of the load-cell noise (default: %(default)s)")
    sim.set_defaults(func=cmd_simulate)

    rd = sub.add_parser(
        "read",
        help="print a board's readings and events as JSON lines",
        description="Open a board, wait for its HELLO and print readings, shelf/door events, alerts and "
        "connect/disconnect notices as JSON lines (one object per line, key 'type'). Reconnects after an unplug.",
    )
    rd.add_argument("--port", metavar="PATH", help="serial device or link (default: discover by USB id)")
    rd.add_argument("--count", type=int, default=0, metavar="N", help="stop after N lines (default: run until Ctrl-C)")
    rd.add_argument("--events-only", action="store_true", help="print events and board notices, not every reading")
    rd.add_argument("--planogram", type=Path, metavar="FILE", help="planogram YAML that maps channels to slots and unit weights")
    rd.add_argument("--hello-timeout", type=float, default=5.0, metavar="S", help="seconds to wait for HELLO (default: %(default)s)")
    rd.set_defaults(func=cmd_read)

    cal = sub.add_parser(
        "calibrate",
        help="tare or calibrate a load-cell channel (stored in the board's EEPROM)",
        description="Calibrate a load cell: first run with --tare on an empty slot, then put a known mass on it and "
        "run with --mass GRAMS. Both are stored in the board's EEPROM and survive power cycles.",
    )
    cal.add_argument("--port", required=True, metavar="PATH", help="serial device or link of the board")
    cal.add_argument("--channel", required=True, type=int, metavar="C", help="load-cell channel index (from HELLO, 0-based)")
    group = cal.add_mutually_exclusive_group(required=True)
    group.add_argument("--mass", type=float, metavar="GRAMS", help="known mass now on the slot, in grams")
    group.add_argument("--tare", action="store_true", help="set the channel's zero (empty the slot first)")
    cal.add_argument("--timeout", type=float, default=10.0, metavar="S", help="seconds to wait for HELLO and the ACK (default: %(default)s)")
    cal.set_defaults(func=cmd_calibrate)


def _print(obj: dict) -> None:
    sys.stdout.write(json.dumps(obj, separators=(",", ":")) + "\n")
    sys.stdout.flush()


def cmd_simulate(args: argparse.Namespace) -> int:
    """Run simulated boards until interrupted or --duration passes."""
    from hardware.scenario import ScenarioError, build_boards, default_scenario, load_scenario, play

    if args.boards < 1:
        print("hw simulate: --boards must be at least 1", file=sys.stderr)
        return 2
    try:
        scenario = load_scenario(args.scenario) if args.scenario else default_scenario(args.boards)
    except ScenarioError as exc:
        print(f"hw simulate: {exc}", file=sys.stderr)
        return 2
    if args.link_dir:
        args.link_dir.mkdir(parents=True, exist_ok=True)
    boards = build_boards(scenario, args.link_dir, args.seed)
    stop = threading.Event()
    try:
        for board_id, board in boards.items():
            path = board.start()
            print(f"{board_id} {path}", flush=True)
        player = threading.Thread(target=play, args=(scenario, boards, stop), daemon=True)
        player.start()
        deadline = time.monotonic() + args.duration if args.duration else None
        while not stop.is_set() and (deadline is None or time.monotonic() < deadline):
            stop.wait(0.2 if deadline is None else min(0.2, max(deadline - time.monotonic(), 0)))
    except KeyboardInterrupt:
        pass
    finally:
        stop.set()
        for board in boards.values():
            board.stop()
    return 0


def cmd_read(args: argparse.Namespace) -> int:
    """Print a board's output as JSON lines."""
    from prometheus_client import CollectorRegistry

    from hardware.driver import Driver, DriverSettings
    from hardware.planogram import PlanogramError, load_planogram

    try:
        planogram = load_planogram(args.planogram) if args.planogram else None
    except PlanogramError as exc:
        print(f"hw read: {exc}", file=sys.stderr)
        return 2
    driver = Driver(DriverSettings(port=args.port, hello_timeout_s=args.hello_timeout), CollectorRegistry(), planogram)
    stop = threading.Event()
    printed = 0

    def emit(item) -> None:
        nonlocal printed
        data = item.to_json()
        if args.events_only and data["type"] == "reading":
            return
        if args.count and printed >= args.count:
            return
        _print(data)
        printed += 1
        if args.count and printed >= args.count:
            stop.set()

    try:
        driver.run(stop, emit)
    except KeyboardInterrupt:
        stop.set()
    return 0


def cmd_calibrate(args: argparse.Namespace) -> int:
    """Tare or calibrate one load-cell channel and print the board's answer."""
    import serial
    from prometheus_client import CollectorRegistry

    from hardware.driver import BoardConnection, BoardError, DriverMetrics, DriverSettings
    from hardware.frames import ChannelKind, Command, FrameType

    settings = DriverSettings(port=args.port, hello_timeout_s=args.timeout, command_timeout_s=args.timeout)
    try:
        conn = BoardConnection(args.port, DriverMetrics(CollectorRegistry()), settings)
    except (OSError, serial.SerialException) as exc:
        print(f"hw calibrate: cannot open {args.port}: {exc}; check the path and that no other program holds it", file=sys.stderr)
        return 1
    try:
        hello = conn.wait_hello(args.timeout)
        kinds = [c.kind for c in hello.channels]
        if not 0 <= args.channel < len(kinds) or kinds[args.channel] != ChannelKind.LOAD_CELL:
            cells = [i for i, k in enumerate(kinds) if k == ChannelKind.LOAD_CELL]
            print(f"hw calibrate: channel {args.channel} of board {hello.board_id} is not a load cell; load cells: {cells}", file=sys.stderr)
            return 2
        if args.tare:
            cmd = Command(FrameType.TARE, args.channel)
        else:
            if args.mass <= 0:
                print("hw calibrate: --mass must be positive grams of the known mass on the slot", file=sys.stderr)
                return 2
            cmd = Command(FrameType.CALIBRATE, args.channel, round(args.mass * 10))
        ack = conn.command(cmd, args.timeout)
        _print({"type": "calibrated" if not args.tare else "tared", "board": hello.board_id, "channel": args.channel, "value": ack.value})
        return 0
    except BoardError as exc:
        hint = " (tare the empty slot first, then put the known mass on it)" if not args.tare else ""
        print(f"hw calibrate: {exc}{hint}", file=sys.stderr)
        return 1
    finally:
        conn.close()
