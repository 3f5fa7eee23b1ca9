"""
``python -m rrto_server`` as a child process: start it, know when it answers, stop it.

The bring-up, the benchmarks and the tests all run the server in its own
process, as it is deployed (no shared interpreter lock with the robot side).
:class:`ServerProcess` is the one way they do it: a free loopback port unless
told otherwise, the child's output in a log file, :meth:`start` returning
only once a ``hello`` is answered (or raising with the log's tail if the
server exits first), and :meth:`stop` / :meth:`kill` for the end or for
failure tests.  Restarting on the same port and store is ``start()`` again.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from rrto_wire.hello import hello

PACKAGE_ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as sock:
        sock.bind(('127.0.0.1', 0))
        return sock.getsockname()[1]


def child_env(**extra: str) -> dict:
    """Return this environment with this package importable first in children."""
    env = dict(os.environ)
    env['PYTHONPATH'] = os.pathsep.join(
        [str(PACKAGE_ROOT)] + [p for p in [env.get('PYTHONPATH')] if p])
    env['PYTHONUNBUFFERED'] = '1'
    env.update(extra)
    return env


class ServerProcess:
    """One ``python -m rrto_server`` child (see the module docstring)."""

    def __init__(self, store: str | os.PathLike, port: int | None = None, *args: str,
                 device: str = 'cpu', log: str | os.PathLike | None = None,
                 bind: str | None = None):
        self.store = Path(store)
        self.port = port or free_port()
        self.endpoint = bind or f'tcp://127.0.0.1:{self.port}'
        self.args = ['--device', device, *args]
        default_log = Path(tempfile.gettempdir()) / f'rrto-server-{self.port}.log'
        self.log = Path(log) if log else default_log
        self.proc: subprocess.Popen | None = None

    @property
    def command(self) -> list[str]:
        return [sys.executable, '-m', 'rrto_server', '--bind', self.endpoint,
                '--store', str(self.store), '--log-level', 'WARNING', *self.args]

    def start(self, timeout_s: float = 60.0) -> 'ServerProcess':
        """Start the server; return once it answers, else stop it and raise RuntimeError."""
        if hello(self.endpoint, timeout_ms=200) is not None:
            # another server's answer must never pass for this one's
            raise RuntimeError(f'a server already answers on {self.endpoint}')
        with open(self.log, 'ab') as log:
            self.proc = subprocess.Popen(self.command, env=child_env(), stdout=log,
                                         stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f'rrto_server exited with {self.proc.returncode}: '
                                   f'{self.log_tail()}')
            if hello(self.endpoint, timeout_ms=300) is not None:
                return self
        self.stop()
        raise RuntimeError(f'rrto_server did not answer within {timeout_s:g} s: '
                           f'{self.log_tail()}')

    def log_tail(self, chars: int = 2000) -> str:
        try:
            return self.log.read_text(errors='replace')[-chars:]
        except OSError:
            return '(no log)'

    def kill(self) -> None:
        """End the server at once (SIGKILL), as a crash would."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def stop(self) -> int | None:
        """Terminate the server (SIGTERM), kill it after 10 s; return its exit code."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        return self.proc.returncode

    def __enter__(self) -> 'ServerProcess':
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
