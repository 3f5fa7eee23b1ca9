"""
The ``/rrto/latency`` record: one inference's timing as key/value strings, and back.

The record travels as ``diagnostic_msgs/msg/DiagnosticStatus`` (the package
ships no interface package); this module owns its keys, so the offload node
that writes it and the bandwidth monitor and bring-up that read it agree.
Times are milliseconds with microsecond resolution; ``stamp`` is the input
image's header stamp as ``sec.nanosec``; unknown numbers are ``nan``.
"""

from __future__ import annotations

import math
from typing import Iterable

from rrto_ros.records import CallRecord, OffloadResult

# key -> type, in the order the record lists them
KEYS = {
    'total_ms': float,           # the offload call: queue on the robot excluded
    'network_ms': float,         # request sent -> reply taken, minus server_ms (README)
    'server_ms': float,          # request received to reply sent, on the server
    'server_queue_ms': float,    # waiting for the server's device
    'server_compute_ms': float,  # the server's device work
    'robot_compute_ms': float,   # robot-side work inside the call (local inference included)
    'preprocess_ms': float,      # Image -> tensor on the robot, before the call
    'age_ms': float,             # input image stamp -> outputs published (end to end)
    'plan': str,                 # offload | local | a split/hybrid plan of the plan table
    'predicted_ms': float,       # the plan table's prediction of this call, made before it ran
    'bandwidth_mbps': float,     # link estimate the plan was chosen for (nan if none yet)
    'rtt_ms': float,             # round-trip estimate from /rrto/bandwidth (nan if none yet)
    'task': str,
    'fallback': bool,            # the server failed or was late: ran locally instead
    'result': str,               # offloaded | local | local_fallback
    'reason': str,               # why it ran locally ('' when offloaded)
    'deadline_missed': bool,     # later than deadline_ms, or dropped by the server for it
    'preemptions': int,          # times the server suspended it for more urgent work
    'stamp': str,                # input image header stamp, sec.nanosec
    'round_trips': int,          # requests sent, answered or timed out (1 when offloaded)
    'remote_subgraphs': int,     # partitioned model: subgraphs the server ran in this call
    'local_subgraphs': int,      # partitioned model: captured subgraphs the robot ran
    'eager_subgraphs': int,      # of the remote ones: run unrecorded (sizes depend on the data)
    'bytes_sent': int,           # a request whose reply timed out included
    'bytes_received': int,
    'server': str,               # the server endpoint
    'frames_dropped': int,       # frames replaced by newer ones before inference, so far
    'variant': str,              # model variant from the node's strategy file ('' if none)
}


def _text(value) -> str:
    if isinstance(value, bool):
        return 'true' if value else 'false'
    if isinstance(value, float):
        return 'nan' if math.isnan(value) else f'{value:.3f}'
    return str(value)


def record_values(record: CallRecord, *, task: str, server: str, stamp: str,
                  preprocess_ms: float, age_ms: float, rtt_ms: float = math.nan,
                  frames_dropped: int = 0, variant: str = '') -> list[tuple[str, str]]:
    """Return the record's ``(key, value)`` pairs in :data:`KEYS` order."""
    bandwidth_mbps = record.bandwidth_mbps if record.bandwidth_mbps > 0 else math.nan
    values = {
        'total_ms': record.total_ms, 'network_ms': record.network_ms,
        'server_ms': record.server_ms,
        'server_queue_ms': record.server_queue_ms,
        'server_compute_ms': record.server_compute_ms,
        'robot_compute_ms': record.robot_compute_ms, 'preprocess_ms': float(preprocess_ms),
        'age_ms': float(age_ms), 'plan': record.plan,
        'predicted_ms': record.predicted_ms if record.predicted_ms > 0 else math.nan,
        'bandwidth_mbps': float(bandwidth_mbps),
        'rtt_ms': float(rtt_ms), 'task': task, 'fallback': record.fallback,
        'result': record.result.value, 'reason': record.reason,
        'deadline_missed': record.deadline_missed, 'preemptions': record.preemptions,
        'stamp': stamp,
        'round_trips': record.round_trips, 'remote_subgraphs': record.remote_subgraphs,
        'local_subgraphs': record.local_subgraphs,
        'eager_subgraphs': record.eager_subgraphs, 'bytes_sent': record.bytes_sent,
        'bytes_received': record.bytes_received, 'server': server,
        'frames_dropped': int(frames_dropped), 'variant': variant}
    return [(key, _text(values[key])) for key in KEYS]


def parse_values(pairs: Iterable[tuple[str, str]]) -> dict:
    """Return typed values of a record's pairs; unknown keys are kept as strings."""
    out = {}
    for key, text in pairs:
        kind = KEYS.get(key, str)
        if kind is bool:
            out[key] = text == 'true'
        elif kind is int:
            out[key] = int(text)
        elif kind is float:
            out[key] = float(text)
        else:
            out[key] = text
    return out


def summary_line(record: CallRecord) -> str:
    """Return the one-line message of a record (DiagnosticStatus.message)."""
    if record.result == OffloadResult.OFFLOADED:
        return f'offloaded in {record.total_ms:.1f} ms ({record.plan})'
    return f'{record.result.value} in {record.total_ms:.1f} ms: {record.reason}'


def stamp_text(sec: int, nanosec: int) -> str:
    """Return a header stamp as exact ``sec.nanosec`` text."""
    return f'{int(sec)}.{int(nanosec):09d}'
