"""
Build the standard messages the nodes publish; QoS profiles stated once per stream.

Imports no torch: ``camera_sim`` uses it and starts without torch.
"""

from __future__ import annotations

import array
from typing import Iterable

from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue
from rclpy.qos import (DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy,
                       qos_profile_sensor_data)
from std_msgs.msg import Float32MultiArray, MultiArrayDimension

from rrto_ros.outputs import dimensions

LATENCY_TOPIC = '/rrto/latency'
BANDWIDTH_TOPIC = '/rrto/bandwidth'
DIAGNOSTICS_TOPIC = '/diagnostics'

IMAGE_QOS = qos_profile_sensor_data                       # camera frames: best effort, newest
LATENCY_QOS = QoSProfile(depth=50, reliability=ReliabilityPolicy.RELIABLE,
                         history=HistoryPolicy.KEEP_LAST)  # one record per inference, none lost
STATUS_QOS = QoSProfile(depth=1, reliability=ReliabilityPolicy.RELIABLE,
                        durability=DurabilityPolicy.TRANSIENT_LOCAL,
                        history=HistoryPolicy.KEEP_LAST)   # latest link estimate, for late joiners
OUTPUT_QOS = QoSProfile(depth=10, reliability=ReliabilityPolicy.RELIABLE,
                        history=HistoryPolicy.KEEP_LAST)
DIAGNOSTICS_QOS = QoSProfile(depth=10, reliability=ReliabilityPolicy.RELIABLE,
                             history=HistoryPolicy.KEEP_LAST)

OK, WARN, ERROR, STALE = (DiagnosticStatus.OK, DiagnosticStatus.WARN, DiagnosticStatus.ERROR,
                          DiagnosticStatus.STALE)


def status(name: str, level: bytes, message: str, values: Iterable[tuple[str, object]],
           hardware_id: str = '') -> DiagnosticStatus:
    """Return a DiagnosticStatus with its values as key/value strings."""
    return DiagnosticStatus(level=level, name=name, message=message, hardware_id=hardware_id,
                            values=[KeyValue(key=k, value=str(v)) for k, v in values])


def diagnostic_array(stamp, statuses: Iterable[DiagnosticStatus]) -> DiagnosticArray:
    """Return a DiagnosticArray stamped ``stamp`` (a builtin_interfaces Time)."""
    msg = DiagnosticArray()
    msg.header.stamp = stamp
    msg.status = list(statuses)
    return msg


def values_of(msg: DiagnosticStatus) -> list[tuple[str, str]]:
    """Return a status's key/value pairs."""
    return [(kv.key, kv.value) for kv in msg.values]


def float_array(tensor, name: str = '') -> Float32MultiArray:
    """Return output ``name`` (a tensor) as a Float32MultiArray with labelled dimensions."""
    data = tensor.detach().cpu().float().contiguous()
    msg = Float32MultiArray()
    msg.layout.dim = [MultiArrayDimension(label=label, size=size, stride=stride)
                      for label, size, stride in dimensions(tuple(data.shape), name)]
    msg.layout.data_offset = 0
    msg.data = array.array('f', data.numpy().tobytes())
    return msg
