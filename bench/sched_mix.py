r"""
Mixed real-time workload against rrto_server under each scheduler policy.

Several perception tasks share one server: by default a high-priority 30 Hz
small network from two clients (two robots), a medium-priority 10 Hz network,
and a low-priority large network running best effort (back to back).  The
same workload runs once per policy, each time against a fresh server process
started with that policy (same code, different ``--sched-policy`` /
``--pack-theta``), so the comparison is FIFO vs priority without preemption vs
the preemptive scheduler (optionally with packing).

A periodic client releases frame k at ``start + phase + k * period``; the
frame's deadline is fixed at release.  A release is *missed* when its reply is
late, when the server drops it (``deadline_missed``), or when the client is
still busy with an earlier frame until past the deadline (skipped).  Reported
per task: p50/p99 latency (client send to reply), deadline miss rate,
throughput; per policy: the server's preemption latency distribution.

Examples::

    python -m bench.sched_mix --preset cpu --duration 20           # this machine
    python -m bench.sched_mix --preset gpu --device cuda --duration 30 \\
        --policies fifo priority preemptive preemptive+pack --out sched_h100.json
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import os
import platform
import queue
import random
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from rrto_server.process import ServerProcess
from rrto_wire.summary import percentile

REPO = Path(__file__).resolve().parents[1]
# steps of the server's trace the stats reply can carry: ~100 bytes each in a header of at
# most rrto_wire.limits.MAX_HEADER_BYTES (10000 steps of a preemptive run went over it)
MAX_TRACE = 8000

POLICIES = {
    'fifo': ('fifo', 0.0),
    'priority': ('priority', 0.0),
    'preemptive': ('preemptive', 0.0),
    'preemptive+pack': ('preemptive', None),      # theta from --theta
}


@dataclass
class TaskSpec:
    """One perception task: which network, how often, how urgent."""

    name: str
    arch: str                      # a rrto_ros.zoo architecture
    shape: tuple                   # input shape, batch first
    priority: int
    rate_hz: float                 # 0: best effort, back to back
    deadline_ms: float | None      # relative to each release
    segments: str = 'whole'
    clients: int = 1
    precision: str = 'fp32'
    late: str = 'drop'

    @classmethod
    def from_dict(cls, data: dict) -> 'TaskSpec':
        data = dict(data)
        data['shape'] = tuple(data['shape'])
        return cls(**data)


PRESETS = {
    # 2 shared CPU cores: ~5 ms, ~8 ms and ~35 ms per inference uncontended
    'cpu': [
        TaskSpec('detect', 'keypoint_net', (1, 3, 96, 128), 2, 30.0, 33.0, 'whole', 2),
        TaskSpec('classify', 'mobilenet', (1, 3, 128, 128), 1, 10.0, 100.0, 'ops:10'),
        TaskSpec('mapping', 'resnet18', (1, 3, 224, 224), 0, 0.0, None, 'block:3'),
    ],
    # one H100: deadlines a task meets alone (~3 ms detect, ~5 ms classify end to end) but
    # not behind a whole best-effort batch (~7 ms of GPU plus its 19 MB input), which is
    # cut into per-block segments.  (A first preset with 480x640 detect frames and a 5 ms
    # deadline measured 100% misses under every policy: the frames' transfer alone is
    # longer than the deadline, which says nothing about scheduling.)
    'gpu': [
        TaskSpec('detect', 'keypoint_net', (1, 3, 224, 224), 2, 30.0, 8.0, 'whole', 2),
        TaskSpec('classify', 'mobilenet', (8, 3, 224, 224), 1, 10.0, 15.0, 'block:3'),
        TaskSpec('mapping', 'resnet18', (32, 3, 224, 224), 0, 0.0, None, 'block:3'),
    ],
    # for the test suite: seconds, not minutes
    'tiny': [
        TaskSpec('detect', 'keypoint_net', (1, 3, 32, 32), 2, 50.0, 40.0, 'whole', 2),
        TaskSpec('mapping', 'resnet18', (1, 3, 64, 64), 0, 0.0, None, 'ops:5'),
    ],
}


# ---------------------------------------------------------------------------- server
def start_server(store: Path, device: str, policy: str, theta: float | None,
                 extra: list[str] | None = None) -> ServerProcess:
    """Start ``python -m rrto_server`` with one scheduler configuration (log beside the store)."""
    args = ['--sched-policy', policy] + (['--pack-theta', str(theta)] if theta is not None else [])
    server = ServerProcess(store, None, *args, *(extra or []), device=device,
                           log=Path(store).parent / f'server-{policy}.log')
    return server.start(timeout_s=120.0)


def export(spec: TaskSpec):
    """Export one task's network for its input signature (once per benchmark)."""
    import torch
    from rrto_ros.local_model import TorchModule
    from rrto_ros.zoo import ARCHITECTURES
    from rrto_wire import treespec

    flat, in_spec = treespec.flatten(((torch.zeros(spec.shape),), {}))
    return TorchModule(ARCHITECTURES[spec.arch]()).artifact(flat, in_spec)


def prepare(endpoint: str, spec: TaskSpec, artifact) -> str:
    """Upload (once per store) and record one task's network; return the replay id."""
    from rrto_ros.client import RrtoClient

    client = RrtoClient(endpoint, call_timeout_ms=600000)
    try:
        client.hello()
        client.upload(artifact.blobs)
        options = {'precision': spec.precision, 'mode': 'replay', 'segments': spec.segments}
        return client.record(artifact.model, artifact.signature, options)['replay']
    finally:
        client.close()


def server_stats(endpoint: str) -> dict:
    from rrto_ros.client import RrtoClient
    client = RrtoClient(endpoint, call_timeout_ms=10000)
    try:
        return client.stats()
    finally:
        client.close()


# ---------------------------------------------------------------------------- clients
@dataclass
class Release:
    """What happened to one frame of a task."""

    release: float
    outcome: str                    # ok | late | dropped | skipped | error | timeout
    send: float = math.nan
    end: float = math.nan
    server: dict = field(default_factory=dict)


def client_main(spec: dict, endpoint: str, replay: str, duration: float, seed: int, results,
                go, start_at) -> None:
    """
    Run one client of a task; put ``('releases', name, [...])`` on ``results``.

    After warming up it reports ``('ready', name)`` and waits for ``go``; the
    parent then publishes the common start time in ``start_at.value``.  Any
    failure is reported as ``('failed', message)``.
    """
    try:
        _client(spec, endpoint, replay, duration, seed, results, go, start_at)
    except Exception as exc:  # noqa: B902 - report anything to the parent, which raises
        results.put(('failed', f"{spec['name']}: {type(exc).__name__}: {exc}"))


def _client(spec: dict, endpoint: str, replay: str, duration: float, seed: int, results, go,
            start_at) -> None:
    import torch
    from rrto_ros.client import RemoteError, RrtoClient, ServerUnavailable

    task = TaskSpec.from_dict(spec)
    rng = random.Random(seed)
    x = torch.randn(task.shape, generator=torch.Generator().manual_seed(seed))
    timeout_ms = 60000.0 if task.deadline_ms is None else max(2000.0, 20 * task.deadline_ms)
    client = RrtoClient(endpoint, call_timeout_ms=timeout_ms, name=task.name)
    keys = {'priority': task.priority, 'task': task.name, 'late': task.late}
    for _ in range(3):                                   # warm the path, not measured
        client.infer(replay, [x], timeout_ms=120000, **keys)
    results.put(('ready', task.name))
    go.wait()
    start_at = start_at.value
    stop_at = start_at + duration
    releases: list[Release] = []
    period = 1.0 / task.rate_hz if task.rate_hz else 0.0
    phase = rng.uniform(0, period) if period else 0.0
    k = 0
    time.sleep(max(0.0, start_at - time.monotonic()))
    while True:
        now = time.monotonic()
        release = start_at + phase + k * period if period else now
        if release >= stop_at:
            break
        if period and now < release:
            time.sleep(release - now)
        k += 1
        fields = dict(keys)
        if task.deadline_ms is not None:
            budget_ms = task.deadline_ms - (time.monotonic() - release) * 1e3
            if budget_ms <= 0:
                releases.append(Release(release, 'skipped'))
                continue
            fields['deadline_ms'] = budget_ms
        send = time.monotonic()
        try:
            _, reply = client.infer(replay, [x], **fields)
            end = time.monotonic()
            late = task.deadline_ms is not None and (end - release) * 1e3 > task.deadline_ms
            releases.append(Release(release, 'late' if late else 'ok', send, end,
                                    dict(reply.get('timing', {}),
                                         server_ms=reply.get('server_ms', 0.0))))
        except RemoteError as exc:
            outcome = 'dropped' if exc.code == 'deadline_missed' else 'error'
            releases.append(Release(release, outcome, send, time.monotonic(),
                                    {'message': exc.message}))
        except ServerUnavailable:
            releases.append(Release(release, 'timeout', send, time.monotonic()))
            client.wait_available(5.0)
    client.close()
    results.put(('releases', task.name, [asdict(r) for r in releases]))


def run_clients(specs: list[TaskSpec], endpoint: str, replays: dict, duration: float,
                mode: str, seed: int = 0) -> dict[str, list[dict]]:
    """Run every task's clients (processes or threads) for ``duration`` seconds."""
    ctx = multiprocessing.get_context('spawn')
    go, start_at = ctx.Event(), ctx.Value('d', 0.0)
    if mode == 'processes':
        results, worker = ctx.Queue(), ctx.Process
    else:
        results, worker = queue.Queue(), threading.Thread
    workers = [worker(target=client_main,
                      args=(asdict(spec), endpoint, replays[spec.name], duration,
                            seed + 101 * i + c, results, go, start_at))
               for i, spec in enumerate(specs) for c in range(spec.clients)]
    collected: dict[str, list[dict]] = {spec.name: [] for spec in specs}
    for _, name, releases in run_together(workers, results, go, start_at, 'releases',
                                          duration + 600):
        collected[name].extend(releases)
    return collected


def run_together(workers: list, results, go, start_at, done: str, wait_s: float) -> list:
    """
    Start client ``workers`` and release them at one instant; return their final messages.

    Each worker puts ``('ready', ...)`` on ``results`` once set up, waits for ``go`` and
    starts at ``start_at`` (half a second after the last one is ready), then puts one
    message whose kind is ``done``; anything else is a failed client.
    """
    for w in workers:
        w.start()
    try:
        for _ in workers:
            message = results.get(timeout=600)
            if message[0] != 'ready':
                raise RuntimeError(f'client failed: {message[-1]}')
        start_at.value = time.monotonic() + 0.5      # CLOCK_MONOTONIC is system wide on Linux
    finally:
        go.set()
    finals = []
    for _ in workers:
        message = results.get(timeout=wait_s)
        if message[0] != done:
            raise RuntimeError(f'client failed: {message[-1]}')
        finals.append(message)
    for w in workers:
        w.join(30)
    return finals


# ---------------------------------------------------------------------------- report
def summarise_task(spec: TaskSpec, releases: list[dict], duration: float,
                   server_task: dict) -> dict:
    """Return the per-task figures of one run."""
    counts = {o: sum(1 for r in releases if r['outcome'] == o)
              for o in ('ok', 'late', 'dropped', 'skipped', 'error', 'timeout')}
    answered = [r for r in releases if r['outcome'] in ('ok', 'late')]
    latency = [(r['end'] - r['send']) * 1e3 for r in answered]
    response = [(r['end'] - r['release']) * 1e3 for r in answered]
    missed = counts['late'] + counts['dropped'] + counts['skipped']
    periodic = spec.deadline_ms is not None
    return {
        'priority': spec.priority, 'rate_hz': spec.rate_hz, 'deadline_ms': spec.deadline_ms,
        'releases': len(releases), **counts,
        'miss_rate': missed / len(releases) if periodic and releases else None,
        'throughput_hz': len(answered) / duration,
        'latency_ms': {'p50': percentile(latency, 50), 'p99': percentile(latency, 99),
                       'max': max(latency, default=math.nan)},
        'response_ms_p99': percentile(response, 99),
        'preemptions': sum(r['server'].get('preemptions', 0) for r in answered),
        'stages_ms': stages(answered),
        'stages_p90_ms': stages(answered, 90),
        'late_stages_ms': stages([r for r in answered if r['outcome'] == 'late']),
        'server': {k: server_task.get(k) for k in ('preempt_ms', 'queue_ms', 'latency_ms',
                                                   'expired', 'abandoned', 'late')},
        'missed_releases': [r for r in releases if r['outcome'] in ('late', 'dropped')],
    }


def stages(answered: list[dict], q: float = 50) -> dict:
    """
    Return the ``q``-th percentiles (medians) of where answered requests spent their time.

    ``prepare`` (server arrival to the device queue: header checks, waiting
    for a CPU worker, decoding, staging), ``device_wait`` (queued for a lane,
    preemptions before the first step included), ``compute`` (lane steps),
    ``reply`` (after the last step until the reply is handed to ZeroMQ:
    copy-back, waiting for a CPU worker, encoding) and ``wire`` (client send
    to reply less the server's time: both transfers and the client's framing).
    """
    parts: dict[str, list[float]] = {k: [] for k in ('prepare', 'device_wait', 'compute',
                                                     'reply', 'wire')}
    for r in answered:
        timing = r['server']
        if 'server_ms' not in timing or 'queue_ms' not in timing:
            continue
        prepare = timing.get('prepare_ms', 0.0)
        parts['prepare'].append(prepare)
        parts['device_wait'].append(timing['queue_ms'] - prepare)
        parts['compute'].append(timing['compute_ms'])
        parts['reply'].append(timing['server_ms'] - timing['queue_ms'] - timing['compute_ms'])
        parts['wire'].append((r['end'] - r['send']) * 1e3 - timing['server_ms'])
    return {k: percentile(v, q) for k, v in parts.items()}


def run_policy(label: str, specs: list[TaskSpec], artifacts: dict, store: Path, args) -> dict:
    policy, theta = POLICIES[label]
    if theta is None:
        theta = args.theta
    workers = args.cpu_workers or (4 if args.device.startswith('cuda') else 2)
    extra = ['--cpu-workers', str(workers)] + (['--sched-trace', str(args.trace)]
                                               if args.trace else [])
    server = start_server(store, args.device, policy, theta, extra)
    try:
        replays = {spec.name: prepare(server.endpoint, spec, artifacts[spec.name])
                   for spec in specs}
        releases = run_clients(specs, server.endpoint, replays, args.duration, args.clients,
                               args.seed)
        stats = server_stats(server.endpoint)
    finally:
        server.stop()
    tasks = {spec.name: summarise_task(spec, releases[spec.name], args.duration,
                                       stats['tasks'].get(spec.name, {})) for spec in specs}
    scheduler = {k: stats['scheduler'].get(k) for k in (
        'policy', 'theta', 'lanes', 'steps', 'preemptions', 'packed_steps', 'expired',
        'abandoned', 'preempt_ms', 'epoch', 'trace') if k in stats['scheduler']}
    replays_info = {r['label']: {'segments': r['segments'], 'utilisation': r['utilisation'],
                                 'max_segment_ms': max(r['segment_ms'], default=None)}
                    for r in stats['replays']}
    return {'tasks': tasks, 'scheduler': scheduler, 'replays': replays_info,
            'gc': stats.get('gc'), 'gc_pauses': stats.get('gc_pauses'),
            'server_command': ' '.join(server.command)}


def table(results: dict) -> str:
    """Return a markdown table of per-task figures, one row per (policy, task)."""
    rows = ['| policy | task | prio | releases | p50 ms | p99 ms | miss rate | thr Hz | '
            'preempt p50/p99/max ms | p50 prepare/wait/compute/reply/wire ms |',
            '|---' * 10 + '|']
    runs = [('solo', run) for run in results.get('solo', {}).values()]
    for label, run in runs + list(results['runs'].items()):
        for name, t in run['tasks'].items():
            pre = t['server'].get('preempt_ms') or {}
            pre_txt = (f"{pre['p50']:.3f}/{pre['p99']:.3f}/{pre['max']:.3f} (n={pre['n']})"
                       if pre.get('n') else '-')
            miss = '-' if t['miss_rate'] is None else f"{100 * t['miss_rate']:.1f}%"
            rows.append(f"| {label} | {name} | {t['priority']} | {t['releases']} | "
                        f"{_ms(t['latency_ms']['p50'])} | {_ms(t['latency_ms']['p99'])} | "
                        f"{miss} | {t['throughput_hz']:.1f} | {pre_txt} | "
                        f"{'/'.join(_ms(v) for v in t.get('stages_ms', {}).values())} |")
    return '\n'.join(rows)


def place_missed(run: dict, task: str) -> list[dict]:
    """
    Place each of ``task``'s missed releases in one policy's ``run`` on the server's trace.

    Needs a run made with ``--trace``.  An answered release's request is the job of
    that task whose steps lie between its send and its reply and add up to its
    ``compute_ms``; its receipt is that job's first step less its ``queue_ms``.  Per
    release: ``inbound_ms`` (send to receipt), ``server_ms``, ``outbound_ms`` (the
    reply's way back), ``lanes_busy_ms`` and ``lanes`` (steps of any task between
    send and receipt) and ``gc_ms`` (the server's garbage collections then, from its
    ``gc_pauses``: each stops every thread).  A dropped release (no timing), or one whose
    job the trace no longer holds, has its outcome and wall time only.
    """
    scheduler = run['scheduler']
    epoch, trace = scheduler.get('epoch'), scheduler.get('trace') or []
    if epoch is None:
        return []
    steps = [(epoch + e['start_ms'] / 1e3, epoch + e['end_ms'] / 1e3, e['task'], e['job'])
             for e in trace]
    placed = []
    for release in run['tasks'][task].get('missed_releases', []):
        send, end, timing = release['send'], release['end'], release['server']
        row = {'outcome': release['outcome'], 'wall_ms': (end - send) * 1e3}
        jobs: dict[int, list[tuple]] = {}
        for step in steps:
            if step[2] == task and send <= step[0] and step[1] <= end:
                jobs.setdefault(step[3], []).append(step)
        if 'compute_ms' in timing and jobs:
            job = min(jobs.values(), key=lambda js: abs(
                sum(b - a for a, b, _, _ in js) * 1e3 - timing['compute_ms']))
            receipt = min(a for a, _, _, _ in job) - timing['queue_ms'] / 1e3
            before = [(max(a, send), min(b, receipt), name) for a, b, name, _ in steps
                      if b > send and a < receipt]
            collected = [(p['start'], p['start'] + p['ms'] / 1e3)
                         for p in run.get('gc_pauses') or []]
            row.update(inbound_ms=(receipt - send) * 1e3, server_ms=timing['server_ms'],
                       queue_ms=timing['queue_ms'], compute_ms=timing['compute_ms'],
                       outbound_ms=(end - receipt) * 1e3 - timing['server_ms'],
                       lanes_busy_ms=sum(b - a for a, b, _ in before) * 1e3,
                       lanes=sorted({name for _, _, name in before}),
                       gc_ms=sum(max(0.0, min(b, receipt) - max(a, send))
                                 for a, b in collected) * 1e3)
        placed.append(row)
    return placed


def explain(results: dict) -> str:
    """Return one line per missed release of every run (see :func:`place_missed`)."""
    lines = []
    for label, run in results['runs'].items():
        for name in run['tasks']:
            for row in place_missed(run, name):
                parts = [f'{k} {v:.2f}' if isinstance(v, float) else f'{k} {v}'
                         for k, v in row.items()]
                lines.append(f'{label} {name}: ' + ', '.join(parts))
    return '\n'.join(lines)


def _ms(value) -> str:
    return '-' if value is None else f'{value:.2f}'


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog='bench.sched_mix', description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--preset', choices=sorted(PRESETS), default='cpu')
    parser.add_argument('--tasks', help='JSON file: a list of TaskSpec objects (replaces the '
                                        'preset)')
    parser.add_argument('--device', default='cpu', help="server device: 'cpu' or 'cuda'")
    parser.add_argument('--duration', type=float, default=20.0, help='seconds per policy')
    parser.add_argument('--policies', nargs='+', default=['fifo', 'priority', 'preemptive'],
                        choices=sorted(POLICIES))
    parser.add_argument('--theta', type=float, default=1.0,
                        help='packing threshold of the preemptive+pack run')
    parser.add_argument('--clients', choices=('processes', 'threads'), default='processes')
    parser.add_argument('--cpu-workers', type=int,
                        help='server CPU workers (default: 4 on CUDA, 2 on CPU)')
    parser.add_argument('--solo', action='store_true',
                        help='first run each periodic task alone (fifo) for its uncontended '
                             'latency and miss rate (rows labelled solo)')
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--trace', type=int, default=0,
                        help="keep the server's last N device steps (--sched-trace) in the "
                             'results, with its clock epoch: beside each task\'s '
                             'missed_releases (their send and reply times on the same '
                             'monotonic clock) they say what the lanes ran meanwhile; at most '
                             f'{MAX_TRACE} (the stats reply is one header)')
    parser.add_argument('--store', help='model store to reuse (default: a temporary one)')
    parser.add_argument('--out', help='write the results as JSON here')
    parser.add_argument('--explain', metavar='RESULTS',
                        help='print where each missed release of a --trace run spent its '
                             'time (results JSON of an earlier run) and exit')
    args = parser.parse_args(argv)
    if not 0 <= args.trace <= MAX_TRACE:
        parser.error(f'--trace takes 0 to {MAX_TRACE} steps')
    return args


def main(argv: list[str] | None = None) -> dict:
    """Run the benchmark; print a table and return (and optionally save) the results."""
    args = parse_args(argv)
    if args.explain:
        results = json.loads(Path(args.explain).read_text())
        print(explain(results))
        return results
    specs = PRESETS[args.preset]
    if args.tasks:
        specs = [TaskSpec.from_dict(d) for d in json.loads(Path(args.tasks).read_text())]
    with tempfile.TemporaryDirectory(prefix='rrto-sched-') as tmp:
        store = Path(args.store) if args.store else Path(tmp) / 'store'
        store.mkdir(parents=True, exist_ok=True)
        results = {'meta': {
            'command': ' '.join(['python -m bench.sched_mix'] + (argv or sys.argv[1:])),
            'date': time.strftime('%Y-%m-%d %H:%M:%S %Z'), 'host': platform.node(),
            'cpus': os.cpu_count(), 'device': args.device, 'duration_s': args.duration,
            'clients': args.clients, 'tasks': [asdict(s) for s in specs]},
            'runs': {}}
        results['meta']['gpu'] = _gpu_name(args.device)
        artifacts = {spec.name: export(spec) for spec in specs}
        if args.solo:
            results['solo'] = {}
            for spec in specs:
                if spec.rate_hz > 0:
                    results['solo'][spec.name] = run_policy('fifo', [spec], artifacts, store,
                                                            args)
                    _save(results, args.out)
        for label in args.policies:
            results['runs'][label] = run_policy(label, specs, artifacts, store, args)
            _save(results, args.out)
    results = _clean(results)
    print(table(results))
    return results


def _save(results: dict, out: str | None) -> None:
    """Write what was measured so far (a run cut short keeps its finished policies)."""
    if out:
        Path(out).write_text(json.dumps(_clean(results), indent=1))


def _gpu_name(device: str) -> str | None:
    if not device.startswith('cuda'):
        return None
    import torch
    return torch.cuda.get_device_name(torch.device(device)) if torch.cuda.is_available() else None


def _clean(value):
    """Return ``value`` with NaN replaced by None (strict JSON)."""
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if isinstance(value, float) and math.isnan(value):
        return None
    return value


if __name__ == '__main__':
    main()
