"""
What one call reports: how it was served (:class:`OffloadResult`) and where its time went.

A :class:`CallRecord` is what ``/rrto/latency`` publishes (see
:mod:`rrto_ros.latency`) and what ``OffloadedModel.last`` holds.
"""

from __future__ import annotations

import enum
import time
from dataclasses import asdict, dataclass, field


class OffloadResult(str, enum.Enum):
    """How one call was served."""

    OFFLOADED = 'offloaded'            # the server took part (offload, split or hybrid plan)
    LOCAL = 'local'                    # ran on the robot by plan, or while the server prepares
    LOCAL_FALLBACK = 'local_fallback'  # the server failed or was too slow; ran on the robot
    SKIPPED = 'skipped'                # the server could not serve it; fallback='skip': no
    #                                    outputs, no robot compute


@dataclass
class CallRecord:
    """Timing breakdown of one call (milliseconds), as /rrto/latency publishes it."""

    result: OffloadResult
    plan: str
    total_ms: float = 0.0
    network_ms: float = 0.0
    server_ms: float = 0.0              # request receipt to reply, on the server
    server_queue_ms: float = 0.0
    server_compute_ms: float = 0.0
    robot_compute_ms: float = 0.0
    round_trips: int = 0
    bytes_sent: int = 0
    bytes_received: int = 0
    bandwidth_mbps: float = 0.0         # the link estimate the plan was chosen for (0: none)
    predicted_ms: float = 0.0           # the plan table's prediction of this call, made before
    #                                     it ran at the robot's price then (0: none)
    codec: str = ''                     # input codec of the request ('' when nothing was sent)
    reason: str = ''
    signature: str = ''
    deadline_missed: bool = False   # later than deadline_ms end to end, or dropped by the server
    preemptions: int = 0            # times the server suspended it for more urgent work
    remote_subgraphs: int = 0       # partitioned model: subgraphs the server ran in this call
    local_subgraphs: int = 0        # partitioned model: captured subgraphs the robot ran
    eager_subgraphs: int = 0        # of the remote ones: unrecorded (sizes depend on the data)
    stamp: float = field(default_factory=time.time)

    @property
    def fallback(self) -> bool:
        """Return True when the server did not serve the call (run locally, or skipped)."""
        return self.result in (OffloadResult.LOCAL_FALLBACK, OffloadResult.SKIPPED)

    def to_dict(self) -> dict:
        data = asdict(self)
        data['result'] = self.result.value
        return data
