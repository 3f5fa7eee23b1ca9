"""
Every server option, declared once: the command line, ``server_node`` and its YAML derive from it.

:data:`OPTIONS` lists each option with its default in the unit a user types
(MiB, not bytes), its help text, its constraints and how it becomes a
:class:`ServerConfig` field.  ``python -m rrto_server`` builds its argparse
flags from it (:func:`add_arguments`, :func:`config_from_args`),
``server_node`` its ROS parameters, and ``config/server.yaml`` lists the same
defaults (a test checks all three agree).  :func:`setup_process` is the
process-wide setup both entry points run before serving.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from rrto_server.lanes import DROP, LATE_POLICIES
from rrto_server.scheduler import POLICIES, PREEMPTIVE
from rrto_wire import strategy as strategy_file
from rrto_wire.limits import DEFAULT_MAX_MESSAGE_BYTES

# lane threads must get the GIL back quickly after a step (Python's default interval: 5 ms)
GIL_SWITCH_S = 0.0005
# Server.close() waits 5 s per lane; a step may take longer on a loaded CPU, and a process that
# exits while a thread is inside torch aborts ("terminate called without an active exception")
DRAIN_S = 60.0
PROFILE_UTIL = {'auto': None, 'on': True, 'off': False}


def _device_problem(value: str) -> str | None:
    if value in ('auto', 'cpu', 'cuda') or value.startswith('cuda:'):
        return None
    return f'{value!r} is not auto, cpu, cuda or cuda:N'


def _theta_problem(value: float) -> str | None:
    return None if value == -1 or 0 <= value <= 2 else f'{value} is not -1 (auto) or in [0, 2]'


def parse_task_late(text: str) -> dict[str, str]:
    """Return ``{'slam': 'run'}`` for ``'slam=run'`` (comma-separated); raise ValueError."""
    policies = {}
    for item in filter(None, (part.strip() for part in text.split(','))):
        task, _, late = item.rpartition('=')
        if not task or late not in LATE_POLICIES:
            raise ValueError(f'expects TASK=drop or TASK=run, got {item!r}')
        policies[task] = late
    return policies


def _strategy_problem(path: str) -> str | None:
    if not path:
        return None
    try:
        strategy_file.load(path)
    except ValueError as exc:
        return str(exc)
    return None


def _task_thetas(path: str) -> dict[str, float]:
    """Return the per-task packing thresholds of a strategy file ('' = none)."""
    if not path:
        return {}
    return {name: task.theta for name, task in strategy_file.load(path).tasks.items()
            if task.theta is not None}


def _task_late_problem(text: str) -> str | None:
    try:
        parse_task_late(text)
    except ValueError as exc:
        return str(exc)
    return None


@dataclass(frozen=True)
class Option:
    """One server option: its name, default and constraints, and its ServerConfig field."""

    name: str                                    # ROS parameter; --name-with-dashes
    default: Any                                 # in the user's unit; typed as ROS types it
    help: str
    range: tuple | None = None                   # inclusive (low, high)
    choices: tuple | None = None
    check: Callable[[Any], str | None] | None = None
    field: str | None = ''                       # ServerConfig field ('' = name, None: none)
    convert: Callable[[Any], Any] | None = None  # user value -> ServerConfig value
    flag: str = ''                               # command-line flag ('' = --name-with-dashes)

    @property
    def target(self) -> str | None:
        return self.name if self.field == '' else self.field

    def problem(self, value: Any) -> str | None:
        """Return why ``value`` is invalid for this option, or None."""
        if self.choices and value not in self.choices:
            return f'{value!r} is not one of {", ".join(map(str, self.choices))}'
        if self.range is not None and not self.range[0] <= value <= self.range[1]:
            return f'{value} is outside [{self.range[0]}, {self.range[1]}]'
        return self.check(value) if self.check else None

    def config_value(self, value: Any) -> Any:
        """Return ``value`` as the ServerConfig field holds it."""
        return self.convert(value) if self.convert else value


OPTIONS = (
    Option('bind', 'tcp://127.0.0.1:5555', 'ZeroMQ endpoint to bind (tcp://0.0.0.0:5555: all)'),
    Option('store', '~/.cache/rrto_ros/store', 'model store directory; survives restarts',
           convert=os.path.expanduser),
    Option('device', 'auto', "'auto' (CUDA if available), 'cpu', 'cuda' or 'cuda:N'",
           check=_device_problem),
    Option('allow_upload', True, 'accept model uploads (false: serve stored models only)',
           flag='--no-upload'),
    Option('max_message_mb', DEFAULT_MAX_MESSAGE_BYTES / 2**20,
           'largest request, MiB (a larger one gets a too_large reply; 4x drops the connection)',
           range=(0.001, 4096.0), field='max_message_bytes', convert=lambda v: int(v * 2**20)),
    Option('max_queued_replies', 100, 'replies queued per peer (ZMQ_SNDHWM); beyond, they are '
           'dropped and counted', range=(1, 1000000)),
    Option('max_peer_reply_mb', 64.0, 'large replies in flight per peer, MiB; beyond, they are '
           'dropped and counted', range=(0.001, 1e6), field='max_peer_reply_bytes',
           convert=lambda v: int(v * 2**20)),
    Option('max_replays', 32, 'recorded replays kept (least recently used dropped)',
           range=(1, 100000)),
    Option('max_replay_mb', 8192.0, 'device memory for recorded replays, MiB',
           range=(1.0, 1e7), field='max_replay_bytes', convert=lambda v: int(v * 2**20)),
    Option('max_models', 16, 'models kept loaded (least recently used dropped)',
           range=(1, 10000)),
    Option('cpu_backend', 'fx', 'CPU replay: fx (bit-exact with local eager) or frozen '
           '(TorchScript freeze; folds batch norm, differs ~1e-4 relative)',
           choices=('fx', 'frozen')),
    Option('naive_ttl_s', 60.0, 'idle naive-mode sessions are dropped after this, seconds',
           range=(1.0, 86400.0)),
    Option('threads', 0, 'torch intra-op threads of the process (0: torch default)',
           range=(0, 1024)),
    Option('keys', '', "CURVE key directory made by rrto-keys ('' = none); required unless "
           'the bind address is loopback or insecure is set (docs/security.md)',
           convert=lambda v: os.path.expanduser(v) if v else None),
    Option('insecure', False, 'serve plain TCP on a non-loopback address (anyone may connect)'),
    Option('allow_naive', False, 'serve per-operator (naive) requests, the baseline mode'),
    Option('max_store_mb', 32768.0, 'store quota, MiB; least recently used unpinned blobs are '
           'evicted', range=(1.0, 1e9), field='max_store_bytes',
           convert=lambda v: int(v * 2**20)),
    Option('program_max_mb', 1024.0, 'memory one call of a model may need, MiB (sandbox trial)',
           range=(1.0, 1e7), field='program_max_bytes', convert=lambda v: int(v * 2**20)),
    Option('program_max_s', 10.0, 'CPU seconds one call of a model may take (sandbox trial)',
           range=(0.01, 1e5)),
    Option('admission_capacity', 64, 'inference requests in flight before low priorities are '
           'shed', range=(1, 1000000)),
    Option('sched_policy', PREEMPTIVE, 'device scheduling: fifo, priority (no preemption) or '
           'preemptive (re-pick after every segment)', choices=POLICIES),
    Option('pack_theta', -1.0, 'packing threshold for the low-priority CUDA stream: 0 off, '
           '-1 auto (1.0 on CUDA, off on CPU)', range=(-1.0, 2.0), check=_theta_problem,
           convert=lambda v: None if v < 0 else float(v)),
    Option('strategy', '', "strategy file from rrto-plan-tasks: its theta is the packing "
           "threshold unless pack_theta is set, and its tasks' own thresholds apply",
           check=_strategy_problem, field='task_theta', convert=_task_thetas),
    Option('profile_util', 'auto', "profile each replay's utilisation when recording "
           '(auto: when packing is on)', choices=tuple(PROFILE_UTIL),
           convert=PROFILE_UTIL.__getitem__),
    Option('late_policy', DROP, "requests past their deadline: 'drop' (answer deadline_missed "
           "at once) or 'run' late; a request's own 'late' field wins", choices=LATE_POLICIES),
    Option('task_late', '', "per-task late policy, e.g. 'slam=run,nav=drop' (the command line "
           'also takes --task-late repeatedly)', check=_task_late_problem,
           convert=parse_task_late),
    Option('cpu_workers', 2, 'threads for decoding, staging, copy-back and encoding',
           range=(1, 64)),
    Option('inline_max_ms', 5.0, 'when the device is idle, serve raw-frame requests of replays '
           'whose segments take at most this on the I/O thread (0: never)',
           range=(0.0, 1e6)),
    Option('sched_trace', 0, 'keep the last N device steps in the stats (0: off)',
           range=(0, 1000000)),
)
BY_NAME = {option.name: option for option in OPTIONS}


def defaults() -> dict[str, Any]:
    """Return every option's default, as the command line, the node and the YAML have it."""
    return {option.name: option.default for option in OPTIONS}


def _default(name: str) -> Any:
    option = BY_NAME[name]
    return option.config_value(option.default)


@dataclass
class ServerConfig:
    """Everything a server can be configured with; defaults are those of :data:`OPTIONS`."""

    bind: str = _default('bind')
    store: str = _default('store')
    device: str = _default('device')
    allow_upload: bool = _default('allow_upload')
    max_message_bytes: int = _default('max_message_mb')
    max_queued_replies: int = _default('max_queued_replies')   # per peer (ZMQ_SNDHWM)
    max_peer_reply_bytes: int = _default('max_peer_reply_mb')  # large replies in flight
    max_replays: int = _default('max_replays')
    max_replay_bytes: int = _default('max_replay_mb')
    max_models: int = _default('max_models')
    cpu_backend: str = _default('cpu_backend')
    naive_ttl_s: float = _default('naive_ttl_s')
    threads: int = _default('threads')                 # process-wide (see setup_process)
    sched_policy: str = _default('sched_policy')       # fifo | priority | preemptive
    pack_theta: float | None = _default('pack_theta')  # None: 1.0 on CUDA, off on CPU
    profile_util: bool | None = _default('profile_util')   # None: when packing is on
    late_policy: str = _default('late_policy')         # for requests that do not say
    task_late: dict = field(default_factory=dict)      # per-task late policy
    task_theta: dict = field(default_factory=dict)     # per-task packing threshold (strategy)
    cpu_workers: int = _default('cpu_workers')
    inline_max_ms: float = _default('inline_max_ms')
    sched_trace: int = _default('sched_trace')
    keys: str | None = _default('keys')                # CURVE key directory (rrto_server.auth)
    insecure: bool = _default('insecure')              # plain TCP on a non-loopback bind
    allow_naive: bool = _default('allow_naive')        # serve per-operator (naive) requests
    max_store_bytes: int = _default('max_store_mb')
    program_max_bytes: int = _default('program_max_mb')   # sandbox budgets per call
    program_max_s: float = _default('program_max_s')
    admission_capacity: int = _default('admission_capacity')   # load before shedding

    def resolved_theta(self, device: torch.device) -> float:
        """Return the packing threshold in force on ``device``."""
        if self.pack_theta is None:
            return 1.0 if device.type == 'cuda' else 0.0
        return float(self.pack_theta)

    def check(self) -> None:
        """Raise ValueError naming the first invalid scheduling option."""
        if self.sched_policy not in POLICIES:
            raise ValueError(f'sched_policy must be one of {POLICIES}')
        if self.pack_theta is not None and not 0 <= self.pack_theta <= 2:
            raise ValueError('pack_theta must be between 0 (off) and 2')
        for task, late in {'(default)': self.late_policy, **self.task_late}.items():
            if late not in LATE_POLICIES:
                raise ValueError(f'late policy of task {task!r} must be one of {LATE_POLICIES}')
        if self.cpu_workers < 1:
            raise ValueError('cpu_workers must be at least 1')
        if self.threads < 0:
            raise ValueError('threads must be >= 0 (0: torch default)')
        if self.max_queued_replies < 1:
            raise ValueError('max_queued_replies must be at least 1')

    def resolved_device(self) -> torch.device:
        """Return the torch device ``device`` names; raise ValueError if it cannot be used."""
        if self.device == 'auto':
            return torch.device('cuda' if torch.cuda.is_available() else 'cpu')
        device = torch.device(self.device)
        if device.type == 'cuda' and not torch.cuda.is_available():
            raise ValueError(f'device {self.device!r} requested but CUDA is not available')
        return device


def config_from(values: dict[str, Any]) -> ServerConfig:
    """Return the ServerConfig for option values by name (missing ones: defaults)."""
    values = dict(values)
    if values.get('strategy') and values.get('pack_theta', -1.0) == -1.0:
        values['pack_theta'] = float(strategy_file.load(values['strategy']).theta)
    return ServerConfig(**{BY_NAME[name].target: BY_NAME[name].config_value(value)
                           for name, value in values.items() if BY_NAME[name].target})


# ---------------------------------------------------------------------- command line
def flag(option: Option) -> str:
    """Return the option's command-line flag."""
    return option.flag or '--' + option.name.replace('_', '-')


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add one flag per option to ``parser``, checked as the node checks its parameters."""
    for option in OPTIONS:
        kwargs: dict[str, Any] = {'dest': option.name, 'default': option.default,
                                  'help': option.help}
        if isinstance(option.default, bool):
            # the flag turns the default off (--no-upload), as a switch does
            kwargs['action'] = 'store_false' if option.default else 'store_true'
            kwargs['help'] = f'{option.name} {str(not option.default).lower()}: {option.help}'
        elif option.name == 'task_late':
            kwargs.update(action='append', default=[], metavar='TASK=POLICY')
        else:
            kwargs['type'] = _checked(option)
            if option.choices:
                kwargs['choices'] = option.choices
        parser.add_argument(flag(option), **kwargs)


def _checked(option: Option) -> Callable[[str], Any]:
    kind = type(option.default)

    def parse(text: str) -> Any:
        value = kind(text)
        reason = None if option.choices else option.problem(value)
        if reason:
            raise argparse.ArgumentTypeError(reason)
        return value

    parse.__name__ = kind.__name__   # argparse names the type in its error message
    return parse


def config_from_args(args: argparse.Namespace) -> ServerConfig:
    """Return the ServerConfig of parsed command-line arguments; raise ValueError."""
    values = {option.name: getattr(args, option.name) for option in OPTIONS}
    values['task_late'] = ','.join(values['task_late'])
    reason = _task_late_problem(values['task_late'])
    if reason:
        raise ValueError(f'--task-late {reason}')
    return config_from(values)


# ---------------------------------------------------------------------- process
def setup_process(config: ServerConfig) -> None:
    """Set what is process-wide: the GIL switch interval and torch's intra-op threads."""
    sys.setswitchinterval(GIL_SWITCH_S)
    if config.threads:
        torch.set_num_threads(config.threads)


def threads_now() -> set:
    """Return the threads alive now (before creating a Server: see :func:`drain_threads`)."""
    return set(threading.enumerate())


def drain_threads(before: set, timeout_s: float = DRAIN_S) -> None:
    """Wait for the server threads (``rrto-*``) started since ``before`` to end."""
    deadline = time.monotonic() + timeout_s
    started = [t for t in threads_now() - before if t.name.startswith('rrto-')]
    for thread in started:
        thread.join(max(0.0, deadline - time.monotonic()))
    left = [t.name for t in started if t.is_alive()]
    if left:
        logging.getLogger('rrto_server').warning('threads still running after %g s: %s',
                                                 timeout_s, ', '.join(left))
