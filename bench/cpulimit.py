"""
Emulate a weaker robot CPU: pin processes to cores of their own, cap the robot with a quota.

On a test machine the robot and the server share one CPU model, but a real
robot's onboard computer is several times slower than the server.

* :func:`pin_cores` gives a process (every thread it has, and every child it
  starts afterwards) a fixed set of cores, so the robot, the server and the
  link emulator never compete for one core and the robot's compute budget
  does not depend on what else runs;
* :class:`CpuLimit` caps the process to ``share`` of one core with a CFS quota
  (Linux cgroups, root): every robot-side computation about ``1/share``
  slower.  A quota is handed out per period, and a throttled process waits for
  the next one: a call is late by up to ``(1 - share) * period``, so the
  period is kept short (2 ms by default: at most 1 ms late at half a core;
  the kernel's smallest quota, 1 ms, sets the period's floor at ``1 ms /
  share``).  Works with the cgroup v1 ``cpu`` controller and with cgroup v2
  (``cpu.max``); raises :class:`CpuLimitError` with the reason where neither is
  writable.
"""

from __future__ import annotations

import os
from pathlib import Path

V1 = Path('/sys/fs/cgroup/cpu')
V2_ROOTS = (Path('/sys/fs/cgroup/unified'), Path('/sys/fs/cgroup'))


MIN_QUOTA_US = 1000   # the kernel refuses smaller quotas


class CpuLimitError(RuntimeError):
    """The quota cannot be applied here."""


def parse_cores(text: str) -> list[int]:
    """Return the cores of a list like ``0,2,4-6`` (empty text: none)."""
    cores: list[int] = []
    for part in (p.strip() for p in text.split(',')):
        if not part:
            continue
        first, _, last = part.partition('-')
        cores.extend(range(int(first), int(last or first) + 1))
    return cores


def pin_cores(cores: list[int]) -> None:
    """Restrict every thread of this process (and the children it starts later) to ``cores``."""
    for tid in os.listdir('/proc/self/task'):
        try:
            os.sched_setaffinity(int(tid), cores)
        except ProcessLookupError:
            pass   # that thread has ended


class CpuLimit:
    """Context manager: run the block with this process capped to ``share`` of one core."""

    def __init__(self, share: float, period_ms: float = 2.0):
        if not 0 < share <= 1:
            raise ValueError('share must be in (0, 1]')
        self.share = share
        self.period_us = max(int(period_ms * 1000), int(-(-MIN_QUOTA_US // share)))
        self.group: Path | None = None
        self.parent: Path | None = None

    def __enter__(self) -> 'CpuLimit':
        name = f'rrto_robot_{os.getpid()}'
        quota = int(round(self.share * self.period_us))
        try:
            if (V1 / 'cpu.cfs_quota_us').exists():
                self.parent, self.group = V1, V1 / name
                self.group.mkdir(exist_ok=True)
                (self.group / 'cpu.cfs_period_us').write_text(str(self.period_us))
                (self.group / 'cpu.cfs_quota_us').write_text(str(quota))
            else:
                root = next((r for r in V2_ROOTS if (r / 'cgroup.controllers').exists()
                             and 'cpu' in (r / 'cgroup.controllers').read_text()), None)
                if root is None:
                    raise CpuLimitError('no cgroup cpu controller is mounted')
                self.parent, self.group = root, root / name
                self.group.mkdir(exist_ok=True)
                (self.group / 'cpu.max').write_text(f'{quota} {self.period_us}')
            (self.group / 'cgroup.procs').write_text(str(os.getpid()))
        except OSError as exc:
            self._remove()
            raise CpuLimitError(f'cannot cap the CPU here ({exc}); run as root on Linux')
        return self

    def __exit__(self, *exc) -> None:
        if self.parent is not None:
            try:
                (self.parent / 'cgroup.procs').write_text(str(os.getpid()))
            except OSError:
                pass
        self._remove()

    def _remove(self) -> None:
        if self.group is not None:
            try:
                self.group.rmdir()
            except OSError:
                pass
