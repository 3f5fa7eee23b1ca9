"""
Fault-and-load soak: many robots at three priorities while faults are injected.

One ``python -m rrto_server`` process (CURVE on, CPU) serves ``--clients``
light robot processes (:mod:`bench.soak_client`, a third of them through the
link emulator) at priorities 0, 5 and 10, each sending ``infer`` requests in
a loop.  On a schedule spread over each ``FAULT_PERIOD_S`` of the run (the
whole run if shorter) the soak injects:

* SIGSTOP of the server for 3 s, then SIGCONT;
* a link outage (rate 0) of 3 s on the emulated robots;
* kill -9 of a few robots (restarted at once);
* a flipped byte in the stored weights, then kill -9 of the server and a
  restart on the same store: the model's next recording finds the blob
  corrupt, and the preparing client (a real ``OffloadedModel``) uploads it
  again on its own;
* a full disk: the store is a small tmpfs (as root) filled up, an upload is
  tried (it must be refused, the server must keep serving), then freed.

It reports requests, correct and wrong outputs, fallbacks, errors by code,
timeouts, duplicate replies, per-priority p50/p99 latency and deadline hit
rate, requests shed by admission control, the server's peak RSS and whether
every request it received was answered (``open_requests``).

    sudo python -m bench.soak --minutes 2.5 --clients 64
    sudo python -m bench.soak --minutes 10 --clients 64     # the documented soak
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch

from bench.link_config import grid_link, symmetric
from bench.link_proxy import LinkEmulator
from rrto_ros.client import RrtoClient
from rrto_ros.engine import offload
from rrto_ros.local_model import TorchModule
from rrto_server import keys
from rrto_server.replay_key import replay_key
from rrto_server.auth import Grant
from rrto_wire import treespec
from rrto_wire.curve import ClientKeys
from rrto_wire.messages import Kind, RecordOptions

PRIORITIES = (0, 5, 10)
FEATURES = 4096
FAULT_PERIOD_S = 150.0       # every fault once per period (a 10-minute soak: four times)


class Tiny(torch.nn.Module):
    """``relu(x * w + b)``: what every soak robot runs (bit-identical in numpy)."""

    def __init__(self, w: np.ndarray, b: np.ndarray):
        super().__init__()
        self.register_buffer('w', torch.from_numpy(w))
        self.register_buffer('b', torch.from_numpy(b))

    def forward(self, x):
        return torch.relu(x * self.w + self.b)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def _rss_mb(pid: int) -> float:
    try:
        with open(f'/proc/{pid}/status') as f:
            for line in f:
                if line.startswith('VmRSS:'):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


class Soak:
    """The server process, the robots, the faults and the measurements of one run."""

    def __init__(self, args: argparse.Namespace, work: Path):
        self.args, self.work = args, work
        self.port = _free_port()
        self.endpoint = f'tcp://127.0.0.1:{self.port}'
        self.store = work / 'store'
        self.store.mkdir()
        self.tmpfs = False
        if args.tmpfs_mb and os.geteuid() == 0:
            subprocess.run(['mount', '-t', 'tmpfs', '-o', f'size={args.tmpfs_mb}m', 'tmpfs',
                            str(self.store)], check=True)
            self.tmpfs = True
        self.keys_dir, self.robot_keys = work / 'keys', work / 'robots'
        keys.create_pair(self.keys_dir, 'server')
        grants = {'admin': Grant('admin', max_priority=10),
                  **{f'p{p}': Grant('infer', max_priority=p, max_in_flight=64)
                     for p in PRIORITIES}}
        for name, grant in grants.items():
            keys.create_pair(self.robot_keys, name)
            keys.allow(self.keys_dir, self.robot_keys / f'{name}.key', grant)
        rng = np.random.default_rng(0)
        self.w = rng.standard_normal(FEATURES, dtype=np.float32)
        self.b = rng.standard_normal(FEATURES, dtype=np.float32)
        np.savez(work / 'model.npz', w=self.w, b=self.b)
        self.server: subprocess.Popen | None = None
        self.robots: dict[int, tuple[subprocess.Popen, list]] = {}
        self.events: list[dict] = []
        self.peak_rss_mb = 0.0
        self.stop = threading.Event()
        self.emulator: LinkEmulator | None = None

    # ---------------------------------------------------------------- processes
    def start_server(self) -> None:
        log = open(self.work / 'server.log', 'a')
        self.server = subprocess.Popen(
            [sys.executable, '-m', 'rrto_server', '--bind', self.endpoint, '--store',
             str(self.store), '--device', 'cpu', '--keys', str(self.keys_dir),
             '--admission-capacity', str(self.args.capacity), '--cpu-workers', '1'],
            stdout=log, stderr=subprocess.STDOUT)

    def client_keys(self, name: str) -> ClientKeys:
        return ClientKeys.load(self.keys_dir / 'server.key',
                               self.robot_keys / f'{name}.key_secret')

    def start_robot(self, index: int) -> None:
        priority = PRIORITIES[index % len(PRIORITIES)]
        endpoint = (f'tcp://127.0.0.1:{self.emulator.port}' if index % 3 == 1
                    else self.endpoint)
        out = self.work / f'robot{index}.{len(self.robots.get(index, (None, []))[1])}.json'
        cmd = [sys.executable, '-m', 'bench.soak_client', '--endpoint', endpoint,
               '--replay-file', str(self.work / 'replay'), '--model', str(self.work / 'model.npz'),
               '--priority', str(priority), '--deadline-ms', str(self.args.deadline_ms),
               '--timeout-ms', str(self.args.timeout_ms), '--think-ms', str(self.args.think_ms),
               '--seconds', str(self.args.minutes * 60 + 60), '--out', str(out),
               '--server-key', str(self.keys_dir / 'server.key'),
               '--client-key', str(self.robot_keys / f'p{priority}.key_secret')]
        outs = self.robots.get(index, (None, []))[1] + [out]
        self.robots[index] = (subprocess.Popen(cmd, stdout=subprocess.DEVNULL), outs)

    # ---------------------------------------------------------------- the model
    def prepare(self) -> None:
        """Upload and record the model with a real OffloadedModel; publish its replay key."""
        keys = {'server_key': str(self.keys_dir / 'server.key'),
                'client_key': str(self.robot_keys / 'admin.key_secret')}
        self.model = offload(Tiny(self.w, self.b).eval(), server=self.endpoint,
                             timeout_ms=5000, record_timeout_ms=120_000, **keys)
        x = torch.zeros(FEATURES)
        deadline = time.monotonic() + 300      # warmup gives up at once while the server starts
        while not self.model.warmup(x, timeout_s=max(1.0, deadline - time.monotonic())):
            if time.monotonic() > deadline:
                raise RuntimeError(f'the model did not prepare: {self.model.prepared()}')
            time.sleep(1.0)
        flat, spec = treespec.flatten(((x,), {}))
        artifact = TorchModule(Tiny(self.w, self.b).eval()).artifact(flat, spec)
        key = replay_key(artifact.model, artifact.signature, RecordOptions())
        (self.work / 'replay').write_text(key)

    def keep_prepared(self) -> None:
        """Call the model now and then: its engine re-records and re-uploads after faults."""
        x = torch.ones(FEATURES)
        while not self.stop.wait(0.5):
            self.model(x)

    # ---------------------------------------------------------------- faults
    def _event(self, name: str, **fields) -> None:
        self.events.append(dict(fields, event=name, t=round(time.monotonic() - self.t0, 1)))
        print(f'[{self.events[-1]["t"]:7.1f} s] {name} {fields or ""}', flush=True)

    def faults(self) -> None:
        total = self.args.minutes * 60
        period = min(total, FAULT_PERIOD_S)      # a long soak goes through the plan again
        plan = [(0.15, self.sigstop), (0.3, self.outage), (0.45, self.kill_robots),
                (0.6, self.corrupt_and_restart), (0.78, self.full_disk)]
        for start in np.arange(0.0, total - period + 1e-6, period):
            for fraction, fault in plan:
                at = self.t0 + start + fraction * period
                if self.stop.wait(max(0.0, at - time.monotonic())):
                    return
                fault()

    def sigstop(self) -> None:
        self._event('server SIGSTOP 3 s')
        self.server.send_signal(signal.SIGSTOP)
        time.sleep(3)
        self.server.send_signal(signal.SIGCONT)

    def outage(self) -> None:
        self._event('link outage 3 s (emulated robots)')
        self.emulator.set_link(symmetric('outage_3s', {'steps': [[0.0, 3.0], [200.0, 60.0]],
                                                       'loop': False}, rtt_ms=2.0))
        time.sleep(3)

    def kill_robots(self) -> None:
        victims = list(self.robots)[::max(1, len(self.robots) // 6)]
        self._event('kill -9 robots', robots=victims)
        for index in victims:
            self.robots[index][0].kill()
            self.start_robot(index)

    def corrupt_and_restart(self) -> None:
        weights = [p for p in (self.store / 'blobs').iterdir()
                   if p.suffix == '' and json.loads(p.with_suffix('.json').read_text())['kind']
                   == 'weights']
        for path in weights:
            data = bytearray(path.read_bytes())
            data[len(data) // 2] ^= 0x10
            path.write_bytes(bytes(data))
        self._event('flipped a byte in stored weights; server kill -9 and restart',
                    blobs=len(weights))
        self.server.kill()
        self.server.wait()
        self.start_server()

    def full_disk(self) -> None:
        if not self.tmpfs:
            self._event('full disk skipped (not root: no tmpfs)')
            return
        filler = self.store / 'filler'
        free = os.statvfs(self.store).f_bavail * os.statvfs(self.store).f_frsize
        with open(filler, 'wb') as f:
            f.write(bytes(max(0, free - 4096)))
        other = Tiny(self.w * 2, self.b)
        flat, spec = treespec.flatten(((torch.zeros(FEATURES),), {}))
        art = TorchModule(other.eval()).artifact(flat, spec)
        client = RrtoClient(self.endpoint, call_timeout_ms=10_000,
                            keys=self.client_keys('admin'))
        try:
            client.upload(art.blobs, timeout_ms=20_000)
            outcome = 'accepted (unexpected)'
        except Exception as exc:  # noqa: B902 - the refusal is what this fault checks
            outcome = f'refused: {exc}'[:160]
        finally:
            client.close()
        self._event('full disk: upload of a new model', outcome=outcome)
        filler.unlink()

    # ---------------------------------------------------------------- the run
    def monitor(self) -> None:
        while not self.stop.wait(0.5):
            self.peak_rss_mb = max(self.peak_rss_mb, _rss_mb(self.server.pid))

    def server_stats(self) -> dict:
        client = RrtoClient(self.endpoint, call_timeout_ms=20_000,
                            keys=self.client_keys('admin'))
        try:
            return client.call(Kind.STATS)[0]['stats']
        finally:
            client.close()

    def run(self) -> dict:
        self.start_server()
        self.t0 = time.monotonic()
        self.prepare()
        self.emulator = LinkEmulator(upstream=('127.0.0.1', self.port),
                                     link=grid_link(200, rtt_ms=2.0))
        self._event('model prepared; starting robots', clients=self.args.clients)
        for index in range(self.args.clients):
            self.start_robot(index)
        deadline = time.monotonic() + 300     # 64 processes start slowly on 2 loaded cores
        while (time.monotonic() < deadline
               and not all(outs[-1].exists() for _, outs in self.robots.values())):
            time.sleep(0.5)
        self.t0 = time.monotonic()
        self._event('robots running')
        threads = [threading.Thread(target=f, daemon=True)
                   for f in (self.faults, self.monitor, self.keep_prepared)]
        for thread in threads:
            thread.start()
        self.stop.wait(self.args.minutes * 60)
        for proc, _ in self.robots.values():
            proc.send_signal(signal.SIGTERM)
        for proc, _ in self.robots.values():
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
        time.sleep(2)                       # the server answers what is still queued
        stats = self.server_stats()
        self.stop.set()
        for thread in threads:
            thread.join(30)
        return self.report(stats)

    def report(self, stats: dict) -> dict:
        per = {p: {'requests': 0, 'ok': 0, 'wrong': 0, 'timeouts': 0, 'fallbacks': 0,
                   'duplicates': 0, 'stale': 0, 'deadline_met': 0, 'errors': {}, 'lat': []}
               for p in PRIORITIES}
        for _, outs in self.robots.values():
            for out in outs:
                if not out.exists():
                    continue
                data = json.loads(out.read_text())
                row = per[data['priority']]
                for key in ('requests', 'ok', 'wrong', 'timeouts', 'fallbacks', 'duplicates',
                            'stale', 'deadline_met'):
                    row[key] += data[key]
                for code, n in data['errors'].items():
                    row['errors'][code] = row['errors'].get(code, 0) + n
                row['lat'] += data['latencies_ms']
        for row in per.values():
            lat = np.array(row.pop('lat') or [0.0])
            row['p50_ms'], row['p99_ms'] = (float(np.percentile(lat, q)) for q in (50, 99))
            answered = row['ok'] + row['wrong'] + sum(row['errors'].values())
            row['unaccounted'] = row['requests'] - answered - row['timeouts']
            row['deadline_hit_rate'] = row['deadline_met'] / max(1, row['ok'])
        return {'clients': self.args.clients, 'minutes': self.args.minutes,
                'priorities': {str(p): row for p, row in per.items()},
                'server_peak_rss_mb': round(self.peak_rss_mb, 1),
                'open_requests': stats.get('open_requests'),
                'admission': stats.get('guard', {}).get('admission'),
                'engine': dict(self.model.stats()), 'events': self.events}

    def close(self) -> None:
        self.stop.set()
        for proc, _ in self.robots.values():
            if proc.poll() is None:
                proc.kill()
        if self.emulator is not None:
            self.emulator.close()
        if getattr(self, 'model', None) is not None:
            self.model.close()
        if self.server is not None and self.server.poll() is None:
            self.server.kill()
            self.server.wait()
        if self.tmpfs:
            subprocess.run(['umount', str(self.store)], check=False)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[1])
    parser.add_argument('--minutes', type=float, default=2.5)
    parser.add_argument('--clients', type=int, default=64)
    parser.add_argument('--capacity', type=int, default=24, help='admission capacity')
    parser.add_argument('--deadline-ms', type=float, default=250.0)
    parser.add_argument('--timeout-ms', type=float, default=1000.0)
    parser.add_argument('--think-ms', type=float, default=50.0)
    parser.add_argument('--tmpfs-mb', type=int, default=64, help='0: no tmpfs store')
    parser.add_argument('--out', help='write the report as JSON here')
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix='rrto-soak-') as tmp:
        soak = Soak(args, Path(tmp))
        try:
            report = soak.run()
        finally:
            soak.close()
    print(json.dumps({k: v for k, v in report.items() if k != 'events'}, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1))


if __name__ == '__main__':
    main()
