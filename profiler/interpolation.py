"""How the CostModel reads a profile at shapes it did not measure: piecewise linear, extrapolated linearly
past the ends (profiler/cost_model.py's docstring says why that is exact for a layer's cost form)."""

from __future__ import annotations

import numpy as np
import pandas as pd


def interp1(xs, ys, x: float, hold: bool = False) -> float:
    """Piecewise linear through (xs, ys), extended linearly past both ends (hold: the end values held
    instead, for costs that are flat in x, whose measured slope is noise); one point scales proportionally."""
    order = np.argsort(xs)
    xs, ys = np.asarray(xs, float)[order], np.asarray(ys, float)[order]
    if hold:
        return float(np.interp(x, xs, ys))
    if len(xs) == 1:
        return float(ys[0] * x / xs[0]) if xs[0] else float(ys[0])
    if x <= xs[0]:
        i = 0
    elif x >= xs[-1]:
        i = len(xs) - 2
    else:
        return float(np.interp(x, xs, ys))
    slope = (ys[i + 1] - ys[i]) / (xs[i + 1] - xs[i])
    return float(ys[i] + slope * (x - xs[i]))


def interp_grid(table: pd.DataFrame, x_col: str, y_col: str, value: str, x: float, y: float,
                hold: bool = False) -> float:
    """Interpolate `value` in x_col along each measured y_col, then across y_col (see module docstring)."""
    ys, vals = [], []
    for y_value, part in table.groupby(y_col):
        ys.append(y_value)
        vals.append(interp1(part[x_col].to_numpy(), part[value].to_numpy(), x, hold))
    if len(ys) == 1:
        return vals[0]
    return interp1(ys, vals, y, hold)
