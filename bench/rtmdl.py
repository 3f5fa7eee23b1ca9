r"""
RT-mDL end to end on the real server: variants, profiles, proxy, search, measured runs.

1. Train the zoo architectures on scikit-learn's digits and make each one's
   ladder of variants (:mod:`rrto_ros.variant_train`); accuracy on one
   held-out split.
2. Profile every (task, variant, granularity) on ``python -m rrto_server``:
   segment times and utilisation from the recording, decode/transfer and
   jitter from solo calls; storage before and after layer sharing, from the
   store's own blobs.
3. Write the task set (periods set from the measured device times so that
   the largest variants overload the device, see :func:`design`).
4. Measure a few random strategies (calibration runs), train the proxy on
   the simulator and calibrate it, and search (NSGA-II).
5. Measure (a) largest variants, rate-monotonic; (b) smallest variants;
   (c) today's ``rtplan``; (d) the search; each against a fresh server, with
   periodic clients (one process per task: pre-processing, the call,
   post-processing, as bench/sched_mix.py's clients plus the robot's CPU
   work).  The proxy's error is taken on these held-out runs.

    python -m bench.rtmdl --device cuda --duration 30 --out /tmp/rtmdl
    python -m bench.rtmdl --tiny --out /tmp/rtmdl          # CPU smoke run (minutes here)
    python -m bench.rtmdl --offline DIR --out /tmp/replan    # re-plan DIR's measured files

On the GPU host, pymoo and its dependencies must be importable: carry wheels of
pymoo, autograd, cma, alive-progress, about-time, graphemeu, Deprecated, wrapt,
moocore, cffi, pycparser and platformdirs.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import platform
import random
import statistics
import sys
import time
from pathlib import Path

import torch

from bench.sched_mix import start_server
from rrto_server import rtproxy, rtsearch, rttasks
from rrto_server.rtsim import simulate

# name, architecture, batch, miss bound, weight, pre ms, post ms, device share (0: fast)
TASKS = [('detect', 'keypoint_net', 1, 0.01, 1.0, 1.0, 0.5, 0.0),
         ('track', 'mobilenet', 1, 0.02, 1.0, 1.0, 0.5, 0.0),
         ('classify', 'resnet18', 16, 0.05, 1.0, 1.0, 0.5, 0.45),
         ('scene', 'resnet18', 32, 0.10, 1.0, 1.0, 0.5, 0.55)]
TINY_TASKS = [('detect', 'keypoint_net', 1, 0.05, 1.0, 0.5, 0.2, 0.0),
              ('scene', 'resnet18', 2, 0.5, 1.0, 0.5, 0.2, 0.5)]
# the large tasks' network runs at 4x the frame size (a first upsampling layer): device work
# rather than transfer dominates their calls
ZOOM = {'resnet18': 4, 'mobilenet': 1, 'keypoint_net': 1}
GRANULARITIES = ('whole', 'block:3')


def _client(task: dict, endpoint: str, replay: str, duration: float, seed: int, results,
            go, start_at) -> None:
    """One task's robot: pre-process (busy CPU), call with the remaining budget, post-process."""
    try:
        from rrto_ros.client import RemoteError, RrtoClient, ServerUnavailable
        x = torch.randn(task['shape'], generator=torch.Generator().manual_seed(seed))
        client = RrtoClient(endpoint, call_timeout_ms=max(2000.0, 20 * task['deadline_ms']),
                            name=task['name'])
        keys = {'priority': task['priority'], 'task': task['name'], 'late': 'drop'}
        for _ in range(3):
            client.infer(replay, [x], timeout_ms=120000, **keys)
        results.put(('ready', task['name']))
        go.wait()
        start, period = start_at.value, task['period_ms'] / 1e3
        phase = random.Random(seed).uniform(0, period)
        outcomes, k = [], 0
        while start + phase + k * period < start + duration:
            release = start + phase + k * period
            k += 1
            time.sleep(max(0.0, release - time.monotonic()))
            if (time.monotonic() - release) * 1e3 >= task['deadline_ms']:
                outcomes.append(('skipped', math.nan))
                continue
            _busy(task['pre_ms'])
            budget = task['deadline_ms'] - task['post_ms'] - (time.monotonic() - release) * 1e3
            if budget <= 0:
                outcomes.append(('late', math.nan))
                continue
            try:
                client.infer(replay, [x], deadline_ms=budget, **keys)
                _busy(task['post_ms'])
                response = (time.monotonic() - release) * 1e3
                outcomes.append(('ok' if response <= task['deadline_ms'] else 'late', response))
            except RemoteError as exc:
                outcomes.append(('dropped' if exc.code == 'deadline_missed' else 'error',
                                 math.nan))
            except ServerUnavailable:
                outcomes.append(('timeout', math.nan))
                client.wait_available(5.0)
        client.close()
        results.put(('done', task['name'], outcomes))
    except Exception as exc:  # noqa: B902 - report anything to the parent, which raises
        results.put(('failed', f"{task['name']}: {type(exc).__name__}: {exc}"))


def _busy(ms: float) -> None:
    end = time.perf_counter() + ms / 1e3
    while time.perf_counter() < end:
        pass


def _clients(tasks: list[dict], endpoint: str, replays: dict, duration: float, seed: int
             ) -> dict[str, list]:
    ctx = multiprocessing.get_context('spawn')
    results, go, start_at = ctx.Queue(), ctx.Event(), ctx.Value('d', 0.0)
    procs = [ctx.Process(target=_client, args=(t, endpoint, replays[t['name']], duration,
                                               seed + i, results, go, start_at))
             for i, t in enumerate(tasks)]
    for p in procs:
        p.start()
    try:
        for _ in procs:
            message = results.get(timeout=600)
            if message[0] != 'ready':
                raise RuntimeError(f'client failed: {message[-1]}')
        start_at.value = time.monotonic() + 0.5
    finally:
        go.set()
    out = {}
    for _ in procs:
        message = results.get(timeout=duration + 300)
        if message[0] != 'done':
            raise RuntimeError(f'client failed: {message[-1]}')
        out[message[1]] = message[2]
    for p in procs:
        p.join(30)
    return out


# ---------------------------------------------------------------------------- profiling
class Lab:
    """Variant files, the store, artifacts per (task, variant), and the device."""

    def __init__(self, out: Path, device: str, tasks: list, size: int):
        self.out, self.device, self.tasks, self.size = out, device, tasks, size
        self.store = out / 'store'
        self.store.mkdir(parents=True, exist_ok=True)
        self.artifacts: dict = {}

    def shape(self, task) -> tuple:
        return (task[2], 3, self.size, self.size)

    def artifact(self, task, variant_file: str):
        from rrto_ros import variant_files
        from rrto_wire import treespec
        key = (task[0], variant_file)
        if key not in self.artifacts:
            flat, in_spec = treespec.flatten(((torch.zeros(self.shape(task)),), {}))
            self.artifacts[key] = variant_files.load_module(variant_file).artifact(flat, in_spec)
        return self.artifacts[key]

    def server(self, theta: float, profile: bool = False):
        extra = ['--cpu-workers', '4'] + (['--profile-util', 'on'] if profile else [])
        return start_server(self.store, self.device, 'preemptive', theta, extra)

    def record(self, endpoint: str, task, variant_file: str, granularity: str) -> dict:
        from rrto_ros.client import RrtoClient
        art = self.artifact(task, variant_file)
        client = RrtoClient(endpoint, call_timeout_ms=600000)
        try:
            client.hello()
            client.upload(art.blobs)
            return client.record(art.model, art.signature,
                                 {'precision': 'fp32', 'mode': 'replay', 'segments': granularity})
        finally:
            client.close()


def profile(lab: Lab, ladders: dict, calls: int) -> dict:
    """Return ``{task: {variant: {granularity: profile dict}}}`` measured on the server."""
    from rrto_ros.client import RrtoClient
    server = lab.server(1.0, profile=True)
    out: dict = {}
    try:
        for task in lab.tasks:
            x = torch.randn(lab.shape(task))
            for row in ladders[task[1]]:
                for g in GRANULARITIES:
                    info = lab.record(server.endpoint, task, row['file'], g)
                    client = RrtoClient(server.endpoint, call_timeout_ms=60000)
                    e2e, queue, compute = [], [], []
                    for i in range(calls + 3):
                        t0 = time.perf_counter()
                        _, reply = client.infer(info['replay'], [x], task=task[0])
                        if i >= 3:
                            e2e.append((time.perf_counter() - t0) * 1e3)
                            queue.append(reply['timing']['queue_ms'])
                            compute.append(reply['timing']['compute_ms'])
                    client.close()
                    p50 = statistics.median(compute)
                    p99 = sorted(compute)[int(0.99 * (len(compute) - 1))]
                    scale = p50 / max(1e-6, sum(info['segment_ms']))
                    out.setdefault(task[0], {}).setdefault(row['name'], {})[g] = {
                        'segment_ms': [s * scale for s in info['segment_ms']],
                        'utilisation': min(1.0, max(0.0, info['utilisation'] or 1.0)),
                        'decode_ms': statistics.median(queue),
                        'overhead_ms': max(0.0, statistics.median(e2e) - statistics.median(queue)
                                           - p50),
                        'jitter': min(1.0, math.log(max(p99, p50) / max(p50, 1e-6)) / 2.326)}
    finally:
        server.stop()
    return out


def storage(lab: Lab, ladders: dict) -> dict:
    """Return weight bytes of every (task, variant) as separate blobs and as stored shards."""
    from rrto_ros import variant_files
    files = {row['file'] for task in lab.tasks for row in ladders[task[1]]}
    for task in lab.tasks:
        for row in ladders[task[1]]:
            lab.artifact(task, row['file'])
    counted = variant_files.storage_bytes(variant_files.load(f)[1] for f in sorted(files))
    stored = sum(len(blob) for (_, _), art in lab.artifacts.items()
                 for digest, (kind, blob) in art.blobs.items() if kind == 'weights')
    on_disk = {}
    for (_, _), art in lab.artifacts.items():
        for digest, (kind, blob) in art.blobs.items():
            if kind == 'weights' and (lab.store / 'blobs' / digest).is_file():
                on_disk[digest] = (lab.store / 'blobs' / digest).stat().st_size
    return {'variants': len(files), 'separate_bytes': counted['separate'],
            'shared_bytes': counted['shared'], 'uploaded_shard_bytes_with_repeats': stored,
            'store_weight_bytes': sum(on_disk.values())}


GUARD = 1.25       # a large task's period is at least this many solo chains (one client each)


def _period(big: dict, pre: float, post: float, share: float) -> float:
    gpu = sum(big['segment_ms'])
    chain = pre + post + big['decode_ms'] + big['overhead_ms'] + gpu
    return round(max(8.0, 2 * chain) if not share else max(gpu / share, GUARD * chain), 1)


def design(lab: Lab, ladders: dict, profiles: dict, tiny: bool) -> dict:
    """
    Return the task-set document: measured variants, and periods from the device times.

    Fast tasks: period and deadline twice the full network's solo chain (at least 8 ms).
    Large tasks: period = deadline = the largest variant's device time / its share
    (0.45 and 0.55: the two large tasks alone load the device to 100 % with their
    largest variants), but at least :data:`GUARD` x that variant's solo chain.
    """
    tasks = []
    for name, arch, batch, bound, weight, pre, post, share in lab.tasks:
        task = (name, arch, batch, bound, weight, pre, post, share)
        variants = []
        for row in ladders[arch]:
            art = lab.artifact(task, row['file'])
            shards = {d: len(b) for d, (k, b) in art.blobs.items() if k == 'weights'}
            variants.append({'name': row['name'], 'accuracy': row['accuracy'],
                             'file': row['file'], 'shards': shards,
                             'profiles': profiles[name][row['name']]})
        period = _period(variants[0]['profiles']['block:3'], pre, post, share)  # full network
        tasks.append({'name': name, 'period_ms': period, 'deadline_ms': period,
                      'miss_bound': bound, 'weight': weight, 'pre_ms': pre, 'post_ms': post,
                      'variants': variants, 'arch': arch, 'batch': batch})
    return {'storage_mb': 1000.0, 'cpu_workers': 4, 'thetas': [0.0, 0.5, 0.8, 1.0],
            'pack_slowdown': 0.5, 'tasks': tasks}


def run_config(lab: Lab, ts, choices: dict, theta: float, duration: float, seed: int) -> dict:
    """Measure one strategy against a fresh server; return per-task and overall figures."""
    by_name = {t[0]: t for t in lab.tasks}
    server = lab.server(theta)
    try:
        replays = {t.name: lab.record(server.endpoint, by_name[t.name],
                                      choices[t.name].variant.file,
                                      choices[t.name].granularity)['replay'] for t in ts.tasks}
        specs = [{'name': t.name, 'shape': lab.shape(by_name[t.name]),
                  'priority': choices[t.name].priority, 'period_ms': t.period_ms,
                  'deadline_ms': t.deadline_ms, 'pre_ms': t.pre_ms, 'post_ms': t.post_ms}
                 for t in ts.tasks]
        outcomes = _clients(specs, server.endpoint, replays, duration, seed)
    finally:
        server.stop()
    tasks = {}
    for t in ts.tasks:
        got = outcomes[t.name]
        missed = sum(1 for o, _ in got if o != 'ok')
        response = sorted(r for o, r in got if o == 'ok' or (o == 'late' and r == r))
        tasks[t.name] = {
            'variant': choices[t.name].variant.name, 'priority': choices[t.name].priority,
            'segments': choices[t.name].granularity, 'releases': len(got), 'misses': missed,
            'miss_rate': missed / len(got) if got else None, 'bound': t.miss_bound,
            'outcomes': {o: sum(1 for g, _ in got if g == o) for o in {g for g, _ in got}},
            'response_ms_p50': response[len(response) // 2] if response else None,
            'response_ms_p99': response[int(0.99 * (len(response) - 1))] if response else None}
    releases = sum(v['releases'] for v in tasks.values())
    return {'theta': theta, 'tasks': tasks,
            'miss_rate': sum(v['misses'] for v in tasks.values()) / max(1, releases),
            'meets_bounds': all(v['miss_rate'] is not None and v['miss_rate'] <= v['bound']
                                for v in tasks.values()),
            'accuracy': rtsearch.weighted_accuracy(ts, choices),
            'storage_mb': rtsearch.storage_mb(ts, choices),
            'strategy': rtsearch.to_strategy(ts, choices, theta).to_json()}


def _miss(run: dict) -> dict:
    return {k: v['miss_rate'] for k, v in run['tasks'].items() if v['miss_rate'] is not None}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog='bench.rtmdl', description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--device', default='cpu')
    parser.add_argument('--out', required=True, help='directory for variants, store, results')
    parser.add_argument('--tiny', action='store_true', help='CPU smoke run (the tests)')
    parser.add_argument('--size', type=int, default=64, help='digits upsampled to this size')
    parser.add_argument('--steps', type=int, default=400, help='training minibatches')
    parser.add_argument('--finetune-steps', type=int, default=150)
    parser.add_argument('--calls', type=int, default=30, help='solo calls per profile')
    parser.add_argument('--calibration', type=int, default=3, help='measured random strategies')
    parser.add_argument('--calibration-s', type=float, default=6.0)
    parser.add_argument('--duration', type=float, default=30.0, help='seconds per configuration')
    parser.add_argument('--samples', type=int, default=400, help='simulated proxy samples')
    parser.add_argument('--horizon-ms', type=float, default=4000.0)
    parser.add_argument('--pop', type=int, default=40)
    parser.add_argument('--generations', type=int, default=40)
    parser.add_argument('--jobs', type=int, default=1, help='processes simulating samples')
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--offline', metavar='DIR',
                        help="re-plan and simulate from DIR's measured tasks.json and "
                             'calibration.json (no server)')
    parser.add_argument('--reuse', action='store_true',
                        help='take ladders.json and tasks.json (and the variants) from --out')
    args = parser.parse_args(argv)
    if args.tiny:
        args.size, args.steps, args.finetune_steps, args.calls = 16, 3, 2, 3
        args.calibration, args.calibration_s, args.duration = 1, 1.0, 1.5
        args.samples, args.horizon_ms, args.pop, args.generations = 16, 1000.0, 8, 3
    return args


def main(argv=None) -> dict:
    """Run every step; write results.json, tasks.json and strategy.json under --out."""
    from rrto_ros import variant_train
    args = parse_args(argv)
    if args.offline:
        return offline(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tasks = TINY_TASKS if args.tiny else TASKS
    lab = Lab(out, args.device, tasks, args.size)
    meta = {'command': ' '.join(['python -m bench.rtmdl'] + (argv or sys.argv[1:])),
            'date': time.strftime('%Y-%m-%d %H:%M:%S %Z'), 'host': platform.node(),
            'gpu': torch.cuda.get_device_name() if args.device.startswith('cuda') else None}
    t0 = time.perf_counter()
    if args.reuse:
        ladders = json.loads((out / 'ladders.json').read_text())
        doc = json.loads((out / 'tasks.json').read_text())
    else:
        ladders = {arch: variant_train.train_ladder(arch, args.size, out / 'variants',
                                                    args.steps, args.finetune_steps,
                                                    device=args.device, seed=args.seed,
                                                    zoom=1 if args.tiny else ZOOM[arch])
                   for arch in sorted({t[1] for t in tasks})}
        (out / 'ladders.json').write_text(json.dumps(ladders, indent=1))
        profiles = profile(lab, ladders, args.calls)
        doc = design(lab, ladders, profiles, args.tiny)
        (out / 'tasks.json').write_text(json.dumps(doc, indent=1))
    train_s = time.perf_counter() - t0
    ts = rttasks.parse(doc)
    rng = random.Random(args.seed)
    calibration = []
    for i in range(args.calibration):
        choices, theta = rtproxy.random_choices(ts, rng)
        run = run_config(lab, ts, choices, theta, args.calibration_s, args.seed + 10 * i)
        calibration.append((choices, theta, _miss(run)))
        (out / 'calibration.json').write_text(json.dumps(
            [{'strategy': rtsearch.to_strategy(ts, c, th).to_json(), 'miss': m}
             for c, th, m in calibration], indent=1))
    t0 = time.perf_counter()
    proxy = rtproxy.Proxy(seed=args.seed)
    proxy.simulate_samples(ts, args.samples, args.horizon_ms, args.seed, jobs=args.jobs)
    sim_only = rtproxy.Proxy(seed=args.seed)
    sim_only.x, sim_only.y, sim_only.w = list(proxy.x), list(proxy.y), list(proxy.w)
    sim_only.fit()
    proxy.calibrate(ts, calibration)
    proxy_s = time.perf_counter() - t0
    found = rtsearch.search(ts, proxy, args.pop, args.generations, args.seed)
    strategy = rtsearch.to_strategy(ts, found['choices'], found['theta'])
    strategy.save(out / 'strategy.json')
    configs = {      # the comparison that matters first, should the run be cut short
        'a_largest_rm': rtsearch.rate_monotonic(ts, rtsearch.largest, 'block:3', 1.0),
        'd_search': (found['choices'], found['theta']),
        'c_rtplan': rtsearch.with_rtplan(ts, 'block:3', 1.0),
        'b_smallest_rm': rtsearch.rate_monotonic(ts, rtsearch.smallest, 'block:3', 1.0)}
    runs = {}
    for i, (label, (choices, theta)) in enumerate(configs.items()):
        runs[label] = run_config(lab, ts, choices, theta, args.duration, args.seed + 100 + i)
        runs[label]['predicted'] = proxy.predict(ts, choices, theta)
        runs[label]['simulated'] = {k: v['miss_rate'] for k, v in
                                    simulate(ts, choices, theta, 20000.0, args.seed).items()}
        (out / 'runs.json').write_text(json.dumps(runs, indent=1, default=str))
    held_out = [(configs[k][0], configs[k][1], _miss(r)) for k, r in runs.items()]
    a = runs['a_largest_rm']
    results = {
        'meta': meta, 'train_and_profile_s': train_s, 'ladders': ladders,
        'storage': storage(lab, ladders),
        'tasks': {t.name: {'period_ms': t.period_ms, 'deadline_ms': t.deadline_ms,
                           'miss_bound': t.miss_bound} for t in ts.tasks},
        'calibration': [{'strategy': rtsearch.to_strategy(ts, c, th).to_json(), 'miss': m}
                        for c, th, m in calibration],
        'search': {k: found[k] for k in ('theta', 'search_s', 'verify_s', 'evaluations',
                                         'proofs', 'front', 'predicted', 'simulated')},
        'proxy': {'train_s': proxy_s, 'samples': args.samples,
                  'error_calibrated': rtproxy.error(proxy, ts, held_out),
                  'error_simulator_only': rtproxy.error(sim_only, ts, held_out)},
        'runs': runs,
        'miss_reduction_vs_a': {k: (1 - r['miss_rate'] / a['miss_rate']) if a['miss_rate']
                                else None for k, r in runs.items()},
        'accuracy_cost_vs_a': {k: a['accuracy'] - r['accuracy'] for k, r in runs.items()}}
    (out / 'results.json').write_text(json.dumps(results, indent=1, default=str))
    print(table(results))
    return results


def _pct(value) -> str:
    return '-' if value is None else f'{100 * value:.2f}%'


def offline(args) -> dict:
    """
    Re-plan from a GPU run's measured files (``--offline DIR``): no server, no device.

    Reads ``tasks.json`` (measured profiles, accuracies, shards) and ``calibration.json``
    (measured runs) from DIR, re-derives the periods with :func:`_period`, trains and
    calibrates the proxy, searches, and *simulates* (a)-(d) for ``--duration`` seconds
    each.  The proxy's error is taken leave-one-out on the measured runs.
    """
    src, out = Path(args.offline), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    measured_doc = json.loads((src / 'tasks.json').read_text())
    measured_ts = rttasks.parse(measured_doc)
    doc = json.loads(json.dumps(measured_doc))
    table_rows = {t[0]: t for t in TASKS}
    for task in doc['tasks']:
        _, _, _, _, _, pre, post, share = table_rows[task['name']]
        task['period_ms'] = task['deadline_ms'] = _period(
            task['variants'][0]['profiles']['block:3'], pre, post, share)
    (out / 'tasks.json').write_text(json.dumps(doc, indent=1))
    ts = rttasks.parse(doc)
    runs = [(*rtsearch.from_strategy(measured_ts, r['strategy']), r['miss'])
            for r in json.loads((src / 'calibration.json').read_text())]
    t0 = time.perf_counter()
    sim = rtproxy.Proxy(seed=args.seed)
    sim.simulate_samples(ts, args.samples, args.horizon_ms, args.seed, jobs=args.jobs)
    proxy_s = time.perf_counter() - t0
    loo = []
    for i, (choices, theta, miss) in enumerate(runs):
        held = _copy_proxy(sim, args.seed)
        for j, (c, th, m) in enumerate(runs):
            if j != i:
                held.add(measured_ts, c, th, m, 20.0)
        loo.append(rtproxy.error(held.fit(), measured_ts, [(choices, theta, miss)]))
    proxy = _copy_proxy(sim, args.seed)
    for choices, theta, miss in runs:
        proxy.add(measured_ts, choices, theta, miss, 20.0)
    proxy.fit()
    found = rtsearch.search(ts, proxy, args.pop, args.generations, args.seed)
    rtsearch.to_strategy(ts, found['choices'], found['theta']).save(out / 'strategy.json')
    configs = {
        'a_largest_rm': rtsearch.rate_monotonic(ts, rtsearch.largest, 'block:3', 1.0),
        'b_smallest_rm': rtsearch.rate_monotonic(ts, rtsearch.smallest, 'block:3', 1.0),
        'c_rtplan': rtsearch.with_rtplan(ts, 'block:3', 1.0),
        'd_search': (found['choices'], found['theta'])}
    results = {'meta': {'command': ' '.join(['python -m bench.rtmdl'] + sys.argv[1:]),
                        'date': time.strftime('%Y-%m-%d %H:%M:%S %Z'),
                        'host': platform.node(), 'measured_in': str(src)},
               'tasks': {t.name: {'period_ms': t.period_ms, 'deadline_ms': t.deadline_ms,
                                  'miss_bound': t.miss_bound} for t in ts.tasks},
               'storage': _shard_storage(ts),
               'search': {k: found[k] for k in ('theta', 'search_s', 'verify_s', 'evaluations',
                                                'proofs', 'front', 'predicted', 'simulated')},
               'proxy': {'train_s': proxy_s, 'samples': args.samples,
                         'leave_one_out_on_measured': loo,
                         'mae_leave_one_out': statistics.mean(e['mae'] for e in loo)},
               'runs': {}}
    for label, (choices, theta) in configs.items():
        sim_run = simulate(ts, choices, theta, args.duration * 1e3, args.seed)
        releases = sum(v['releases'] for v in sim_run.values())
        results['runs'][label] = {
            'theta': theta, 'simulated': True,
            'tasks': {t.name: {'variant': choices[t.name].variant.name,
                               'priority': choices[t.name].priority,
                               'segments': choices[t.name].granularity,
                               'miss_rate': sim_run[t.name]['miss_rate'],
                               'bound': t.miss_bound} for t in ts.tasks},
            'miss_rate': sum(v['misses'] for v in sim_run.values()) / max(1, releases),
            'predicted': proxy.predict(ts, choices, theta),
            'accuracy': rtsearch.weighted_accuracy(ts, choices),
            'storage_mb': rtsearch.storage_mb(ts, choices)}
    a = results['runs']['a_largest_rm']
    results['miss_reduction_vs_a'] = {k: (1 - r['miss_rate'] / a['miss_rate'])
                                      if a['miss_rate'] else None
                                      for k, r in results['runs'].items()}
    results['accuracy_cost_vs_a'] = {k: a['accuracy'] - r['accuracy']
                                     for k, r in results['runs'].items()}
    (out / 'results.json').write_text(json.dumps(results, indent=1, default=str))
    print(table(results))
    return results


def _copy_proxy(source: rtproxy.Proxy, seed: int) -> rtproxy.Proxy:
    copy = rtproxy.Proxy(seed=seed)
    copy.x, copy.y, copy.w = list(source.x), list(source.y), list(source.w)
    return copy


def _shard_storage(ts) -> dict:
    """Return the weight bytes of every distinct variant stored whole and as shared shards."""
    distinct = {v.name: v for t in ts.tasks for v in t.variants}
    return {'variants': len(distinct),
            'separate_bytes': sum(v.storage_bytes for v in distinct.values()),
            'shared_bytes': ts.storage_bytes(list(distinct.values()))}


def table(results: dict) -> str:
    """Return the per-task miss rates and weighted accuracy of each configuration (markdown)."""
    names = list(results['tasks'])
    rows = ['| config | theta | ' + ' | '.join(f'{n} miss (bound)' for n in names)
            + ' | all miss | accuracy | storage MB |', '|---' * (len(names) + 5) + '|']
    for label, run in results['runs'].items():
        cells = [f"{_pct(run['tasks'][n]['miss_rate'])} ({100 * run['tasks'][n]['bound']:g}%) "
                 f"{run['tasks'][n]['variant']}" for n in names]
        rows.append(f"| {label} | {run['theta']:g} | " + ' | '.join(cells)
                    + f" | {100 * run['miss_rate']:.2f}% | {100 * run['accuracy']:.2f}% | "
                    f"{run['storage_mb']:.1f} |")
    return '\n'.join(rows)


if __name__ == '__main__':
    main()
