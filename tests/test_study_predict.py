"""The gap-to-control fits behind docs/reproduction.md's prediction (megatron_est/study/predict.py), against values
computed by hand."""
import math

import pytest

from megatron_est.study.predict import fit_gaps, fit_line


def test_line_fit_and_interval_by_hand():
    # y = 0, 1, 0 at x = 0, 1, 2: the line is y = 1/3; residuals -1/3, 2/3, -1/3, so s^2 = (2/3) / 1.
    # (A^T A)^-1 = [[5, -3], [-3, 3]] / 6; at x = 1, v (A^T A)^-1 v = 1/3, so the half-width of a new
    # observation is t(0.975, 1) * sqrt(s^2 + s^2 / 3) = 12.706 * sqrt(8 / 9).
    f = fit_line([0, 1, 2], [0, 1, 0])
    assert (f.c0, f.c1, f.s2, f.dof) == pytest.approx((1 / 3, 0.0, 2 / 3, 1))
    y, hw = f.at(1.0)
    assert y == pytest.approx(1 / 3) and hw == pytest.approx(12.706 * math.sqrt(8 / 9))


def test_exact_log_linear_gap_crosses_where_the_line_does():
    ts = [18, 36, 72, 108]
    fits = fit_gaps(ts, [0.6 - 0.1 * math.log(t) for t in ts])
    assert (fits.log_linear.c0, fits.log_linear.c1) == pytest.approx((0.6, -0.1))
    point, lo, hi = fits.crossing()
    assert point == pytest.approx(math.exp(6.0)) and lo == pytest.approx(point) and hi == pytest.approx(point)
    assert fits.predict(math.exp(6.0))["log_linear"][0] == pytest.approx(0.0, abs=1e-12)


def test_power_law_recovers_its_exponent_and_never_crosses():
    ts = [10, 20, 40, 80]
    fits = fit_gaps(ts, [2.0 * t ** -0.5 for t in ts])
    assert (math.exp(fits.power.c0), fits.power.c1) == pytest.approx((2.0, -0.5))
    assert fits.predict(1e6)["power"][0] == pytest.approx(2.0e-3)


def test_a_growing_gap_has_no_crossing():
    assert fit_gaps([10, 20, 40], [0.1, 0.2, 0.3]).crossing()[0] == math.inf


def test_too_few_or_nonpositive_points_are_refused():
    with pytest.raises(ValueError, match="at least 3 points"):
        fit_line([1, 2], [1, 2])
    with pytest.raises(ValueError, match="positive gaps"):
        fit_gaps([1, 2, 3], [0.1, 0.0, -0.1])
