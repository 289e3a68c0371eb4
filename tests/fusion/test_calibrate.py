"""The calibration fit (fusion.calibrate): it recovers a known curve and refuses the benchmark's seeds."""

from __future__ import annotations

import math
import random

from fusion.calibrate import FIRST_SEED, fit, main, reliability


def test_the_fit_recovers_a_known_logistic_curve() -> None:
    rng = random.Random(3)
    margins = [rng.uniform(-2.0, 6.0) for _ in range(4000)]
    right = [rng.random() < 1 / (1 + math.exp(-(1.8 * m - 0.7))) for m in margins]
    slope, offset = fit(margins, right, prior=100.0)
    assert abs(slope - 1.8) < 0.2 and abs(offset + 0.7) < 0.25
    rows = [(m, r, "x") for m, r in zip(margins, right, strict=True)]
    for b in reliability(rows, slope, offset):
        if b["changes"] > 300:
            assert abs(b["right"] - b["calibrated"]) < 0.05


def test_calibration_refuses_the_benchmark_seeds(capsys) -> None:
    assert FIRST_SEED >= 100
    assert main(["--first-seed", "0"]) == 2
    assert "benchmark" in capsys.readouterr().err
