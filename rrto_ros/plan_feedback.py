"""
Plans that correct themselves: measured latency per plan and link bin overrides the table.

A plan table is a prediction.  :class:`PlanFeedback` keeps the measured
latencies of every plan in every link bin (the table's grid point the link
estimate falls on), numbered by the bin's call count, and never keeps using a
plan that measures worse than a baseline it has also measured there.  The two
are compared **in the same spell**: each measurement of the one measured
fewer times (usually the baseline, explored now and then) is paired with the
other's measurements next to it (the nearest call before and after, within
``pair_span`` calls), and once ``min_samples`` such pairs show
the plan more than ``tolerance`` slower than the baseline (median of the
paired ratios), the bin uses the best measured baseline instead.  On the H200
host (2026-12-01) the robot's core ran at two speeds 1.4x apart in spells of
up to tens of seconds: a baseline explored in a fast spell, set against the
plan's latest calls in a slow one, looked up to 40 % better than it was.

Baselines are measured by exploration: while a plausible baseline of the bin
(predicted within ``explore_factor`` of the table's plan) has fewer than
``min_samples`` pairs with the plan in use, every ``explore_every``-th call of
the bin runs it once.  A near tie is not settled on ``min_samples``: while a
baseline's paired ratio is within ``undecided`` of 1, it is explored up to
``window`` pairs (on 2026-11-30 two slow explorations of `local` out of
three kept a 38 % slower `offload` in use for 28 inferences).  Exploration is
bounded: at most ``window`` calls per baseline
every ``refresh_every`` calls of a bin, after which old measurements of the
plans not in use are dropped and a demoted plan gets tried again (links and
loads change).  The caller switches plans only between inferences.

The robot is also **priced from use** (:class:`RobotPrice`): every local
call's measured time, over the local time the table predicted for its bin,
and every offloaded split or hybrid call's robot compute, over the robot
compute its entry predicted for that plan (where that is a quarter of local's
or more), gives the robot's speed now against the speed the table was solved
at (the median of the last ``window`` such ratios), and :func:`decide` re-decides
each bin's plan with every prediction's robot work scaled by it (local, the
robot's byte costs, a split's prefix, a hybrid's band and rest), the table's
own margins kept.  On the H200 host the robot ran at two speeds 1.4x apart
in spells that outlast a solve: a table solved in one spell names `local` or
`offload` at the crossover for the other spell's robot; local calls made (or
explored) in any bin move every bin's decision at once, without each bin
exploring its own way out.  Before the first call that timed the robot the
table's plans stand as solved.
"""

from __future__ import annotations

import bisect
import collections
import statistics

from rrto_ros.split import Plan

Bin = tuple[float, float]   # (rtt_ms, bandwidth_mbps) of a table's grid point


class PlanFeedback:
    """Measured latency per (link bin, plan); demote plans a measured baseline beats."""

    def __init__(self, window: int = 8, min_samples: int = 3, explore_every: int = 3,
                 tolerance: float = 0.03, explore_factor: float = 1.5,
                 refresh_every: int = 200, undecided: float = 0.06, pair_span: int = 0,
                 reprice: bool = True):
        if min_samples < 1 or window < min_samples or explore_every < 2 or pair_span < 0:
            raise ValueError('need min_samples >= 1, window >= min_samples, explore_every >= 2,'
                             ' pair_span >= 0')
        self.window = window
        self.min_samples = min_samples
        self.explore_every = explore_every
        self.tolerance = tolerance
        self.explore_factor = explore_factor
        self.refresh_every = refresh_every
        self.undecided = undecided
        self.pair_span = pair_span or 2 * explore_every   # calls apart a pair may be
        # bin -> plan -> its last refresh_every measurements, numbered by the bin's call count
        self.samples: dict[Bin, dict[str, _Series]] = {}
        # bumped when a bin's pairs may have changed; a measurement too far from every other
        # plan's to pair with them (a steady plan's usual call) changes none, and the pairs,
        # the plan in use and the next exploration derived from them are kept (recomputed
        # after every call, cold after the model's compute, they cost ~80 us: issue 13)
        self._versions: collections.Counter = collections.Counter()
        self._pairs_cache: dict[tuple[Bin, str, str], tuple[int, list[float]]] = {}
        self._decided: dict[Bin, _Decided] = {}
        self.calls: collections.Counter = collections.Counter()
        self.explorations = 0   # calls run under a baseline to measure it
        self.price = RobotPrice() if reprice else None   # the robot's speed in use

    def ratio(self, bin_: Bin, plan: str, baseline: str) -> float | None:
        """
        Return the median of ``plan``'s ms over ``baseline``'s, pairs measured close in time.

        Each measurement of the one of the two measured fewer times is paired
        with the mean of the other's nearest measurement before it and after
        it (those within ``pair_span`` calls); the newest ``window`` pairs
        count.  None: fewer than ``min_samples`` pairs.
        """
        ratios = self._pairs(bin_, plan, baseline)
        return statistics.median(ratios) if len(ratios) >= self.min_samples else None

    def _pairs(self, bin_: Bin, plan: str, baseline: str) -> list[float]:
        plans = self.samples.get(bin_, {})
        mine, theirs = plans.get(plan), plans.get(baseline)
        if not mine or not theirs:
            return []
        key, version = (bin_, plan, baseline), self._versions[bin_]
        cached = self._pairs_cache.get(key)
        if cached is not None and cached[0] == version:
            return cached[1]
        flip = len(theirs.calls) < len(mine.calls)   # walk the rarer one, newest first
        anchor, other = (theirs, mine) if flip else (mine, theirs)
        ratios: list[float] = []
        for call, ms in zip(reversed(anchor.calls), reversed(anchor.ms)):
            near = other.near(call, self.pair_span)
            if near and ms > 0:
                mean = statistics.fmean(near)
                ratios.append(mean / ms if flip else ms / max(mean, 1e-9))
                if len(ratios) == self.window:
                    break
        if plan != baseline:   # a plan's pairs with itself change with each of its calls
            self._pairs_cache[key] = (version, ratios)
        return ratios

    def choose(self, bin_: Bin, wanted: Plan, predicted_ms: float | None,
               baselines: list[tuple[Plan, float | None]]) -> tuple[Plan, bool]:
        """
        Return (the plan for this call, whether it is a one-off exploration).

        ``baselines`` are the bin's baseline plans with their predicted ms
        (None: unknown, always plausible).
        """
        count = self.calls[bin_] + 1
        self.calls[bin_] = count
        key = (self._versions[bin_], wanted, predicted_ms, tuple(baselines))
        decided = self._decided.get(bin_)   # kept while the bin's pairs are (a steady plan)
        if decided is None or decided.key != key:
            decided = self._decide(bin_, key, decided)
        if count % self.refresh_every == 0:
            self._refresh(bin_, decided.plan.name)
            decided = self._decide(bin_, (self._versions[bin_], *key[1:]), None)
        if count % self.explore_every == 0:
            if not decided.explored:   # only an exploring call needs it (the prices may move)
                decided.explore, decided.explored = self._explore(bin_, decided.plan, key), True
            if decided.explore is not None:
                self.explorations += 1
                return decided.explore, True
        return decided.plan, False

    def _decide(self, bin_: Bin, key: tuple, last: _Decided | None) -> _Decided:
        """Return the plan in use for ``key``: ``last``'s if only the prices moved."""
        version, wanted, _, baselines = key
        plans = [p for p, _ in baselines]
        if (last is not None and last.key[:2] == (version, wanted)
                and [p for p, _ in last.key[3]] == plans):
            plan = last.plan
        else:
            plan = self.effective(bin_, wanted, plans)
        self._decided[bin_] = _Decided(key, plan)
        return self._decided[bin_]

    def _explore(self, bin_: Bin, plan: Plan, key: tuple) -> Plan | None:
        """Return the baseline an exploration runs next beside ``plan`` (None: none)."""
        predicted_ms, baselines = key[2:]
        limit = None if predicted_ms is None else predicted_ms * self.explore_factor
        plausible = [(p, ms) for p, ms in baselines
                     if p != plan and (limit is None or ms is None or ms <= limit)]
        unexplored = [p for p, _ in sorted(plausible, key=lambda pm: (
                          self._count(bin_, pm[0], plan) >= self.min_samples, _order(pm[1])))
                      if self._count(bin_, p, plan) < self._wanted(bin_, p, plan)]
        return unexplored[0] if unexplored else None

    def _count(self, bin_: Bin, baseline: Plan, in_use: Plan) -> int:
        """Return how many of ``baseline``'s measurements pair with ``in_use``'s."""
        return len(self._pairs(bin_, in_use.name, baseline.name))

    def _wanted(self, bin_: Bin, baseline: Plan, in_use: Plan) -> int:
        """Return how many pairs settle ``baseline`` (more for a near tie)."""
        ratio = self.ratio(bin_, in_use.name, baseline.name)
        if ratio is not None and abs(ratio - 1) <= self.undecided:
            return self.window
        return self.min_samples

    def effective(self, bin_: Bin, wanted: Plan, baselines: list[Plan]) -> Plan:
        """
        Return ``wanted``, or the best measured baseline where that measures better.

        From ``wanted``, step to the baseline the plan in hand is slowest
        against (paired ratio above ``1 + tolerance``) until none is faster:
        a baseline explored while another baseline was in use is compared with
        that one, in its spell.
        """
        current = wanted
        for _ in range(len(baselines)):
            measured = [(r, p) for p in baselines if p != current
                        for r in [self.ratio(bin_, current.name, p.name)] if r is not None]
            if not measured:
                break
            ratio, best = max(measured, key=lambda rp: (rp[0], rp[1].name))
            if ratio <= 1 + self.tolerance:
                break
            current = best
        return current

    def observe(self, bin_: Bin, plan: str, total_ms: float) -> None:
        """
        Record one call's measured latency under ``plan`` (its name) in ``bin_``.

        The bin's pairs are unchanged (its version kept) when the measurement is
        more than ``pair_span`` calls after every other plan's, the one it drops
        (the oldest past ``refresh_every``) more than that before them, and which
        of two plans is measured fewer times (the side a pair is taken from)
        stays; a bin's measurements are numbered by its call count, never down.
        """
        plans, call, span = self.samples.setdefault(bin_, {}), self.calls[bin_], self.pair_span
        series = plans.get(plan)
        if series is None:
            series = plans[plan] = _Series()
        before = len(series.calls)
        dropped = series.add(call, float(total_ms), self.refresh_every)
        count = len(series.calls)
        for other in plans.values():
            theirs = len(other.calls)
            if other is not series and (
                    call <= other.calls[-1] + span
                    or (dropped is not None and dropped >= other.calls[0] - span)
                    or (theirs < before) != (theirs < count)
                    or (before < theirs) != (count < theirs)):
                self._versions[bin_] += 1
                return
        if not before:
            self._versions[bin_] += 1

    def _refresh(self, bin_: Bin, keep: str) -> None:
        """Forget the bin's measurements of every plan but ``keep``: explore them again."""
        plans = self.samples.get(bin_, {})
        for name in [k for k in plans if k != keep]:
            del plans[name]
        self._versions[bin_] += 1


class RobotPrice:
    """The robot's speed in use over the speed a table priced it at: robot ms measured/priced."""

    def __init__(self, window: int = 5):
        if window < 1:
            raise ValueError('window must be at least 1')
        self.ratios: collections.deque[float] = collections.deque(maxlen=window)

    def observe(self, measured_ms: float, priced_ms: float | None) -> None:
        """Record one call's robot ms (a local call's total) against what its entry priced."""
        if priced_ms and priced_ms > 0 and measured_ms > 0:
            self.ratios.append(float(measured_ms) / float(priced_ms))

    def factor(self) -> float | None:
        """Return the median of the last ``window`` ratios (None before any local call)."""
        if not self.ratios:   # statistics.median's rule inline: read before every call
            return None
        ratios, half = sorted(self.ratios), len(self.ratios) // 2
        return ratios[half] if len(ratios) % 2 else (ratios[half - 1] + ratios[half]) / 2


def repriced(predicted: dict, factor: float) -> float:
    """
    Return a prediction's latency (an Estimate as JSON) with the robot's work ``factor`` as long.

    A hybrid plan (``busy_ms``/``remote_ms`` set) waits for the longer of the
    robot's band and the server's round trip, then runs the rest on the robot;
    every other plan has its robot time (``robot_compute_ms``: local compute, a
    split's prefix, the robot's byte costs) on the critical path.
    """
    latency = float(predicted['latency_ms'])
    busy, remote = predicted.get('busy_ms', 0.0), predicted.get('remote_ms', 0.0)
    if busy or remote:
        rest = latency - max(busy, remote)
        return max(busy * factor, remote) + rest * factor
    return latency + (factor - 1) * float(predicted.get('robot_compute_ms', 0.0))


def decide(entry: dict, factor: float, margin: float,
           margins: dict[str, float] | None = None,
           parsed: tuple[list, Plan] | None = None) -> tuple[Plan, float, list]:
    """
    Re-decide a table entry with the robot ``factor`` times slower than it was priced.

    Return the plan, its repriced ms and the baselines with theirs.  The rule is
    the solve's (:func:`rrto_ros.plan_solve.refine`): the fastest baseline,
    unless the entry's split or hybrid plan beats it by its margin
    (``margins[plan]``, else ``margin``); at factor 1 the entry's own plan.
    ``parsed``: the entry's :func:`parsed_plans`, kept by a caller that decides
    it again as the robot's price moves.
    """
    options = {}
    items, plan = parsed or parsed_plans(entry)
    for baseline, name, predicted in items:
        options.setdefault(name, (baseline, repriced(predicted, factor)))
    best, best_ms = min(options.values(), key=lambda pm: (pm[1], pm[0].name))
    if plan.kind in ('split', 'hybrid') and plan.name != best.name:
        ms = repriced(entry['predicted'], factor)
        if ms <= min((1 - (margins or {}).get(plan.name, margin)) * best_ms, best_ms):
            best, best_ms = plan, ms
    return best, best_ms, list(options.values())


def parsed_plans(entry: dict) -> tuple[list[tuple[Plan, str, dict]], Plan]:
    """Return an entry's baselines as (plan, its name, its prediction), and its plan."""
    items = [(Plan.from_json(item['plan']), item['predicted'])
             for item in entry['baselines'].values()]
    return [(p, p.name, predicted) for p, predicted in items], Plan.from_json(entry['plan'])


class _Decided:
    """A bin's plan in use (and next exploration) for (version, wanted, predicted, baselines)."""

    __slots__ = ('key', 'plan', 'explore', 'explored')

    def __init__(self, key: tuple, plan: Plan):
        self.key, self.plan = key, plan
        self.explore: Plan | None = None
        self.explored = False


class _Series:
    """One plan's measurements in one bin: the bin's call count at each, and its ms."""

    __slots__ = ('calls', 'ms')

    def __init__(self):
        self.calls: list[int] = []
        self.ms: list[float] = []

    def add(self, call: int, ms: float, keep: int) -> int | None:
        """Append one measurement; return the call of the oldest one dropped for it, if any."""
        self.calls.append(call)
        self.ms.append(ms)
        if len(self.calls) > keep:
            dropped = self.calls[0]
            del self.calls[0], self.ms[0]
            return dropped
        return None

    def near(self, call: int, span: int) -> list[float]:
        """Return the ms of the nearest measurement before ``call`` and after it, within span."""
        i = bisect.bisect_left(self.calls, call)
        found = [self.ms[i - 1]] if i and self.calls[i - 1] >= call - span else []
        j = i + (i < len(self.calls) and self.calls[i] == call)
        if j < len(self.calls) and self.calls[j] <= call + span:
            found.append(self.ms[j])
        return found


def _order(ms: float | None) -> tuple[int, float]:
    return (1, 0.0) if ms is None else (0, ms)
