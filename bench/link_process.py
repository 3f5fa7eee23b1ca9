"""
The link emulator in a child process (``python -m bench.linkemu --control``), driven over stdin.

The benchmarks run the emulator outside the robot's process so that its
forwarding threads cost the robot no CPU; :class:`EmulatorProcess` is the
parent's end of the JSON line protocol :mod:`bench.linkemu` serves.
"""

from __future__ import annotations

import json
import select
import subprocess
import sys
from typing import Any

from bench.link_config import PRESETS, LinkConfig


class EmulatorProcess:
    """``python -m bench.linkemu --control`` in a child process, so it costs the robot no CPU."""

    def __init__(self, upstream: tuple[str, int], link: LinkConfig = PRESETS['unlimited'],
                 seed: int = 0, python: str = sys.executable, env: dict | None = None):
        cmd = [python, '-m', 'bench.linkemu', '--control', '--seed', str(seed),
               '--upstream', f'{upstream[0]}:{upstream[1]}', '--link-json',
               json.dumps(link.to_json())]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True, bufsize=1, env=env)
        self.port = self._reply(timeout_s=30)['port']

    def _reply(self, timeout_s: float) -> dict:
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout_s)
        line = self.proc.stdout.readline() if ready else ''
        if not line:
            self.close()
            raise RuntimeError('link emulator did not answer')
        reply = json.loads(line)
        if not reply.get('ok'):
            raise RuntimeError(f'link emulator: {reply.get("error")}')
        return reply

    def command(self, cmd: str, timeout_s: float = 30, **fields: Any) -> dict:
        self.proc.stdin.write(json.dumps({'cmd': cmd, **fields}) + '\n')
        self.proc.stdin.flush()
        return self._reply(timeout_s)

    def set_link(self, link: LinkConfig) -> None:
        self.command('set', link=link.to_json())

    def stats(self) -> dict:
        return self.command('stats')['stats']

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write(json.dumps({'cmd': 'stop'}) + '\n')
                self.proc.stdin.flush()
                self.proc.wait(5)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait(5)

    def __enter__(self) -> 'EmulatorProcess':
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
