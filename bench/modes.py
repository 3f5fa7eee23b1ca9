"""
The execution modes the benchmark compares, as a registry other issues extend.

A mode builds a *runner* for one model: a callable taking the model's inputs
and returning its outputs, with ``last`` (the :class:`rrto_ros.CallRecord` of
the latest call), ``warmup(*inputs, timeout_s=...) -> bool``, ``stats()``
and ``close()``, which is exactly the :class:`rrto_ros.OffloadedModel`
interface.  Runners of modes with ``uses_link`` talk to the server through
the link emulator; ``codecs`` says whether ``set_codec`` applies.

Adding a mode is one entry::

    MODES['name'] = Mode('name', 'what it does', uses_link=True,
                         make=lambda model, endpoint, timeout_ms: offload(...))

and the matrix, the report and the plots pick it up.  Hybrid plans and the
best single split need plan tables solved from profiles on a capped robot
CPU; :mod:`bench.hybrid` measures them against local-only and full offload.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

from rrto_ros import offload


@dataclass(frozen=True)
class Mode:
    """One way of running inference, and how to build its runner."""

    name: str
    description: str
    uses_link: bool
    make: Callable[[torch.nn.Module, str, float], Any]
    codecs: bool = False


def _engine(mode: str) -> Callable[[torch.nn.Module, str, float], Any]:
    def make(model: torch.nn.Module, endpoint: str, timeout_ms: float):
        return offload(model, server=endpoint, timeout_ms=timeout_ms, mode=mode,
                       task=f'bench-{mode}')
    return make


MODES: dict[str, Mode] = {
    'local': Mode('local', 'whole model on the robot CPU, no network', False, _engine('local')),
    'naive': Mode('naive', 'one round trip per operator (transparent API remoting)', True,
                  _engine('naive')),
    'eager': Mode('eager', 'one round trip, server runs the graph op by op (no replay)', True,
                  _engine('eager'), codecs=True),
    'replay': Mode('replay', 'one round trip, server replays the recorded graph', True,
                   _engine('replay'), codecs=True),
}
