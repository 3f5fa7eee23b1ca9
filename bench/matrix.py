"""
What the benchmark measures: architectures, modes, links, codecs, run lengths.

Sections (every point names its section in the results):

* ``modes``: every mode of :data:`bench.modes.MODES` on every link (presets,
  the bandwidth grid, measured traces), inputs raw uint8.
* ``codecs``: record/replay with each input codec on the presets and the grid.
* ``input``: the same network fed normalised float32 from the robot (the
  alternative to uint8 with normalisation on the server).
* ``steps``: record/replay across a 100 -> 5 -> 50 Mbit/s step link, raw and
  ``auto`` codec, call by call.

A point runs for a time budget, at least ``min_calls`` and at most
``max_calls`` calls, so slow points (naive offload over a weak link) stay
bounded; every point reports how many calls it measured.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from bench import traces
from bench.link_config import PRESETS, LinkConfig, grid_link, steps_link, trace_link

ARCHS = ('resnet18', 'mobilenet', 'keypoint_net')
GRID_MBPS = (5, 10, 20, 50, 100, 300)
GRID_RTT_MS = 4.0
LINK_PRESETS = ('wifi6_good', 'wifi_congested', 'outdoor_weak')
TRACE_OFFSET_S = 10.0   # skip the first seconds of every trace (iperf3's TCP ramp-up)
STEP_LEVELS = ((100, 3.0), (5, 3.0), (50, 3.0))


@dataclass(frozen=True)
class Budget:
    """Run length of one point: seconds, and bounds on the number of calls."""

    seconds: float
    min_calls: int
    max_calls: int


@dataclass
class Profile:
    """One complete benchmark configuration."""

    name: str
    archs: tuple[str, ...] = ARCHS
    size: int = 224
    frames: int = 16
    timeout_ms: float = 20000.0
    mode_links: list[LinkConfig] = field(default_factory=list)
    codec_links: list[LinkConfig] = field(default_factory=list)
    codecs: tuple[str, ...] = ('lz4', 'zstd', 'jpeg', 'auto')
    input_links: list[LinkConfig] = field(default_factory=list)
    steps: LinkConfig | None = None
    steps_archs: tuple[str, ...] = ('mobilenet',)
    steps_codecs: tuple[str, ...] = ('raw', 'auto')
    budget: Budget = Budget(2.0, 3, 40)
    codec_budget: Budget = Budget(1.5, 3, 30)
    naive_budget: Budget = Budget(2.0, 2, 10)
    trace_budget: Budget = Budget(3.0, 3, 150)
    local_budget: Budget = Budget(2.0, 5, 40)


def grid_links(mbps=GRID_MBPS) -> list[LinkConfig]:
    return [grid_link(m, GRID_RTT_MS) for m in mbps]


def trace_links() -> list[LinkConfig]:
    """Return the measured-trace links, or none if the traces folder is absent."""
    if not traces.traces_dir().is_dir():
        return []
    wifi = 'wifi_industrial_robot_uplink/perama_site_{}_tcp_single_UL_loc{}.json'
    return [
        trace_link('trace_wifi_ax20_5ghz', wifi.format('ax_20mhz_5ghz_run2', 3), GRID_RTT_MS,
                   offset_s=TRACE_OFFSET_S),
        trace_link('trace_wifi_n20_24ghz', wifi.format('n_20mhz_24ghz_run1', 1), GRID_RTT_MS,
                   offset_s=TRACE_OFFSET_S),
        trace_link('trace_lte_verizon', 'cellular_mahimahi/Verizon-LTE-short.up', 40.0,
                   down='cellular_mahimahi/Verizon-LTE-short.down', offset_s=TRACE_OFFSET_S),
    ]


def full() -> Profile:
    """Everything ``make bench`` measures (about 12 minutes on a quiet 2-core machine)."""
    presets = [PRESETS[name] for name in LINK_PRESETS]
    return Profile(
        'full',
        mode_links=presets + grid_links() + trace_links(),
        codec_links=presets[1:] + grid_links(),   # wifi6_good is close to the 300 grid point
        input_links=grid_links((10, 50, 300)),
        steps=steps_link(list(STEP_LEVELS), GRID_RTT_MS, 'steps_100_5_50'))


def smoke() -> Profile:
    """Run every section for seconds on small inputs (the runner's own test)."""
    return Profile(
        'smoke', archs=('keypoint_net',), size=64, frames=2, timeout_ms=10000.0,
        mode_links=[grid_link(50, 2.0)], codec_links=[grid_link(20, 2.0)],
        codecs=('jpeg', 'auto'), input_links=[grid_link(50, 2.0)],
        steps=steps_link([(50, 0.3), (5, 0.3)], 2.0, 'steps_smoke'),
        steps_archs=('keypoint_net',), steps_codecs=('auto',),
        budget=Budget(0.0, 2, 2), codec_budget=Budget(0.0, 2, 2), naive_budget=Budget(0.0, 1, 1),
        trace_budget=Budget(0.0, 1, 1), local_budget=Budget(0.0, 2, 2))


PROFILES = {'full': full, 'smoke': smoke}
