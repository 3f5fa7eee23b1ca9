"""
Plans that correct themselves: measured latency per plan and link bin overrides the table.

A plan table is a prediction.  :class:`PlanFeedback` keeps the last
``window`` measured latencies of every plan in every link bin (the table's
grid point the link estimate falls on) and never keeps using a plan that
measures worse than a baseline it has also measured there: once both have
``min_samples`` measurements and the plan's median is more than
``tolerance`` above the baseline's, the bin uses the best measured baseline
instead.

Baselines are measured by exploration: while a plausible baseline of the bin
(predicted within ``explore_factor`` of the table's plan) has fewer than
``min_samples`` measurements, every ``explore_every``-th call of the bin runs
it once.  A near tie is not settled on ``min_samples``: while a baseline's
median is within ``undecided`` of the plan in use, it is explored up to
``window`` measurements (on 2026-11-30 two slow explorations of `local` out of
three kept a 38 % slower `offload` in use for 28 inferences).  Exploration is
bounded: at most ``window`` calls per baseline
every ``refresh_every`` calls of a bin, after which old measurements of the
plans not in use are dropped and a demoted plan gets tried again (links and
loads change).  The caller switches plans only between inferences.
"""

from __future__ import annotations

import collections
import statistics

from rrto_ros.split import Plan

Bin = tuple[float, float]   # (rtt_ms, bandwidth_mbps) of a table's grid point


class PlanFeedback:
    """Measured latency per (link bin, plan); demote plans a measured baseline beats."""

    def __init__(self, window: int = 8, min_samples: int = 3, explore_every: int = 3,
                 tolerance: float = 0.03, explore_factor: float = 1.5,
                 refresh_every: int = 200, undecided: float = 0.06):
        if min_samples < 1 or window < min_samples or explore_every < 2:
            raise ValueError('need min_samples >= 1, window >= min_samples, explore_every >= 2')
        self.window = window
        self.min_samples = min_samples
        self.explore_every = explore_every
        self.tolerance = tolerance
        self.explore_factor = explore_factor
        self.refresh_every = refresh_every
        self.undecided = undecided
        self.samples: dict[tuple[Bin, str], collections.deque] = {}
        self.calls: collections.Counter = collections.Counter()
        self.explorations = 0   # calls run under a baseline to measure it

    def median(self, bin_: Bin, plan: str) -> float | None:
        """Return the median measured ms of ``plan`` in ``bin_`` (None: too few samples)."""
        found = self.samples.get((bin_, plan))
        if not found or len(found) < self.min_samples:
            return None
        return statistics.median(found)

    def choose(self, bin_: Bin, wanted: Plan, predicted_ms: float | None,
               baselines: list[tuple[Plan, float | None]]) -> tuple[Plan, bool]:
        """
        Return (the plan for this call, whether it is a one-off exploration).

        ``baselines`` are the bin's baseline plans with their predicted ms
        (None: unknown, always plausible).
        """
        self.calls[bin_] += 1
        count = self.calls[bin_]
        plan = self.effective(bin_, wanted, [p for p, _ in baselines])
        if count % self.refresh_every == 0:
            self._refresh(bin_, plan.name)
            plan = self.effective(bin_, wanted, [p for p, _ in baselines])
        if count % self.explore_every == 0:
            limit = None if predicted_ms is None else predicted_ms * self.explore_factor
            unexplored = [p for p, ms in sorted(baselines, key=lambda pm: (
                              self._count(bin_, pm[0]) >= self.min_samples, _order(pm[1])))
                          if p != plan and (limit is None or ms is None or ms <= limit)
                          and self._count(bin_, p) < self._wanted(bin_, p, plan)]
            if unexplored:
                self.explorations += 1
                return unexplored[0], True
        return plan, False

    def _count(self, bin_: Bin, plan: Plan) -> int:
        return len(self.samples.get((bin_, plan.name), ()))

    def _wanted(self, bin_: Bin, baseline: Plan, in_use: Plan) -> int:
        """Return how many measurements settle ``baseline`` (more for a near tie)."""
        theirs, mine = self.median(bin_, baseline.name), self.median(bin_, in_use.name)
        if theirs is not None and mine is not None and abs(theirs / mine - 1) <= self.undecided:
            return self.window
        return self.min_samples

    def effective(self, bin_: Bin, wanted: Plan, baselines: list[Plan]) -> Plan:
        """Return ``wanted``, or the best measured baseline where that measures better."""
        mine = self.median(bin_, wanted.name)
        if mine is None:
            return wanted
        measured = [(m, p) for p in baselines if p != wanted
                    for m in [self.median(bin_, p.name)] if m is not None]
        if not measured:
            return wanted
        best_ms, best = min(measured, key=lambda mp: (mp[0], mp[1].name))
        return best if mine > best_ms * (1 + self.tolerance) else wanted

    def observe(self, bin_: Bin, plan: str, total_ms: float) -> None:
        """Record one call's measured latency under ``plan`` (its name) in ``bin_``."""
        key = (bin_, plan)
        if key not in self.samples:
            self.samples[key] = collections.deque(maxlen=self.window)
        self.samples[key].append(float(total_ms))

    def _refresh(self, bin_: Bin, keep: str) -> None:
        """Forget the bin's measurements of every plan but ``keep``: explore them again."""
        for key in [k for k in self.samples if k[0] == bin_ and k[1] != keep]:
            del self.samples[key]


def _order(ms: float | None) -> tuple[int, float]:
    return (1, 0.0) if ms is None else (0, ms)
