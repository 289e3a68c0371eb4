"""``shopfleet fusion ...``: run a scenario through vision, hardware and fusion and score the carts.

``eval`` prints one line per cart (status, exact or not, predicted and true items, reasons) and,
last, one JSON object a script can parse. ``scenario`` writes a named scenario as YAML, to edit
and replay with ``eval --scenario FILE``. Bad input (an unknown name, a broken file) is a one-line
``error: ...`` naming the fix and exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from fusion.errors import ScenarioInvalid


def _fail(exc: Exception) -> int:
    print(f"error: {exc}", file=sys.stderr)
    return 2


def _load(name_or_file: str, seed: int, shoppers: int, cameras: str = "single"):  # type: ignore[no-untyped-def]
    from fusion.generate import GENERATORS, generate
    from fusion.scenario import load_scenario

    if name_or_file in GENERATORS:
        return generate(name_or_file, seed, shoppers, cameras=cameras)
    if Path(name_or_file).exists() or name_or_file.endswith((".yaml", ".yml")):
        return load_scenario(name_or_file)
    raise ScenarioInvalid(f"{name_or_file!r} is neither a named scenario ({', '.join(GENERATORS)}) nor a scenario file")


def _eval(args: argparse.Namespace) -> int:
    from fusion.evaluate import score_run, summarize
    from fusion.sim import run

    try:
        scenario = _load(args.scenario, args.seed, args.shoppers, args.cameras)
    except ScenarioInvalid as exc:
        return _fail(exc)
    result = run(scenario, seed=args.seed)
    scores = score_run(result)
    for s in scores:
        mark = "exact" if s.exact else "WRONG"
        print(f"{s.cart_id:<18} {s.status:<8} {mark:<5} truth={s.truth_id} predicted={json.dumps(s.predicted, sort_keys=True)} true={json.dumps(s.true, sort_keys=True)}" + (f" reasons={','.join(dict.fromkeys(s.reasons))}" if s.reasons else ""))
    summary = summarize(scores)
    cpu = result.fusion_cpu_s / result.shopper_minutes if result.shopper_minutes else 0.0
    summary.update(
        {
            "scenario": scenario.name,
            "seed": args.seed,
            "visits": result.true_visits,
            "shelf_changes": result.shelf_changes,
            "frames": result.frames,
            "errors": dict(sorted(result.errors.items())),
            "fusion_cpu_ms_per_shopper_minute": round(cpu * 1000, 2),
            "tracker_cpu_ms_per_shopper_minute": round(result.tracker_cpu_s / result.shopper_minutes * 1000, 2) if result.shopper_minutes else 0.0,
            "views": len(scenario.camera.views) or 1,
            "merge_cpu_ms_per_shopper_minute": round(result.merge_cpu_s / result.shopper_minutes * 1000, 2) if result.shopper_minutes else 0.0,
        }
    )
    print(json.dumps(summary))
    return 0


def _scenario(args: argparse.Namespace) -> int:
    from fusion.generate import generate
    from fusion.scenario import dump_scenario

    try:
        text = dump_scenario(generate(args.name, args.seed, args.shoppers, cameras=args.cameras))
    except ScenarioInvalid as exc:
        return _fail(exc)
    if args.out:
        Path(args.out).write_text(text)
    else:
        sys.stdout.write(text)
    return 0


def _shoppers(text: str) -> int:
    v = int(text)
    if v < 1 or v > 50:
        raise argparse.ArgumentTypeError(f"{text}: give 1 to 50 shoppers")
    return v


class _Help(argparse.HelpFormatter):
    """Show an option's default in --help when it has a meaningful one."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.default is not None and action.default is not False and action.default != argparse.SUPPRESS and action.option_strings and "%(default)" not in text:
            text += " (default: %(default)s)"
        return text


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``fusion`` command and its subcommands."""
    from fusion.generate import CAMERA_LAYOUTS, GENERATORS

    names = ", ".join(GENERATORS)
    p = subparsers.add_parser("fusion", help="carts from tracks and shelf weights: evaluate on scenarios", description="Join vision tracks and shelf weight changes into shopper sessions, carts and receipts, and measure them on scenarios with ground truth. See docs/fusion.md.")
    sub = p.add_subparsers(dest="fusion_command", metavar="SUBCOMMAND", required=True)
    e = sub.add_parser("eval", help="run a scenario through the real tracker and board code and score the carts", formatter_class=_Help, description="Play a scenario (detections with noise through the vision tracker, load-cell samples through the board event code), make carts and compare them with the true carts. One line per cart, then a JSON summary: carts, exact_cart_rate, line_precision, line_recall, review_rate, wrong_accepted_rate, CPU per shopper-minute.")
    e.add_argument("--scenario", required=True, metavar="FILE|NAME", help=f"a scenario YAML file or a named scenario: {names}")
    e.add_argument("--seed", type=int, default=0, help="seed of the generated scenario and of the sensor noise")
    e.add_argument("--shoppers", type=_shoppers, default=4, help="shoppers in 'crowd' (a hint for the other named scenarios)")
    e.add_argument("--cameras", choices=CAMERA_LAYOUTS, default="single", help="named scenarios: one camera over the floor (single) or a ceiling camera per square metre merged on the floor (grid); a file's own camera: key governs it")
    e.set_defaults(func=_eval)
    s = sub.add_parser("scenario", help="write a named scenario as YAML", formatter_class=_Help, description="Generate a named scenario and print it as YAML (or write it to --out), to edit and replay with 'fusion eval --scenario FILE'.")
    s.add_argument("name", choices=list(GENERATORS), help="named scenario")
    s.add_argument("--seed", type=int, default=0, help="seed")
    s.add_argument("--shoppers", type=_shoppers, default=4, help="shoppers in 'crowd'")
    s.add_argument("--cameras", choices=CAMERA_LAYOUTS, default="single", help="camera layout: single or grid (writes the grid's views into the file)")
    s.add_argument("--out", default=None, help="write to this file instead of stdout")
    s.set_defaults(func=_scenario)
