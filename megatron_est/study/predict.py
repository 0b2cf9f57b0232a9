"""Where would EST draw level with its compute-matched control? Fits of the gap (EST's final validation loss minus
the control's) against training tokens per parameter T, made before the held-out run that checks them.

Two shapes, both two-parameter least squares, because four points cannot tell them apart:
  - log-linear: gap = alpha + beta * ln T. A constant gain per doubling of training; crosses zero at
    T* = exp(-alpha / beta) when beta < 0.
  - power law: gap = a * T ** -b (a straight line in ln gap against ln T). The gap shrinks for ever but never
    reaches zero: under this shape EST never draws level.
Uncertainty: the residual scatter with n - 2 degrees of freedom (Student's t), so a 95% interval from four points
is wide by construction; the crossing's interval comes from the parameter covariance (sampled, fixed seed).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

# Two-sided 97.5% quantiles of Student's t by degrees of freedom (scipy is not a dependency).
_T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 8: 2.306, 10: 2.228}


def t975(dof: int) -> float:
    return _T975.get(dof) or (_T975[max(k for k in _T975 if k <= dof)] if dof > 1 else _T975[1])


@dataclass(frozen=True)
class LineFit:
    """y = c0 + c1 * x by least squares, with the parameter covariance from the residuals."""
    c0: float
    c1: float
    cov: np.ndarray  # 2 x 2
    s2: float  # residual variance, n - 2 degrees of freedom
    dof: int

    def at(self, x: float) -> tuple[float, float]:
        """Prediction at x and its 95% half-width for a new observation (residual scatter included)."""
        v = np.array([1.0, x])
        return self.c0 + self.c1 * x, t975(self.dof) * math.sqrt(self.s2 + v @ self.cov @ v)


def fit_line(xs: list[float], ys: list[float]) -> LineFit:
    if len(xs) < 3:
        raise ValueError(f"a line with an uncertainty needs at least 3 points, got {len(xs)}")
    a = np.column_stack([np.ones(len(xs)), np.asarray(xs, float)])
    y = np.asarray(ys, float)
    coef, *_ = np.linalg.lstsq(a, y, rcond=None)
    dof = len(xs) - 2
    s2 = float(np.sum((y - a @ coef) ** 2)) / dof
    return LineFit(float(coef[0]), float(coef[1]), s2 * np.linalg.inv(a.T @ a), s2, dof)


@dataclass(frozen=True)
class GapFits:
    log_linear: LineFit  # gap against ln T
    power: LineFit  # ln gap against ln T

    def predict(self, tokens_per_param: float) -> dict:
        x = math.log(tokens_per_param)
        lin, lin_hw = self.log_linear.at(x)
        lp, lp_hw = self.power.at(x)
        return {"log_linear": (lin, lin - lin_hw, lin + lin_hw),
                "power": (math.exp(lp), math.exp(lp - lp_hw), math.exp(lp + lp_hw))}

    def crossing(self, draws: int = 20000, seed: int = 0) -> tuple[float, float, float]:
        """T* where the log-linear gap is zero, with a 95% interval from sampling its parameters (t-scaled);
        inf where a draw's slope is not negative (no crossing)."""
        f = self.log_linear
        point = math.exp(-f.c0 / f.c1) if f.c1 < 0 else math.inf
        rng = np.random.default_rng(seed)
        z = rng.multivariate_normal([0.0, 0.0], f.cov, size=draws) / np.sqrt(rng.chisquare(f.dof, draws) / f.dof)[:, None]
        c0, c1 = f.c0 + z[:, 0], f.c1 + z[:, 1]
        with np.errstate(over="ignore"):
            ts = np.where(c1 < 0, np.exp(np.clip(-c0 / np.where(c1 < 0, c1, -1.0), None, 700)), np.inf)
        ts = np.sort(ts)  # inf sorts last; np.quantile would interpolate it into nan
        return point, float(ts[int(0.025 * draws)]), float(ts[int(0.975 * draws)])


def fit_gaps(tokens_per_param: list[float], gaps: list[float]) -> GapFits:
    if min(gaps) <= 0:
        raise ValueError("the power-law fit needs positive gaps (EST behind its control at every point)")
    x = [math.log(t) for t in tokens_per_param]
    return GapFits(fit_line(x, gaps), fit_line(x, [math.log(g) for g in gaps]))
