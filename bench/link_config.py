"""
Link configurations for the emulator: rate specs, directions, whole links, presets.

A direction's ``rate`` is None (unlimited) or a spec: ``{'mbps': x}``,
``{'steps': [[mbps, seconds], ...]}`` (looping) or ``{'trace': path}`` (a
measured trace from :mod:`bench.traces`), each optionally with ``scale`` and
``offset_s``.  Configurations are plain frozen dataclasses that round-trip
through JSON (the emulator process receives them on its command line/stdin).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace

from bench import traces


def schedule_of(rate: dict) -> traces.RateSchedule:
    """Build the :class:`~bench.traces.RateSchedule` a rate spec names."""
    if not isinstance(rate, dict):
        raise ValueError(f'a rate spec is a dict, got {rate!r}')
    scale = float(rate.get('scale', 1.0))
    if 'mbps' in rate:
        schedule = traces.constant(float(rate['mbps']))
    elif 'steps' in rate:
        schedule = traces.steps([(float(m), float(s)) for m, s in rate['steps']],
                                loop=rate.get('loop', True))
    elif 'trace' in rate:
        schedule = traces.load(rate['trace'], float(rate.get('bin_ms', 10.0)))
    else:
        raise ValueError(f'rate spec {rate!r} has none of mbps, steps, trace')
    return schedule if scale == 1.0 else schedule.scaled(scale)


@dataclass(frozen=True)
class Direction:
    """One direction of the link; ``rate`` is None (unlimited) or a rate spec dict."""

    rate: dict | None = None      # {'mbps': x} | {'steps': [[mbps, s], ...]} | {'trace': path}
    delay_ms: float = 0.0
    jitter_ms: float = 0.0
    loss: float = 0.0
    stall_ms: float = 200.0
    burst_ms: float = 1.0

    def __post_init__(self):
        if self.delay_ms < 0 or self.jitter_ms < 0 or self.stall_ms < 0 or self.burst_ms < 0:
            raise ValueError('delay, jitter, stall and burst must not be negative')
        if not 0.0 <= self.loss <= 1.0:
            raise ValueError('loss is a probability per packet, in [0, 1]')
        if self.rate is not None:
            schedule_of(self.rate)  # fail at configuration, not inside a forwarder thread

    @property
    def mbps(self) -> float | None:
        """Return the mean rate in Mbit/s (None when unlimited)."""
        return None if self.rate is None else schedule_of(self.rate).mean_mbps


@dataclass(frozen=True)
class LinkConfig:
    """A whole link: a name and its two directions."""

    name: str = 'unlimited'
    up: Direction = field(default_factory=Direction)
    down: Direction = field(default_factory=Direction)

    @property
    def rtt_ms(self) -> float:
        return self.up.delay_ms + self.down.delay_ms

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, obj: dict) -> 'LinkConfig':
        return cls(obj.get('name', 'link'), Direction(**obj.get('up', {})),
                   Direction(**obj.get('down', {})))


def symmetric(name: str, rate: dict | None, rtt_ms: float = 0.0, jitter_ms: float = 0.0,
              loss: float = 0.0, stall_ms: float = 200.0, down_rate: dict | None = None,
              ) -> LinkConfig:
    """Return a link with the same delay, jitter and loss both ways (rates may differ)."""
    up = Direction(rate, rtt_ms / 2, jitter_ms, loss, stall_ms)
    return LinkConfig(name, up, replace(up, rate=down_rate if down_rate is not None else rate))


def grid_link(mbps: float, rtt_ms: float = 4.0) -> LinkConfig:
    """Return a clean symmetric link of ``mbps`` with ``rtt_ms`` (the bandwidth grid)."""
    return symmetric(f'grid_{mbps:g}mbps', {'mbps': mbps}, rtt_ms)


def steps_link(levels: list[tuple[float, float]], rtt_ms: float = 4.0,
               name: str = '') -> LinkConfig:
    """Return a symmetric link whose rate follows ``[(Mbit/s, seconds), ...]`` and loops."""
    name = name or 'steps_' + '_'.join(f'{m:g}' for m, _ in levels)
    return symmetric(name, {'steps': [list(level) for level in levels]}, rtt_ms)


def trace_link(name: str, up: str, rtt_ms: float, down: str | None = None,
               offset_s: float = 0.0, bin_ms: float = 10.0) -> LinkConfig:
    """Return a link replaying a measured trace (uplink; ``down`` or the same for downlink)."""
    def spec(path):
        return {'trace': path, 'offset_s': offset_s, 'bin_ms': bin_ms}
    return symmetric(name, spec(up), rtt_ms, down_rate=spec(down or up))


PRESETS = {
    'unlimited': LinkConfig(),
    'wifi6_good': symmetric('wifi6_good', {'mbps': 300}, rtt_ms=2.0, jitter_ms=0.2),
    'wifi_congested': symmetric('wifi_congested', {'mbps': 20}, rtt_ms=10.0, jitter_ms=3.0,
                                loss=2e-4),
    'outdoor_weak': symmetric('outdoor_weak', {'mbps': 5}, rtt_ms=30.0, jitter_ms=5.0,
                              loss=1e-3),
}


def mean_mbps(direction: Direction, seconds: float) -> float | None:
    """Return the mean rate over the first ``seconds`` after the link was set (None: unlimited)."""
    if direction.rate is None:
        return None
    schedule = schedule_of(direction.rate)
    offset = float(direction.rate.get('offset_s', 0.0))
    seconds = max(seconds, 1e-3)
    return (schedule.capacity(offset + seconds) - schedule.capacity(offset)) * 8 / seconds / 1e6
