"""Calibrate the attribution probability on held-out scenarios: ``python -m fusion.calibrate``.

Every attributed shelf change of the named scenarios, over seeds that the benchmark does not use
(bench/fusion.py plays seeds 0-39; calibration uses 1000 and up by default), gives its evidence
(see ``Fusion._attribute``): ``margin_others`` (``log(best cart's score / (other carts' scores +
others_floor))``, the evidence against another shopper), ``margin_nobody`` (``log(best cart's
score / nobody_score)``, the evidence against a hand nobody saw) and ``sparse`` (frames the camera
missed per nominal frame), and whether the cart it went to is the true cart of the hand that made
it. A logistic fit of right/wrong on those gives ``calibration_slope``, ``calibration_nobody``,
``calibration_sparse`` and ``calibration_offset`` (the defaults of ``FusionConfig`` are the last
fit, docs/fusion.md), so a stated probability of 0.99 is right about 99 times in 100 on scenarios
fusion was not tuned on.

Before that, the reach evidence (``Fusion._reach``: a session's box over the slot around the
change) gives the likelihood ratios ``reach_lr_*``: how much likelier each kind of evidence is for
the picker than for another shopper near the slot, at the camera's nominal rate and at a sparse
camera. The margins are collected on the defaults' scores (reach left out: the ratios did not pay,
docs/fusion.md), or with ``--reach`` with the measured ratios in the scores.

The run prints the reliability table (bins of the calibrated probability: count, share right,
mean calibrated probability) and, last, one JSON line with the fit.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from collections.abc import Iterable, Sequence
from itertools import pairwise
from typing import Any

import numpy as np

from fusion.engine import FusionConfig
from fusion.generate import CAMERA_LAYOUTS, generate
from fusion.sim import RunResult, run

# name -> (number of seeds, shoppers): every named scenario, crowds and the slow camera weighted up (they are the hard part).
MIX: dict[str, tuple[int, int]] = {
    "single": (20, 1),
    "crowd": (30, 4),
    "family": (10, 4),
    "wrong-slot": (8, 2),
    "reenter": (8, 4),
    "board-pulled": (8, 2),
    "slow-camera": (20, 3),
}
FIRST_SEED = 1000
"""Calibration seeds start here; the benchmark's are 0-39, so the two never overlap."""


Features = tuple[float, ...]
"""(margin_others, margin_nobody, sparse) of one attributed change."""


def play(mix: dict[str, tuple[int, int]], first_seed: int = FIRST_SEED, config: FusionConfig | None = None, cameras: str = "single") -> list[tuple[str, RunResult]]:
    """Play every scenario of the mix on its seeds, under one camera layout (fusion.generate)."""
    return [(name, run(generate(name, seed, shoppers, cameras=cameras), seed=seed, config=config)) for name, (n, shoppers) in mix.items() for seed in range(first_seed, first_seed + n)]


def collect(mix: dict[str, tuple[int, int]], first_seed: int = FIRST_SEED, config: FusionConfig | None = None, runs: list[tuple[str, RunResult]] | None = None, cameras: str = "single") -> list[tuple[Features, bool, str]]:
    """Return (features, right, scenario) for every attributed change whose truth is known."""
    out: list[tuple[Features, bool, str]] = []
    for name, r in runs if runs is not None else play(mix, first_seed, config, cameras):
        for c in r.carts:
            truth = r.cart_truth.get(c.cart_id)
            for a in c.attributions:
                true = r.change_truth.get(a.change_id)
                if true is not None:
                    out.append(((a.margin_others, a.margin_nobody, a.sparse), true == truth, name))
    return out


REACH_CLASSES = ("reached", "not-reached", "unseen")


def reach_counts(runs: list[tuple[str, RunResult]], near_m: float = 1.2, sparse: bool = False) -> dict[str, Counter[str]]:
    """Count the reach evidence of the true picker's cart and of the other contenders, per change.

    For every shelf change whose true cart is known (attributed or not), the picker's evidence is
    the best among the sessions of the produced cart that followed the true cart (a family's
    members share a cart: one of them reached); the contenders are the other sessions that came
    within ``near_m`` of the slot's front around the change (another shopper near). Returns
    {'picker': counts by class, 'other': counts by class}, of the changes at the camera's nominal
    rate (``sparse`` False) or of those at a sparse camera (its ``sparse`` at least 1).
    """
    rank = {c: i for i, c in enumerate(REACH_CLASSES)}
    out: dict[str, Counter[str]] = {"picker": Counter(), "other": Counter()}
    for _name, r in runs:
        session_truth = {s: r.cart_truth.get(c.cart_id) for c in r.carts for s in c.sessions}
        atts = [a for c in r.carts for a in c.attributions] + list(r.fusion.orphans if r.fusion else [])
        for a in atts:
            true = r.change_truth.get(a.change_id)
            if true is None or (a.sparse >= 1.0) != sparse:
                continue
            picker = [cls for sid, cls, _d in a.reach if session_truth.get(sid) == true]
            if picker:
                out["picker"][min(picker, key=rank.__getitem__)] += 1
            for sid, cls, d in a.reach:
                if session_truth.get(sid) != true and d <= near_m:
                    out["other"][cls] += 1
    return out


def reach_ratios(counts: dict[str, Counter[str]]) -> dict[str, float]:
    """Return the likelihood ratio of each reach class, P(class | picker) / P(class | contender), add-one smoothed."""
    n_p = sum(counts["picker"].values()) + len(REACH_CLASSES)
    n_o = sum(counts["other"].values()) + len(REACH_CLASSES)
    return {k: ((counts["picker"][k] + 1) / n_p) / ((counts["other"][k] + 1) / n_o) for k in REACH_CLASSES}


SIGNS = (1, 1, -1)
"""More evidence against others or against nobody never makes a line less sure; a sparser camera never more."""

SPLIT_SIGNS = (1, 1, 1, -1)
"""SIGNS of the fitted design: margin_others at the nominal rate, margin_others at a sparse camera, margin_nobody, sparse."""


def split(f: Features) -> Features:
    """Return the fitted design of one change: its margin_others goes to the nominal or the sparse slope (sparse >= 1)."""
    mo, mn, sp = f
    return (mo if sp < 1.0 else 0.0, mo if sp >= 1.0 else 0.0, mn, sp)


def _matrix(features: Iterable[float | Sequence[float]]) -> np.ndarray:
    """Return the design matrix: one row per change, its features and a 1 for the offset."""
    rows = [[float(f)] if isinstance(f, (int, float)) else [float(v) for v in f] for f in features]
    x = np.asarray(rows, dtype=np.float64)
    return np.concatenate([x, np.ones((len(x), 1))], axis=1)


def fit(features: Iterable[float | Sequence[float]], right: Iterable[bool], prior: float = 3.0, signs: Sequence[int] | None = None) -> tuple[float, ...]:
    """Return the coefficients of P(right) = sigmoid(w . features + offset), offset last, by Newton's method.

    ``features`` are numbers (one feature: returns (slope, offset)) or tuples. A weak Gaussian
    prior (standard deviation ``prior``, centred on 0) keeps the fit finite when the data
    separate perfectly, as they nearly do: wrong attributions are rare. ``signs`` (+1, -1 or 0
    per feature) is the direction a coefficient must have: a feature whose fit goes the other way
    (more evidence for the shopper making the line less sure) is an artefact of a few wrong
    changes, so it is left out (coefficient 0) and the rest fitted again.
    """
    X = _matrix(features)
    y = np.asarray(list(right), dtype=np.float64)
    keep = list(range(X.shape[1]))
    while True:
        w = _newton(X[:, keep], y, prior)
        bad = [k for k, v in zip(keep, w, strict=True) if signs is not None and k < len(signs) and signs[k] * v < 0]
        if not bad:
            break
        keep = [k for k in keep if k != bad[0]]
    out = [0.0] * X.shape[1]
    for k, v in zip(keep, w, strict=True):
        out[k] = float(v)
    return tuple(out)


def _newton(X: np.ndarray, y: np.ndarray, prior: float) -> np.ndarray:
    w = np.zeros(X.shape[1])
    for _ in range(100):
        p = 1.0 / (1.0 + np.exp(-(X @ w)))
        g = X.T @ (y - p) - w / prior**2
        H = (X.T * (p * (1 - p))) @ X + np.eye(len(w)) / prior**2
        step = np.linalg.solve(H, g)
        w = w + step
        if float(np.abs(step).max()) < 1e-9:
            break
    return w


def probabilities(features: Iterable[float | Sequence[float]], coef: Sequence[float]) -> np.ndarray:
    """Return the calibrated probability of each change."""
    z: np.ndarray = _matrix(features) @ np.asarray(coef, dtype=np.float64)
    out: np.ndarray = 1.0 / (1.0 + np.exp(-z))
    return out


def reliability(rows: Sequence[tuple[float | Features, bool, str]], coef: Sequence[float]) -> list[dict[str, float | int]]:
    """Return per bin of calibrated probability: changes, share right, mean calibrated probability."""
    if not rows:
        return []
    p = probabilities([f for f, _, _ in rows], coef)
    edges = [0.0, 0.5, 0.9, 0.97, 0.99, 0.995, 0.999, 1.0 + 1e-12]
    out = []
    for lo, hi in pairwise(edges):
        sel = [i for i in range(len(rows)) if lo <= p[i] < hi]
        if not sel:
            continue
        out.append({"p_from": lo, "p_to": min(hi, 1.0), "changes": len(sel), "right": round(sum(rows[i][1] for i in sel) / len(sel), 4), "calibrated": round(float(p[sel].mean()), 4)})
    return out


def main(argv: list[str] | None = None) -> int:
    """Collect, fit, print the reliability table and a JSON line."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--first-seed", type=int, default=FIRST_SEED, help="first seed of each scenario (the benchmark uses 0-39: stay clear of them)")
    p.add_argument("--scale", type=float, default=1.0, help="multiply the number of seeds per scenario")
    p.add_argument("--reach", action="store_true", help="fit the calibration with the measured reach ratios in the scores (set them with the printed reach_lr_* values)")
    p.add_argument("--split", action="store_true", help="fit a slope of its own at a sparse camera (calibration_slope_sparse), as --reach does")
    p.add_argument("--cameras", choices=CAMERA_LAYOUTS, default="single", help="camera layout of the scenarios (fusion.generate): single, or grid (a ceiling camera per square metre, merged by vision.multiview)")
    args = p.parse_args(argv)
    if args.first_seed < 100:
        print("error: --first-seed below 100 overlaps the benchmark's seeds (0-39); calibrate on held-out seeds", file=sys.stderr)
        return 2
    mix = {k: (max(1, round(n * args.scale)), s) for k, (n, s) in MIX.items()}
    # The reach likelihood ratios (the reach evidence does not depend on them), measured with reach
    # left out of the scores; then the logistic calibration of the margins, on the defaults' scores
    # (reach left out) or, with --reach, with the measured ratios in them.
    off = {f"reach_lr_{k}{suffix}": 1.0 for k in ("reached", "not_reached", "unseen") for suffix in ("", "_sparse")}
    runs = play(mix, args.first_seed, FusionConfig(**off), args.cameras)
    lrs: dict[str, float] = {}
    for sparse_camera, suffix in ((False, ""), (True, "_sparse")):
        counts = reach_counts(runs, sparse=sparse_camera)
        ratios = reach_ratios(counts)
        print(f"reach {'sparse camera' if sparse_camera else 'nominal camera'}: picker {dict(counts['picker'])}, other shopper near {dict(counts['other'])}: ratios {ratios}")
        lrs[f"reach_lr_reached{suffix}"] = round(ratios["reached"], 2)
        lrs[f"reach_lr_not_reached{suffix}"] = round(ratios["not-reached"], 2)
        lrs[f"reach_lr_unseen{suffix}"] = round(ratios["unseen"], 2)
    if args.reach:
        rows = collect(mix, args.first_seed, FusionConfig(**lrs), cameras=args.cameras)
    else:
        rows = collect(mix, args.first_seed, runs=runs)
    if args.reach or args.split:  # a slope of its own at a sparse camera, whose boxes go to the wrong track more often
        rows = [(split(f), r, n) for f, r, n in rows]
        coef = fit([f for f, _, _ in rows], [r for _, r, _ in rows], signs=SPLIT_SIGNS)
    else:
        slope, nobody, sparse, offset = fit([f for f, _, _ in rows], [r for _, r, _ in rows], signs=SIGNS)
        coef = (slope, nobody, sparse, offset)
    for b in reliability(rows, coef):
        print(f"p {b['p_from']:<5} .. {b['p_to']:<5} changes {b['changes']:>5}  right {b['right']:.4f}  calibrated {b['calibrated']:.4f}")
    prob = probabilities([f for f, _, _ in rows], coef)
    wrong = [(tuple(round(v, 2) for v in f), n, round(float(prob[i]), 3)) for i, (f, r, n) in enumerate(rows) if not r]
    print(f"wrong attributions: {len(wrong)} of {len(rows)} (features, scenario, calibrated p): {sorted(wrong, key=lambda w: -w[2])}")
    bar = FusionConfig().attribution_bar
    doubt = {n: sum(1 for i, (_, _, m) in enumerate(rows) if m == n and prob[i] < bar) for n in mix}
    print(f"changes below attribution_bar {bar} per scenario: {doubt}")
    if args.reach or args.split:
        slope, slope_sparse, nobody, sparse, offset = coef
    else:
        slope, nobody, sparse, offset = coef
        slope_sparse = None
    out: dict[str, Any] = {"changes": len(rows), "wrong": len(wrong), "calibration_slope": round(slope, 4), "calibration_slope_sparse": None if slope_sparse is None else round(slope_sparse, 4)}
    out |= {"calibration_nobody": round(nobody, 4), "calibration_sparse": round(sparse, 4), "calibration_offset": round(offset, 4), "reach_in_scores": args.reach, "measured_reach_ratios": lrs}
    print(json.dumps(out | {"seeds_from": args.first_seed, "cameras": args.cameras, "mix": mix}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
