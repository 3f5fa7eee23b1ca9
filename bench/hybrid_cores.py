r"""
Run several ``bench.hybrid`` processes side by side, each on cores of its own.

On a many-core host every process gets a robot core (one hardware thread of a
physical core whose siblings stay idle), a server (every thread of
``--server-cores`` physical cores, one thread per hardware thread; default one
physical core with SMT, else two cores) and a link emulator core (one physical
core each where there are enough, else one shared by all: a shared emulator
core delays one run's transfers while another run's pass).  Models separated
by ``,`` run in processes side by side; models joined by ``+`` run one after
another in one process, on the same cores (a server with many cores for fewer
processes).  Each process writes ``OUT/<models>.json`` and ``OUT/<models>.log``
(names joined by ``-``), and at the end ``OUT/combined.json`` holds every model
with the cores each ran on (:func:`combine`; render it with
``python -m bench.hybrid --render-only --out``).  ``--pairs FILE`` takes the
physical cores from what ``python -m bench.cpu_pairs --out FILE`` measured
(CPUs that slow each other: hyperthreads a VM does not show) instead of
sysfs; ``--cores-only`` prints each process's core arguments, one
line each, and runs nothing (to start ``bench.hybrid`` from other trees on the
same layout).  Other arguments after ``OUT`` go to every ``bench.hybrid`` process.

    python -m bench.hybrid_cores resnet18,python:bench.unseen_models:unet /tmp/out \
        --size 128x160 --grid 5,20,50,100,300 --rtts 4,30 --calls 5
    python -m bench.hybrid_cores python:bench.unseen_models:unet,resnet18+mobilenet /tmp/out \
        --server-cores 6 --size 240x320
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

from bench.cpulimit import parse_cores


def physical_cores(cpus: list[int]) -> list[tuple[int, ...]]:
    """Return the usable hardware threads of each physical core among ``cpus``."""
    cores = set()
    for cpu in cpus:
        path = Path(f'/sys/devices/system/cpu/cpu{cpu}/topology/thread_siblings_list')
        siblings = parse_cores(path.read_text().strip()) if path.exists() else [cpu]
        cores.add(tuple(c for c in siblings if c in cpus))
    return sorted(cores)


def assign(models: int, cores: list[tuple[int, ...]],
           server_cores: int | None = None) -> list[dict[str, list[int]]]:
    """
    Return per process its robot, server and emulator cores (raises if too few cores).

    ``server_cores`` physical cores per server (default: one with SMT, else
    two), every hardware thread of them.  The robot gets one hardware thread
    of its core; where no core is left for an emulator, the emulator runs on
    the robot core's other thread (lighter than a server beside the robot).
    """
    smt = len(cores[0]) > 1
    server_cores = server_cores or (1 if smt else 2)
    per_model = 1 + server_cores
    beside_robot = smt and len(cores) == per_model * models
    if len(cores) < per_model * models + (0 if beside_robot else 1):
        raise ValueError(f'{models} processes need {per_model * models + 1} physical cores, '
                         f'{len(cores)} available')
    own = len(cores) >= (per_model + 1) * models
    plans = []
    for k in range(models):
        first = per_model * k
        emulator = (list(cores[first][1:]) if beside_robot
                    else list(cores[per_model * models + (k if own else 0)]))
        server = [cpu for core in cores[first + 1:first + per_model] for cpu in core]
        plans.append({'robot': [cores[first][0]], 'server': server, 'emulator': emulator})
    return plans


def combine(paths: list[Path], command: str) -> dict:
    """Return one bench.hybrid result of runs made side by side: every model, its cores."""
    runs = [json.loads(Path(path).read_text()) for path in paths]
    meta = dict(runs[0]['meta'], command=command, per_model_cores={},
                load=max(run['meta']['load'] for run in runs))
    models = []
    for run in runs:
        for model in run['models']:
            models.append(model)
            meta['per_model_cores'][model['model']] = {
                key: run['meta'][key] for key in ('robot_cpus', 'server_cpus', 'emulator_cpus')}
    return {'meta': meta, 'models': models}


def processes(argv: list[str], cpus: list[int]) -> list[tuple[str, list[str]]]:
    """Return (name, command) of every ``bench.hybrid`` process ``argv`` asks for on ``cpus``."""
    groups, out, extra = argv[0].split(','), Path(argv[1]), argv[2:]
    server_cores = None
    if '--server-cores' in extra:
        at = extra.index('--server-cores')
        server_cores = int(extra[at + 1])
        extra = extra[:at] + extra[at + 2:]
    layout = physical_cores(cpus)
    if '--pairs' in extra:
        at = extra.index('--pairs')
        groups_of = json.loads(Path(extra[at + 1]).read_text())['groups']
        extra = extra[:at] + extra[at + 2:]
        layout = sorted(tuple(c for c in group if c in cpus) for group in groups_of
                        if any(c in cpus for c in group))
    result = []
    for group, cores in zip(groups, assign(len(groups), layout, server_cores)):
        models = group.split('+')
        name = '-'.join(model.split(':')[-1] for model in models)
        cmd = [sys.executable, '-m', 'bench.hybrid', '--models', ','.join(models),
               '--out', str(out / f'{name}.json')] + [
            arg for key in ('robot', 'server', 'emulator')
            for arg in (f'--{key}-cpus', ','.join(map(str, cores[key])))] + extra
        result.append((name, cmd))
    return result


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) < 2:
        print(__doc__)
        return 2
    out = Path(argv[1])
    out.mkdir(parents=True, exist_ok=True)
    only = '--cores-only' in argv
    commands = processes([arg for arg in argv if arg != '--cores-only'],
                         sorted(os.sched_getaffinity(0)))
    if only:
        for _, cmd in commands:
            at = cmd.index('--robot-cpus')
            print(shlex.join(cmd[at:at + 6]))
        return 0
    procs, paths = [], []
    for name, cmd in commands:
        paths.append(out / f'{name}.json')
        print(name, shlex.join(cmd[3:]), flush=True)
        with open(out / f'{name}.log', 'w') as log:
            procs.append(subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT))
    status = max(proc.wait() for proc in procs)
    done = [path for path in paths if path.exists()]
    if done:
        combined = combine(done, 'python -m bench.hybrid_cores ' + shlex.join(argv))
        (out / 'combined.json').write_text(json.dumps(combined, indent=1) + '\n')
    return status


if __name__ == '__main__':
    sys.exit(main())
