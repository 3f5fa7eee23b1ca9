"""
What a partitioned model reports: its calls as CallRecords, and where dynamo breaks it.

A call of a partitioned model (:mod:`rrto_ros.partition`) is a sequence of
subgraph calls, each remote one served by its own inner offloaded model with
its own :class:`~rrto_ros.records.CallRecord`.  :func:`call_fields` sums them:
the server's and the network's times over the remote subgraphs, the round
trips and bytes of all, and the robot's time as the rest of the call (its
local subgraphs and the Python between the graphs).  :func:`graph_breaks`
says where the cuts are: dynamo's own account of each graph break under the
partition's settings, with the user code it happened in.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch._dynamo


def call_fields(calls: list, total_ms: float, bandwidth_mbps: float) -> dict:
    """Sum one call's subgraph calls into the fields of a CallRecord."""
    # the subgraphs of a chained request share its record: counted once
    records = list({id(r): r for _, r, _ in calls if r is not None}.values())
    remote = [r for r in records if r.result.value == 'offloaded']
    fallbacks = [r for r in records if r.result.value == 'local_fallback']
    waiting = [f'subgraph {s.index}: {r.reason}' for s, r, _ in calls
               if r is not None and r.result.value != 'offloaded']
    if fallbacks:
        result = 'local_fallback'
    elif remote:
        result = 'offloaded'
    else:
        result = 'local'
        waiting = waiting or ['no subgraph is worth a round trip']
    remote_ms = sum(r.network_ms + r.server_ms for r in remote)
    served = sum(1 for _, r, _ in calls if r is not None and r.result.value == 'offloaded')
    return {
        'result': result, 'plan': 'partitioned', 'total_ms': total_ms,
        'network_ms': sum(r.network_ms for r in remote),
        'server_ms': sum(r.server_ms for r in remote),
        'server_queue_ms': sum(r.server_queue_ms for r in remote),
        'server_compute_ms': sum(r.server_compute_ms for r in remote),
        'robot_compute_ms': max(0.0, total_ms - remote_ms),
        'round_trips': sum(r.round_trips for r in records),
        'bytes_sent': sum(r.bytes_sent for r in records),
        'bytes_received': sum(r.bytes_received for r in records),
        'bandwidth_mbps': bandwidth_mbps, 'codec': remote[0].codec if remote else '',
        'reason': '; '.join(waiting), 'preemptions': sum(r.preemptions for r in remote),
        'deadline_missed': any(r.deadline_missed for r in records),
        'remote_subgraphs': served, 'local_subgraphs': len(calls) - served,
        'eager_subgraphs': sum(1 for s, r, _ in calls
                               if r is not None and r.result.value == 'offloaded' and s.dynamic)}


def local_fields(total_ms: float, bandwidth_mbps: float, reason: str) -> dict:
    """Return the fields of a CallRecord for a call the robot ran whole."""
    fields = call_fields([], total_ms, bandwidth_mbps)
    fields['reason'] = reason
    return fields


def first_line(exc: BaseException) -> str:
    """Return an exception's type and the first line of its message."""
    text = str(exc).strip().splitlines()
    return f'{type(exc).__name__}: {text[0] if text else ""}'[:300]


def graph_breaks(module: torch.nn.Module, args: tuple, config: dict) -> dict:
    """
    Return where dynamo breaks ``module``'s graphs for ``args`` under ``config``, and why.

    ``torch._dynamo.explain`` with the dynamo settings ``config`` (the
    partition's): the number of graphs and breaks, the operators per graph,
    and each distinct break reason (its first line) with the last two user
    frames it happened in and how often.  A diagnostic: it resets dynamo's
    caches before and after (whatever this process compiled, partitioned
    models included, compiles again on its next call), so that neither
    sees the other's graphs.
    """
    torch.compiler.reset()
    try:
        with torch.inference_mode(), torch._dynamo.config.patch(**config):
            explained = torch._dynamo.explain(module)(*args)
    finally:
        torch.compiler.reset()
    reasons: dict[tuple, int] = {}
    for cause in explained.break_reasons:
        frames = [f'{Path(f.filename).parent.name}/{Path(f.filename).name}:{f.lineno} {f.name}'
                  for f in cause.user_stack[-2:]]
        key = (cause.reason.strip().splitlines()[0][:160], ' < '.join(reversed(frames)))
        reasons[key] = reasons.get(key, 0) + 1
    return {'graphs': explained.graph_count, 'breaks': explained.graph_break_count,
            'ops_per_graph': [len(ops) for ops in explained.ops_per_graph or []],
            'reasons': [{'reason': r, 'where': w, 'count': n} for (r, w), n in reasons.items()]}
