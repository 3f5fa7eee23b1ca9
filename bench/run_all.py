"""
``make bench``: run the benchmark matrix on this machine and regenerate the report.

Three processes, as on a real robot: this one is the robot (its CPU time is
the robot's), ``python -m rrto_server`` on loopback is the server (on the CPU
unless ``--server-device cuda``), and ``python -m bench.linkemu`` between
them is the link.  Results go to
``docs/results/bench_cpu.json``; :mod:`bench.report` then writes the plots
and the tables in ``docs/benchmarks.md`` (folding in the GPU results if
``docs/results/gpu_h100.json`` exists).

    python -m bench.run_all                   # everything (~12 min on 2 quiet cores)
    python -m bench.run_all --profile smoke   # seconds, every section on tiny inputs
    python -m bench.report                    # tables and plots from existing results
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from bench import matrix, report, traces
from bench.frames import camera_frames
from bench.link_config import PRESETS, LinkConfig, mean_mbps
from bench.link_process import EmulatorProcess
from bench.measure import run_point
from bench.modes import MODES
from rrto_server.process import ServerProcess, child_env
from rrto_ros.preprocess import WithImageInput
from rrto_ros.zoo import ARCHITECTURES

log = logging.getLogger('bench')
REPO = Path(__file__).resolve().parents[1]


def machine() -> dict:
    """Describe this machine for the report."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path('/proc/cpuinfo').read_text().splitlines():
            if line.startswith('model name'):
                cpu = line.split(':', 1)[1].strip()
                break
    except OSError:
        pass
    memory = ''
    try:
        kib = int(Path('/proc/meminfo').read_text().split()[1])
        memory = f', {kib / 2**20:.0f} GiB RAM'
    except (OSError, ValueError, IndexError):
        pass
    return {'cpu': cpu, 'cores': os.cpu_count(), 'description':
            f'{cpu}, {os.cpu_count()} cores{memory}, {platform.system()} {platform.release()}'}


def _git_commit() -> str:
    try:
        out = subprocess.run(['git', 'rev-parse', '--short', 'HEAD'], cwd=REPO, text=True,
                             capture_output=True, timeout=5)
        dirty = subprocess.run(['git', 'status', '--porcelain', '--untracked-files=no'],
                               cwd=REPO, text=True, capture_output=True, timeout=5).stdout
        return out.stdout.strip() + ('+dirty' if dirty.strip() else '')
    except (OSError, subprocess.SubprocessError):
        return 'unknown'


class Bench:
    """Runs every section of a profile for one architecture at a time."""

    def __init__(self, profile: matrix.Profile, emulator: EmulatorProcess, endpoint: str):
        self.profile = profile
        self.emulator = emulator
        self.endpoint = endpoint
        self.frames, self.frames_source = camera_frames(profile.frames, profile.size)
        self.points: list[dict] = []

    def _point(self, section: str, arch: str, mode: str, runner, references, budget,
               link: LinkConfig | None, codec: str = 'raw', transform=None, input_kind='uint8',
               timeline: bool = False) -> None:
        if link is not None:
            self.emulator.set_link(link)
        link_set = time.monotonic()
        warmup = 0 if mode == 'naive' or timeline else (2 if mode == 'local' else 1)
        result = run_point(runner, self.frames, references, budget.seconds, budget.min_calls,
                           budget.max_calls, warmup, transform, timeline)
        if link is not None:   # the capacity the link offered while this point ran
            window = time.monotonic() - link_set
            result['up_mbps'] = mean_mbps(link.up, window)
            result['down_mbps'] = mean_mbps(link.down, window)
        if result['fallbacks'] and hasattr(runner, 'data'):
            runner.data.wait_available(10.0)
        point = {'section': section, 'arch': arch, 'mode': mode, 'codec': codec,
                 'input': input_kind, 'link': link.name if link else None,
                 'link_config': link.to_json() if link else None, **result}
        self.points.append(point)
        log.warning('%-7s %-12s %-6s %-22s %-10s n=%-3d median %8.1f ms  p99 %8.1f ms  '
                    'rt %5.1f  up %7.1f KB', section, arch, mode, point['link'] or '-', codec,
                    result['n'], result['median_ms'], result['p99_ms'], result['round_trips'],
                    result['bytes_sent'] / 1e3)

    def _runner(self, mode: str, model: torch.nn.Module, example: torch.Tensor):
        runner = MODES[mode].make(model, self.endpoint, self.profile.timeout_ms)
        if MODES[mode].uses_link:
            self.emulator.set_link(PRESETS['unlimited'])
            if not runner.warmup(example, timeout_s=300):
                runner.close()
                raise RuntimeError(f'{mode}: the server could not prepare the model')
        return runner

    def run_arch(self, arch: str) -> None:
        p = self.profile
        network = ARCHITECTURES[arch]()
        model = WithImageInput(network).eval()
        with torch.inference_mode():
            references = [model(frame) for frame in self.frames]
        local = self._runner('local', model, self.frames[0])
        self._point('modes', arch, 'local', local, references, p.local_budget, None)
        local.close()
        offloaded = [m for m in MODES if MODES[m].uses_link]
        runners = {mode: self._runner(mode, model, self.frames[0]) for mode in offloaded}
        try:
            for link in p.mode_links:
                tracing = 'trace' in (link.up.rate or {})
                for mode, runner in runners.items():
                    if mode == 'naive':    # a naive call over a slow link takes seconds
                        budget = p.naive_budget
                    else:
                        budget = p.trace_budget if tracing else p.budget
                    self._point('modes', arch, mode, runner, references, budget, link)
            replay = runners['replay']
            for link in p.codec_links:
                for codec in p.codecs:
                    replay.set_codec(codec)
                    self._point('codecs', arch, 'replay', replay, references, p.codec_budget,
                                link, codec)
            if p.steps is not None and arch in p.steps_archs:
                seconds = sum(s for _, s in p.steps.up.rate['steps'])
                for codec in p.steps_codecs:
                    replay.set_codec(codec)
                    self._point('steps', arch, 'replay', replay, references,
                                matrix.Budget(seconds, 1, 100000), p.steps, codec,
                                timeline=True)
            replay.set_codec('raw')
        finally:
            for runner in runners.values():
                runner.close()
        if p.input_links:
            self._float_input(arch, network, references)

    def _float_input(self, arch: str, network: torch.nn.Module, references) -> None:
        normalise = WithImageInput(torch.nn.Identity()).eval()

        def robot_side(frame):
            with torch.inference_mode():
                return normalise(frame)

        runner = self._runner('replay', network, robot_side(self.frames[0]))
        try:
            for link in self.profile.input_links:
                self._point('input', arch, 'replay', runner, references, self.profile.budget,
                            link, transform=robot_side, input_kind='float32')
        finally:
            runner.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog='python -m bench.run_all', description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--profile', choices=sorted(matrix.PROFILES), default='full')
    parser.add_argument('--archs', help='comma-separated subset of ' + ','.join(matrix.ARCHS))
    parser.add_argument('--results', default=str(REPO / 'docs' / 'results' / 'bench_cpu.json'))
    parser.add_argument('--docs', default=str(REPO / 'docs'), help='where plots and tables go')
    parser.add_argument('--server-device', default='cpu',
                        help="the server's --device (default cpu; 'cuda' on a GPU host)")
    parser.add_argument('--no-report', action='store_true')
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format='%(message)s')
    profile = matrix.PROFILES[args.profile]()
    if args.archs:
        unknown = set(args.archs.split(',')) - set(ARCHITECTURES)
        if unknown:
            parser.error(f'unknown architectures {sorted(unknown)}')
        profile.archs = tuple(args.archs.split(','))
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    started = time.monotonic()
    args_given = sys.argv[1:] if argv is None else argv
    meta = {
        'command': 'python -m bench.run_all ' + shlex.join(args_given),
        'date': datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M UTC'),
        'machine': machine(), 'git': _git_commit(), 'profile': profile.name,
        'torch': torch.__version__, 'python': platform.python_version(),
        'torch_threads': torch.get_num_threads(), 'server_device': args.server_device,
        'traces_dir': str(traces.traces_dir()) if traces.traces_dir().is_dir() else None,
        'load_before': os.getloadavg(),
    }
    with tempfile.TemporaryDirectory(prefix='rrto-bench-') as store:
        server = ServerProcess(store, None, '--allow-naive',   # the naive baseline is measured
                               device=args.server_device).start()
        try:
            with EmulatorProcess(('127.0.0.1', server.port), env=child_env()) as emulator:
                bench = Bench(profile, emulator, f'tcp://127.0.0.1:{emulator.port}')
                meta['frames'] = bench.frames_source
                meta['frame_shape'] = list(bench.frames.shape[2:])
                for arch in profile.archs:
                    bench.run_arch(arch)
        finally:
            server.stop()
    meta['load_after'] = os.getloadavg()
    meta['duration_s'] = round(time.monotonic() - started, 1)
    results = Path(args.results)
    results.parent.mkdir(parents=True, exist_ok=True)
    results.write_text(json.dumps({'meta': meta, 'points': bench.points}, indent=1) + '\n')
    print(f'{len(bench.points)} points in {meta["duration_s"]:.0f} s -> {results}')
    if not args.no_report:
        report.main(['--results', str(results), '--docs', args.docs])
    return 0


if __name__ == '__main__':
    sys.exit(main())
