"""
Client half of naive per-operator offloading: one round trip per graph operator.

The inputs travel with the first operator, intermediate values stay on the
server under their graph names, and the outputs come back with the last
operator's reply: exactly ``len(nodes)`` round trips per inference.
"""

from __future__ import annotations

import time
import uuid
from typing import Sequence

import torch

from rrto_ros.client import RrtoClient, ServerUnavailable
from rrto_ros.local_model import Artifact
from rrto_wire.messages import Kind


def operator_count(artifact: Artifact) -> int:
    """Return the number of operators (and so of round trips) of one naive inference."""
    return max(1, len(artifact.program['nodes']))


def run_naive(client: RrtoClient, artifact: Artifact, flat: Sequence[torch.Tensor],
              timeout_ms: float) -> list[torch.Tensor]:
    """Run one inference operator by operator; raise ServerUnavailable past ``timeout_ms``."""
    doc = artifact.program
    session = uuid.uuid4().hex
    deadline = time.monotonic() + timeout_ms / 1e3
    nodes = doc['nodes'] or [None]
    fetch = [out['n'] for out in doc['outputs']]
    fetched: list[torch.Tensor] = []
    for index, node in enumerate(nodes):
        fields = {'session': session, 'model': artifact.model}
        if node is not None:
            fields.update(
                op=node['op'],
                args=node['args'],
                kwargs=node['kwargs'],
                out=node['name'])
        tensors: Sequence[torch.Tensor] = ()
        if index == 0:
            fields['inputs'] = [i['name'] for i in doc['inputs']]
            tensors = flat
        if index == len(nodes) - 1:
            fields.update(fetch=fetch, end=True)
        remaining_ms = (deadline - time.monotonic()) * 1e3
        if remaining_ms <= 0:
            raise ServerUnavailable('naive inference ran past its timeout')
        _, fetched = client.call(Kind.OP, fields, tensors, timeout_ms=remaining_ms)
    return fetched
