"""
Fleet mode under load: simulated robots on Ray replicas, a stalled replica, a killed one.

Starts a local Ray cluster with fake GPUs and ``--replicas`` replicas
(:func:`rrto_fleet.ray_fleet.start_fleet`, CPU servers), then:

1. **overhead**: one robot process alternates calls through the directory and
   straight to the same replica (the single-server path); medians compared;
2. **load**: ``--robots`` robots (threads in ``--procs`` processes), the first
   ``--duplicates`` sending each inference to two replicas, call at ``--rate``
   Hz each for ``--duration`` s; at ``--stall-at`` one replica is stopped
   (SIGSTOP) for ``--stall-s``, at ``--kill-at`` the other is killed (SIGKILL;
   Ray restarts it).  Every call must end offloaded or locally (a call that
   raises or never returns is *lost*).  Reported per phase: calls, fallbacks,
   P50/P99 of single and duplicated calls; and how long until the directory
   lists the killed replica again and until the robots' last fallback.

Usage: ``python -m bench.fleet --replicas 2 --out docs/results/fleet_2.json``
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time

import torch

from bench.machine import write_results
from bench.measure import percentile


def tiny_net() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(),
                               torch.nn.Linear(128, 10))


# ---------------------------------------------------------------------- robot processes
def overhead(directory: str, calls: int) -> dict:
    """Alternate calls through the directory and straight to the holder; return both."""
    from rrto_ros import offload
    model, x = tiny_net(), torch.randn(1, 64)
    via = offload(model, timeout_ms=1000, directory=directory)
    assert via.warmup(x, timeout_s=120)
    holder = via.data.resolver.endpoints('')[0]
    direct = offload(model, server=holder, timeout_ms=1000)
    assert direct.warmup(x, timeout_s=120)
    times: dict[str, list[float]] = {'directory': [], 'direct': []}
    for i in range(2 * calls):
        name, om = (('direct', direct), ('directory', via))[i % 2]
        start = time.perf_counter()
        om(x)
        times[name].append((time.perf_counter() - start) * 1e3)
    via.close()
    direct.close()
    return {name: {'median_ms': statistics.median(v[20:]), 'p99_ms': percentile(v[20:], 99)}
            for name, v in times.items()}


def robots(directory: str, count: int, duplicates: int, rate: float,
           duration: float) -> list[dict]:
    """Warm ``count`` robot models (the first ``duplicates`` duplicating), then run them."""
    from rrto_ros import offload
    model, x = tiny_net(), torch.randn(1, 64)
    models = [offload(model, timeout_ms=200, connect_timeout_ms=200, directory=directory,
                      duplicate=i < duplicates, task=f'robot{i}') for i in range(count)]
    for om in models:
        assert om.warmup(x, timeout_s=300)
    print('ready', flush=True)
    start_at = float(sys.stdin.readline())     # the driver's start, once every robot is ready
    logs: list[list] = [[] for _ in models]

    def run(i: int) -> None:
        om, period = models[i], 1.0 / rate
        next_call = start_at + i * period / count
        while next_call < start_at + duration:
            now = time.time()
            if next_call < now - period:
                next_call = now     # fell behind (a slow call): no catch-up burst
            time.sleep(max(0.0, next_call - now))
            try:
                om(x)
                logs[i].append([time.time() - start_at, om.last.result.value, om.last.total_ms])
            except Exception as exc:  # noqa: B902 - a lost call is what we count
                logs[i].append([time.time() - start_at, f'lost: {exc}', 0.0])
            next_call += period

    threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=start_at + duration - time.time() + 30)
    hung = sum(t.is_alive() for t in threads)
    return [{'duplicate': i < duplicates, 'calls': log, 'hung': hung if i == 0 else 0}
            for i, log in enumerate(logs)]


# ---------------------------------------------------------------------- driver
def _child(args: list[str]) -> subprocess.Popen:
    from rrto_server.process import child_env
    return subprocess.Popen([sys.executable, '-m', 'bench.fleet', *args], env=child_env(),
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)


def _holders(fleet, names: dict) -> list[tuple[str, dict]]:
    """Return (name, info) of the replicas holding the robots' model, as the directory says."""
    import ray
    (model,) = ray.get(fleet.directory.snapshot.remote(), timeout=30)['models'].values()
    return [names[endpoint] for endpoint in model['holders']]


def _window(calls: list, start: float, end: float) -> dict:
    inside = [c for c in calls if start <= c[0] < end]
    ms = [c[2] for c in inside]
    return {'calls': len(inside),
            'fallbacks': sum(c[1] == 'local_fallback' for c in inside),
            'lost': sum(c[1].startswith('lost') for c in inside),
            'p50_ms': round(statistics.median(ms), 3) if ms else None,
            'p99_ms': round(percentile(ms, 99), 3) if ms else None,
            'p999_ms': round(percentile(ms, 99.9), 3) if ms else None,
            'max_ms': round(max(ms), 3) if ms else None}


def _phases(logs: list[dict], args) -> list[dict]:
    phases = {'steady': (2.0, args.stall_at),
              'stall': (args.stall_at, args.stall_at + args.stall_s + 1.0),
              'kill': (args.kill_at, args.duration)}
    rows = []
    for phase, (start, end) in phases.items():
        for kind in ('single', 'duplicate'):
            calls = [c for log in logs if log['duplicate'] == (kind == 'duplicate')
                     for c in log['calls']]
            rows.append(dict(phase=phase, robots=kind, window_s=[start, end],
                             **_window(calls, start, end)))
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--replicas', type=int, default=2)
    parser.add_argument('--robots', type=int, default=32)
    parser.add_argument('--procs', type=int, default=4, help='robot processes')
    parser.add_argument('--duplicates', type=int, default=8)
    parser.add_argument('--rate', type=float, default=10.0, help='calls/s per robot')
    parser.add_argument('--duration', type=float, default=40.0)
    parser.add_argument('--stall-at', type=float, default=10.0)
    parser.add_argument('--stall-s', type=float, default=5.0)
    parser.add_argument('--kill-at', type=float, default=22.0)
    parser.add_argument('--overhead-calls', type=int, default=500)
    parser.add_argument('--out', default=None)
    parser.add_argument('--child', nargs='+', help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        kind, directory, *rest = args.child
        result = (overhead(directory, int(rest[0])) if kind == 'overhead' else
                  robots(directory, int(rest[0]), int(rest[1]), float(rest[2]), float(rest[3])))
        print(json.dumps(result))
        return 0
    return drive(args, argv)


def drive(args, argv) -> int:
    """Start the fleet, run the overhead and load phases, write the results."""
    import ray
    from rrto_fleet.ray_fleet import runtime_env, start_fleet
    from rrto_server.server import ServerConfig
    os.environ.setdefault('RAY_AUTH_MODE', 'disabled')
    ray.init(num_cpus=2, num_gpus=args.replicas, include_dashboard=False,
             runtime_env=runtime_env(), log_to_driver=False)
    config = ServerConfig(bind='tcp://127.0.0.1:0', store=tempfile.mkdtemp(prefix='rrto-fleet-'),
                          device='cpu', cpu_workers=1, threads=1)
    fleet = start_fleet(config, args.replicas, 'tcp://127.0.0.1:*', poll_s=0.3)
    infos = ray.get([h.info.remote() for h in fleet.replicas], timeout=60)
    rows = []
    child = _child(['--child', 'overhead', fleet.endpoint, str(args.overhead_calls)])
    rows.append(dict(phase='overhead',
                     **json.loads(child.communicate(timeout=300)[0].strip().splitlines()[-1])))
    print(json.dumps(rows[-1]), flush=True)

    per_proc = [args.robots // args.procs + (i < args.robots % args.procs)
                for i in range(args.procs)]
    dup_per = [args.duplicates // args.procs + (i < args.duplicates % args.procs)
               for i in range(args.procs)]
    procs = [_child(['--child', 'robots', fleet.endpoint, str(n), str(d), str(args.rate),
                     str(args.duration)]) for n, d in zip(per_proc, dup_per)]
    for proc in procs:
        assert proc.stdout.readline().strip() == 'ready', 'a robot process failed to warm up'
    start_at = time.time() + 1.0
    for proc in procs:
        proc.stdin.write(f'{start_at}\n')
        proc.stdin.flush()
    names = {info['endpoint']: (f'rrto-replica-{i}', info) for i, info in enumerate(infos)}
    time.sleep(max(0.0, start_at + args.stall_at - time.time()))
    stalled = _holders(fleet, names)[1]   # duplicates keep the model on two replicas at least
    os.kill(stalled[1]['pid'], signal.SIGSTOP)
    time.sleep(args.stall_s)
    os.kill(stalled[1]['pid'], signal.SIGCONT)
    time.sleep(max(0.0, start_at + args.kill_at - time.time()))
    victim = _holders(fleet, names)[0]
    os.kill(victim[1]['pid'], signal.SIGKILL)
    killed = time.time()
    back_s = None
    while time.time() < killed + 90 and back_s is None:
        snap = ray.get(fleet.directory.snapshot.remote(), timeout=30)['replicas'][victim[0]]
        if snap['alive'] and snap['instance'] != victim[1]['instance']:
            back_s = time.time() - killed
        time.sleep(0.1)
    logs = [log for p in procs for log in json.loads(p.communicate(timeout=300)[0]
                                                     .strip().splitlines()[-1])]
    rows.extend(_phases(logs, args))
    after_kill = [c[0] for log in logs for c in log['calls']
                  if c[0] >= args.kill_at and c[1] == 'local_fallback']
    rows.append({'phase': 'recovery', 'replica_listed_again_s': back_s,
                 'last_fallback_after_kill_s': (max(after_kill) - args.kill_at
                                                if after_kill else 0.0),
                 'hung_robots': sum(log['hung'] for log in logs),
                 'lost': sum(c[1].startswith('lost') for log in logs for c in log['calls']),
                 'calls': sum(len(log['calls']) for log in logs)})
    for row in rows[1:]:
        print(json.dumps(row), flush=True)
    fleet.stop()
    ray.shutdown()
    if args.out:
        write_results(args.out, 'python -m bench.fleet', argv, rows)
    return 0


if __name__ == '__main__':
    sys.exit(main())
