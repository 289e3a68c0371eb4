"""The calibration fit (fusion.calibrate): it recovers a known curve and refuses the benchmark's seeds."""

from __future__ import annotations

import math
import random

from fusion.calibrate import FIRST_SEED, SIGNS, fit, main, reliability


def test_the_fit_recovers_a_known_logistic_curve() -> None:
    rng = random.Random(3)
    margins = [rng.uniform(-2.0, 6.0) for _ in range(4000)]
    right = [rng.random() < 1 / (1 + math.exp(-(1.8 * m - 0.7))) for m in margins]
    slope, offset = fit(margins, right, prior=100.0)
    assert abs(slope - 1.8) < 0.2 and abs(offset + 0.7) < 0.25
    rows = [(m, r, "x") for m, r in zip(margins, right, strict=True)]
    for b in reliability(rows, (slope, offset)):
        if b["changes"] > 300:
            assert abs(b["right"] - b["calibrated"]) < 0.05


def test_the_fit_recovers_several_features_and_drops_one_of_the_wrong_sign() -> None:
    rng = random.Random(5)
    feats = [(rng.uniform(-1.0, 5.0), rng.uniform(-2.0, 3.0), rng.choice((0.0, 2.3))) for _ in range(6000)]
    right = [rng.random() < 1 / (1 + math.exp(-(1.5 * a + 0.5 * b - 1.2 * c + 0.3))) for a, b, c in feats]
    a, b, c, offset = fit(feats, right, prior=100.0)
    assert abs(a - 1.5) < 0.25 and abs(b - 0.5) < 0.2 and abs(c + 1.2) < 0.25 and abs(offset - 0.3) < 0.35
    # The same data with the second feature's sign flipped: its fit goes against the required sign, so it is dropped.
    flipped = [(x, -y, z) for x, y, z in feats]
    a2, b2, c2, _ = fit(flipped, right, prior=100.0, signs=SIGNS)
    assert b2 == 0.0 and a2 > 0 and c2 < 0
    assert fit(flipped, right, prior=100.0)[1] < -0.3  # without signs it would have been negative


def test_calibration_refuses_the_benchmark_seeds(capsys) -> None:
    assert FIRST_SEED >= 100
    assert main(["--first-seed", "0"]) == 2
    assert "benchmark" in capsys.readouterr().err
