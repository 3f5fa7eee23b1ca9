r"""
``rrto-plan``: profile a model on the robot and the server, and solve its plan table.

Example::

    rrto-plan --model python:rrto_ros.zoo:keypoint_net --image-input --input-shape 1,224,224,3 \\
        --server tcp://gpu-server:5555 --bandwidths 5,10,20,50,100,300 --rtts 2,10,30 \\
        --out config/plans/keypoint_net_224.json

The robot profile is measured here (run it on the robot, or with
``--robot-threads`` matching it).  The server profile comes from the server's
``profile`` request, scaled to the measured time of the recorded replay; with
a server, the robot's byte costs and compute/transfer contention are
measured, every candidate plan is timed end to end and the decision margin
is the model's measured error (:mod:`rrto_ros.plan_solve`): profile over a
fast link, and name it with ``--link MBPS,RTT`` (its round trip and transfer
time are then not counted as per-call overhead; default: treated as free).
With no ``--server``, ``--server-speedup K`` estimates the
server as the robot's times / K and the table says so.  The table is valid
for this model's exported program and input shape only; ``offload()``
raises if given it for another.  A model that cannot be exported whole
(data-dependent operators: :mod:`rrto_ros.partition`) gets one table per
remote subgraph that takes one tensor, written beside ``--out`` as
``<stem>.subgraph<N>.json``; pass them to ``offload(...,
subgraph_plans=[...])`` or their directory.  This command is a thin shell over
:func:`rrto_ros.plan_solve.solve`.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path
from typing import Any

import torch

from rrto_ros.local_model import TorchModule, load_local_model
from rrto_ros.partition import is_data_dependent
from rrto_ros.partition_plans import offloaded_subgraphs
from rrto_ros.plan_profile import example_input
from rrto_ros.plan_solve import ROBOT_SPAN_S, solve
from rrto_ros.planner import Link, Power
from rrto_ros.preprocess import WithImageInput


def _floats(text: str) -> list[float]:
    values = [float(v) for v in text.split(',') if v.strip()]
    if not values or any(v <= 0 for v in values):
        raise argparse.ArgumentTypeError(f'expected positive numbers, comma-separated: {text!r}')
    return values


def _shape(text: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(v) for v in text.split(','))
    except ValueError:
        raise argparse.ArgumentTypeError(f'expected sizes like 1,224,224,3: {text!r}') from None
    if not shape or any(s <= 0 for s in shape):
        raise argparse.ArgumentTypeError(f'sizes must be positive: {text!r}')
    return shape


def _link(text: str) -> Link:
    values = [float(v) for v in text.split(',')]
    if len(values) != 2 or values[0] <= 0 or values[1] < 0:
        raise argparse.ArgumentTypeError(f"expected 'Mbit/s,RTT ms' like 300,4: {text!r}")
    return Link(*values)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog='rrto-plan', description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--model', required=True,
                        help="model file or 'python:package.module:factory'")
    parser.add_argument('--input-shape', type=_shape, default=(1, 224, 224, 3))
    parser.add_argument('--image-input', action='store_true',
                        help='the input is a uint8 NHWC camera frame normalised on the server')
    parser.add_argument('--server', help='endpoint of a running rrto_server to profile')
    parser.add_argument('--server-speedup', type=float, default=8.0,
                        help='without --server: server operator time = robot time / this')
    parser.add_argument('--bandwidths', type=_floats, default=_floats('5,10,20,50,100,300'),
                        help='Mbit/s grid')
    parser.add_argument('--rtts', type=_floats, default=_floats('2,10,30'), help='RTT grid, ms')
    parser.add_argument('--link', type=_link, default=None,
                        help="the link to --server while solving, 'MBPS,RTT_MS' (default: free)")
    parser.add_argument('--robot-threads', type=int, default=0,
                        help='torch threads while profiling the robot (0: leave as is)')
    parser.add_argument('--repeats', type=int, default=5)
    parser.add_argument('--robot-span', type=float, default=ROBOT_SPAN_S,
                        help="seconds the robot's reference calls span: its price does not "
                             'rest on one spell of its speed')
    parser.add_argument('--objective', choices=('latency', 'energy'), default='latency')
    parser.add_argument('--compute-w', type=float, default=Power.compute_w)
    parser.add_argument('--radio-w-per-mbps', type=float, default=Power.radio_w_per_mbps)
    parser.add_argument('--idle-w', type=float, default=Power.idle_w)
    parser.add_argument('--out', required=True, help='plan table JSON to write')
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.server_speedup <= 0:
        parser.error('--repeats must be >= 1 and --server-speedup > 0')
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format='%(levelname)s %(name)s: %(message)s')
    started = time.perf_counter()
    if args.robot_threads:
        torch.set_num_threads(args.robot_threads)
    local = load_local_model(args.model)
    if not isinstance(local, TorchModule):
        print('rrto-plan: only PyTorch models can be split; ONNX models offload whole',
              file=sys.stderr)
        return 2
    module = WithImageInput(local.module).eval() if args.image_input else local.module
    model = TorchModule(module, label=local.label)
    x = example_input(args.input_shape, args.image_input)
    links = [Link(bandwidth, rtt) for rtt in args.rtts for bandwidth in args.bandwidths]
    power = Power(args.compute_w, args.radio_w_per_mbps, args.idle_w)
    options = dict(links=links, endpoint=args.server, repeats=args.repeats,
                   server_speedup=args.server_speedup, objective=args.objective, power=power,
                   robot_span_s=args.robot_span)
    if args.link is not None:
        options['calibration_link'] = args.link
    try:
        solved = solve(model, x, **options)
    except Exception as exc:  # noqa: B902 - data-dependent: a table per subgraph, else re-raised
        if not is_data_dependent(exc):
            raise
        return _solve_subgraphs(model, x, options, Path(args.out))
    _report(solved, args.out, started)
    return 0


def _solve_subgraphs(model: TorchModule, x: torch.Tensor, options: dict, out: Path) -> int:
    """Solve a table per remote subgraph of a model that cannot be exported whole."""
    print(f'{model.label} cannot be exported whole: solving a table per remote subgraph '
          '(offload it with subgraph_plans=<these files or their directory>)')
    written = 0
    for module, data in offloaded_subgraphs(model, (x,)):
        if len(data) != 1:
            print(f'{module.label}: takes {len(data)} tensors (the planner splits programs of '
                  'one input): it offloads whole')
            continue
        started = time.perf_counter()
        path = out.with_name(f'{out.stem}.{module.label.rsplit(".", 1)[1]}.json')
        print(f'{module.label}:')
        _report(solve(module, data[0], **options), str(path), started)
        written += 1
    return 0 if written else 2


def _report(solved: Any, out: str, started: float) -> None:
    for entry in solved.table.entries:
        base = {k: v['predicted']['latency_ms'] for k, v in entry['baselines'].items()}
        print(f"{entry['bandwidth_mbps']:7g} Mbit/s {entry['rtt_ms']:5g} ms: "
              f"{entry['plan_name']:22s} {entry['predicted']['latency_ms']:8.2f} ms predicted "
              f"(local {base['local']:.2f}, offload {base['offload']:.2f}, "
              f"best split {base['best_split']:.2f})")
    for name, error in sorted(solved.errors.items()):
        print(f'  {name:22s} measured {solved.measured_ms[name]:8.2f} ms, model error '
              f'{error * 100:+.1f} % (corrected)')
    table = solved.table
    table.save(out)
    print(f'wrote {out}: {len(table.entries)} grid points, {len(table.plans())} distinct '
          f'plans, margin {table.margin * 100:.1f} %, solve time {table.solve_s:.2f} s '
          f'(total {time.perf_counter() - started:.1f} s)')


if __name__ == '__main__':
    sys.exit(main())
