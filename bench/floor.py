"""Benchmark: CPU per tick of the ``type: floor`` pipeline over the shipped camera grid, on a real Mosquitto.

The scenario (``--scenario``, default ``crowd``) is played under ``--cameras grid``: 48 ceiling
cameras a square metre apart over the 8 x 6 m shop plus one over the door (49 streams at
10 fps), each camera's detections made image boxes of its own homography (tests/support/floor.py)
and projected and encoded by the vision side's ``DetectionPublisher``. A child process publishes
them on a broker of the bench's own, ``--speed`` times faster than real time; this process runs
the floor pipeline (intake, decode, tick grouping, merge, tracker, zone events, track stream).

Figures: this process's CPU (every thread: the pipeline's loop and its MQTT network thread) per
tick, the part spent in merge + track + zone events (the pipeline's ``shopfleet_floor_tick_seconds``),
and, measured in the same run, the reference: ``MultiViewTracker.update`` in process on the same
image detections (projection, merge, tracker) plus zone events, without MQTT. The ratio says what
the deployed path adds. Run with ``nice -n 19`` on a shared machine.

    .venv/bin/python bench/floor.py [--scenario crowd] [--seed 1] [--speed 4]

Last line: JSON summary.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import resource
import sys
import tempfile
import threading
import time
from pathlib import Path

# bench/ holds fusion.py, which would shadow the fusion package: the repository goes first instead.
sys.path[0] = str(Path(__file__).resolve().parent.parent)

from edge_agent.mqtt_core import MqttSettings, ThreadedLink  # noqa: E402
from edge_agent.pipelines.floor import Config, FloorPipeline, detection_topic  # noqa: E402
from edge_agent.pipelines.vision import DetectionPublisher  # noqa: E402
from shopfleet.broker import BrokerProcess  # noqa: E402
from tests.support.floor import CAMERAS_NODE, detection_stream, floor_config, grid, write_zones  # noqa: E402
from tests.support.sink import RecordingSink  # noqa: E402
from vision.events import ZoneEvents  # noqa: E402
from vision.multiview import MultiViewTracker  # noqa: E402
from vision.zones import ZonesConfig  # noqa: E402

SHOP = "bench"


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _publish(port: int, ticks: list[list[tuple[str, bytes]]], speed: float) -> None:
    """Child process: publish each tick's messages, ``speed`` times faster than the cameras would."""
    link = ThreadedLink(MqttSettings(host="127.0.0.1", port=port, client_id="cameras"), lambda m: None)
    link.start()
    link.wait_connected(10)
    t0 = time.monotonic()
    for i, msgs in enumerate(ticks):
        wait = t0 + i * 0.1 / speed - time.monotonic()
        if wait > 0:
            time.sleep(wait)  # pacing the cameras' rate, not waiting for a condition
        for topic, payload in msgs:
            link.publish_nowait(topic, payload, qos=0)
    time.sleep(0.5)
    link.stop()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scenario", default="crowd")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--speed", type=float, default=4.0, help="publish this many times faster than real time (10 fps per camera at 1)")
    args = ap.parse_args()

    base = int((time.time() - 120) * 10)
    g = grid(args.scenario, seed=args.seed, base_tick=0)
    frames = [(base + k, per) for k, per in g.frames]
    if (time.time() - 5) * 10 < frames[-1][0]:
        raise SystemExit("scenario longer than 115 s: raise the bench's base offset")
    n_cams = len(g.views)
    dets = sum(len(d) for _, per in frames for d in per.values())
    print(f"{args.scenario} seed {args.seed}: {n_cams} cameras, {len(frames)} ticks, {dets} detections "
          f"({dets / len(frames):.1f} a tick); {platform.machine()} x{os.cpu_count()}, load {os.getloadavg()[0]:.2f}", file=sys.stderr)

    # Reference: the in-process tracker on the same image detections, no MQTT, no decoding.
    mvt = MultiViewTracker(g.views, g.merge)
    ze = ZoneEvents(ZonesConfig.model_validate(g.zones), camera="floor")
    c0 = time.process_time()
    ref_tracks = 0
    for k, per in frames:
        tracks, _ = mvt.update(per, ts=k / 10)
        ze.update(tracks)
        ref_tracks += len(mvt.to_floor(tracks.xyxy))
    ref_s = time.process_time() - c0

    pubs = {v.camera: DetectionPublisher(detection_stream(SHOP, v.homography), v.camera, lambda r: None) for v in g.views}
    ticks = [[(detection_topic(SHOP, CAMERAS_NODE, c), pubs[c].payload(k / 10, d)) for c, d in per.items()] for k, per in frames]
    msg_bytes = sum(len(p) for t in ticks for _, p in t)

    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp) / "broker"
        workdir.mkdir()
        broker = BrokerProcess(workdir=workdir).start()
        try:
            cfg = Config.model_validate(floor_config(g, write_zones(g, Path(tmp) / "zones.yaml"), SHOP, broker.port, latency_s=0.3,
                                                     occupancy_interval_s=60, gate_interval_s=60))
            pipe = FloorPipeline(cfg)
            stop = threading.Event()
            runner = threading.Thread(target=pipe.run, args=(stop, RecordingSink()), daemon=True)
            runner.start()
            probe = ThreadedLink(MqttSettings(host="127.0.0.1", port=broker.port, client_id="probe"), lambda m: None)
            probe.start()
            probe.wait_connected(10)
            deadline = time.monotonic() + 10
            while not pipe.health()["errors_by_reason"].get("unknown_camera"):
                if time.monotonic() > deadline:
                    raise SystemExit("the floor pipeline did not subscribe within 10 s")
                probe.publish_nowait(detection_topic(SHOP, CAMERAS_NODE, "probe"), b"{}", qos=0)
                time.sleep(0.05)
            probe.stop()
            ctx = multiprocessing.get_context("fork")
            child = ctx.Process(target=_publish, args=(broker.port, ticks, args.speed))
            cpu0, wall0 = _cpu(), time.perf_counter()
            child.start()
            child.join()
            want = len(frames)
            deadline = time.monotonic() + 30
            while pipe.stats["ticks"] < want and time.monotonic() < deadline:
                time.sleep(0.05)
            cpu, wall = _cpu() - cpu0, time.perf_counter() - wall0
            stop.set()
            runner.join(5)
        finally:
            broker.cleanup()
    ticks_done = pipe.stats["ticks"]
    health = pipe.health()
    tick_cpu = pipe.stats["cpu_us"] / 1e6
    per_tick_ms = cpu / max(1, ticks_done) * 1000
    ref_ms = ref_s / len(frames) * 1000
    summary = {
        "bench": "floor",
        "scenario": args.scenario,
        "seed": args.seed,
        "cameras": n_cams,
        "ticks": len(frames),
        "ticks_tracked": ticks_done,
        "detections_per_tick": round(dets / len(frames), 1),
        "messages": sum(len(t) for t in ticks),
        "message_bytes_mean": round(msg_bytes / max(1, sum(len(t) for t in ticks)), 1),
        "speed": args.speed,
        "pipeline_cpu_ms_per_tick": round(per_tick_ms, 3),
        "pipeline_tick_cpu_ms_per_tick": round(tick_cpu / max(1, ticks_done) * 1000, 3),
        "reference_ms_per_tick": round(ref_ms, 3),
        "ratio_pipeline_vs_reference": round(per_tick_ms / ref_ms, 2) if ref_ms else None,
        "core_share_at_10hz": round(per_tick_ms * 10 / 1000, 4),
        "dropped": health["dropped_frames"] - health["errors_by_reason"].get("unknown_camera", 0),
        "errors_by_reason": health["errors_by_reason"],
        "wall_s": round(wall, 1),
        "load": round(os.getloadavg()[0], 2),
        "machine": f"{platform.machine()} x{os.cpu_count()}",
    }
    print(f"floor pipeline: {per_tick_ms:.2f} ms CPU per tick ({summary['pipeline_tick_cpu_ms_per_tick']} ms of it merge+track+events), "
          f"{summary['core_share_at_10hz'] * 100:.1f}% of one core at 10 ticks/s; reference in process {ref_ms:.2f} ms per tick; "
          f"ratio {summary['ratio_pipeline_vs_reference']}; {ticks_done}/{len(frames)} ticks, {summary['dropped']} frames dropped")
    print(json.dumps(summary), flush=True)
    return 0 if ticks_done == len(frames) and summary["dropped"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
