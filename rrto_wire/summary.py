"""
The one definition of a latency summary (``p50``/``p90``/``p99``) on both sides.

Server stats replies carry per-task summaries and the robot, the demo and the
benchmarks print their own; all of them call :func:`percentile` /
:func:`summarise` so that "p99" means one thing everywhere.  The definition is
numpy's default (``method='linear'``, type 7 of Hyndman & Fan): the value at
fractional rank ``(n - 1) * q / 100`` of the sorted samples, interpolated
linearly between its two neighbours.  For ``n < 100`` the p99 therefore lies
between the two largest samples, not at the maximum.
"""

from __future__ import annotations

import math
from typing import Iterable

import numpy as np


def percentile(values: Iterable[float], q: float) -> float:
    """Return the ``q``-th percentile, q in 0..100, linearly interpolated; nan if empty."""
    data = np.fromiter(values, dtype=np.float64)
    if data.size == 0:
        return math.nan
    return float(np.percentile(data, q))


def summarise(samples: Iterable[float]) -> dict:
    """Return n, mean, p50, p90, p99 and max of ``samples``, JSON-ready ({'n': 0} if empty)."""
    data = (samples.astype(np.float64, copy=False) if isinstance(samples, np.ndarray)
            else np.fromiter(samples, dtype=np.float64))
    if data.size == 0:
        return {'n': 0}
    p50, p90, p99 = np.percentile(data, [50, 90, 99])
    return {'n': int(data.size), 'mean': float(data.mean()), 'p50': float(p50),
            'p90': float(p90), 'p99': float(p99), 'max': float(data.max())}
