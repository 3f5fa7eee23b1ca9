"""
Emulate a weaker robot CPU: cap this process with a CPU quota (Linux cgroups, root).

On a test machine the robot and the server share one CPU model, but a real
robot's onboard computer is several times slower than the server.  A CFS
quota of ``share`` of one core every ``period_ms`` slows every robot-side
computation by about ``1/share`` while the server and the link emulator,
started before the cap, run at full speed.  Works with the cgroup v1 ``cpu``
controller and with cgroup v2 (``cpu.max``); raises :class:`CpuLimitError`
with the reason where neither is writable.
"""

from __future__ import annotations

import os
from pathlib import Path

V1 = Path('/sys/fs/cgroup/cpu')
V2_ROOTS = (Path('/sys/fs/cgroup/unified'), Path('/sys/fs/cgroup'))


class CpuLimitError(RuntimeError):
    """The quota cannot be applied here."""


class CpuLimit:
    """Context manager: run the block with this process capped to ``share`` of one core."""

    def __init__(self, share: float, period_ms: float = 10.0):
        if not 0 < share <= 1:
            raise ValueError('share must be in (0, 1]')
        self.share = share
        self.period_us = int(period_ms * 1000)
        self.group: Path | None = None
        self.parent: Path | None = None

    def __enter__(self) -> 'CpuLimit':
        name = f'rrto_robot_{os.getpid()}'
        quota = max(1000, int(self.share * self.period_us))
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
