"""
Helpers for tests with real rclpy: per-run domain ids, node processes, a listener.

Every test run picks its own ``ROS_DOMAIN_ID`` base (``RRTO_TEST_DOMAIN_ID``
fixes it) and every test takes the next id, with discovery limited to
localhost, so parallel runs on one machine and consecutive tests never see
each other's nodes.  Launch tests import this module too.
"""

from __future__ import annotations

import itertools
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable

import rclpy
from rclpy.executors import SingleThreadedExecutor
from rclpy.signals import SignalHandlerOptions
from rrto_testing import child_env

os.environ['ROS_AUTOMATIC_DISCOVERY_RANGE'] = 'LOCALHOST'
_BASE = int(os.environ.get('RRTO_TEST_DOMAIN_ID') or random.SystemRandom().randrange(110, 200, 8))
_NEXT = itertools.count()


def new_domain_id() -> int:
    """Return a ROS domain id no other test of this run uses."""
    return _BASE + next(_NEXT) % 8


def ros_env(domain_id: int, **extra: str) -> dict:
    """Return a child environment on ``domain_id``, localhost discovery, this checkout first."""
    return child_env(ROS_DOMAIN_ID=str(domain_id), ROS_AUTOMATIC_DISCOVERY_RANGE='LOCALHOST',
                     **extra)


def param_arg(name: str, value: Any) -> str:
    """Return ``name:=value`` for ``--ros-args -p`` with the value's ROS type kept."""
    if isinstance(value, bool):
        text = 'true' if value else 'false'
    elif isinstance(value, float):
        text = repr(value)
    elif isinstance(value, (list, tuple)):
        text = '[' + ', '.join(repr(v) for v in value) + ']'
    else:
        text = str(value)
    return f'{name}:={text}'


class NodeProcess:
    """One ``rrto_ros.nodes.<module>`` in a child process, its output in a log file."""

    def __init__(self, module: str, params: dict, domain_id: int, log_dir: Path,
                 ros_args: tuple = ()):
        self.module = module
        self.params = params
        self.ros_args = list(ros_args)   # e.g. ('-r', '__node:=other_name')
        self.domain_id = domain_id
        self.log = Path(log_dir) / f'{module}-{time.monotonic_ns()}.log'
        self.proc: subprocess.Popen | None = None

    def start(self, process_group: int | None = None) -> 'NodeProcess':
        """Start the node; ``process_group``: join that group (0: lead a new one)."""
        cmd = [sys.executable, '-m', f'rrto_ros.nodes.{self.module}', '--ros-args',
               *self.ros_args]
        for name, value in self.params.items():
            cmd += ['-p', param_arg(name, value)]
        with open(self.log, 'ab') as log:
            self.proc = subprocess.Popen(cmd, env=ros_env(self.domain_id), stdout=log,
                                         stderr=subprocess.STDOUT, process_group=process_group)
        return self

    def output(self) -> str:
        return self.log.read_text(errors='replace') if self.log.exists() else ''

    def wait(self, timeout_s: float) -> int:
        """Wait for the process to end by itself; return its exit code."""
        try:
            return self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
            raise AssertionError(f'{self.module} did not exit:\n{self.output()}') from None

    def stop(self, timeout_s: float = 15.0) -> int | None:
        """Ctrl-C the node (as launch does); kill it if it does not end; return its code."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        return self.proc.returncode


class Listener:
    """A private rclpy context, node and spinning thread that records messages."""

    def __init__(self, domain_id: int, name: str = 'rrto_test_listener'):
        self.context = rclpy.Context()
        rclpy.init(context=self.context, domain_id=domain_id,
                   signal_handler_options=SignalHandlerOptions.NO)
        self.node = rclpy.create_node(name, context=self.context)
        self.executor = SingleThreadedExecutor(context=self.context)
        self.executor.add_node(self.node)
        self.lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._spin, daemon=True)
        self._thread.start()

    def _spin(self) -> None:
        while not self._stop.is_set() and self.context.ok():
            self.executor.spin_once(timeout_sec=0.05)

    def subscribe(self, msg_type, topic: str, qos) -> list:
        """Collect every message on ``topic`` into the returned list."""
        received: list = []

        def on_message(msg):
            with self.lock:
                received.append(msg)

        self.node.create_subscription(msg_type, topic, on_message, qos)
        return received

    def wait_for(self, predicate: Callable[[], Any], timeout_s: float, what: str,
                 logs: Callable[[], str] = lambda: '') -> Any:
        """Return the first truthy ``predicate()`` within ``timeout_s``; fail naming ``what``."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with self.lock:
                value = predicate()
            if value:
                return value
            time.sleep(0.05)
        raise AssertionError(f'timed out after {timeout_s:g} s waiting for {what}\n{logs()}')

    def lifecycle(self, node: str, transition: str = '', timeout_s: float = 60.0) -> str:
        """Make ``transition`` of lifecycle node ``node`` (if given); return its state's label."""
        from lifecycle_msgs.srv import ChangeState, GetState
        if transition:
            reply = self._call(ChangeState, f'/{node}/change_state', timeout_s,
                               transition=lambda r: setattr(r.transition, 'label', transition))
            assert reply.success, f'{node}: transition {transition} failed'
        return self._call(GetState, f'/{node}/get_state', timeout_s).current_state.label

    def _call(self, srv_type, name: str, timeout_s: float, **fill):
        client = self.node.create_client(srv_type, name)
        try:
            assert client.wait_for_service(timeout_sec=timeout_s), f'no service {name}'
            request = srv_type.Request()
            for setter in fill.values():
                setter(request)
            future = client.call_async(request)
            deadline = time.monotonic() + timeout_s
            while not future.done() and time.monotonic() < deadline:
                time.sleep(0.05)
            assert future.done(), f'{name} did not answer within {timeout_s:g} s'
            return future.result()
        finally:
            self.node.destroy_client(client)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.executor.shutdown(timeout_sec=1.0)
        self.node.destroy_node()
        self.context.try_shutdown()
