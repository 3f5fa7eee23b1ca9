r"""
``rrto-plan``: profile a model on the robot and the server, and solve its plan table.

Example::

    rrto-plan --model python:rrto_ros.zoo:keypoint_net --image-input --input-shape 1,224,224,3 \\
        --server tcp://gpu-server:5555 --bandwidths 5,10,20,50,100,300 --rtts 2,10,30 \\
        --out config/plans/keypoint_net_224.json

The robot profile is measured here (run it on the robot, or with
``--robot-threads`` matching it).  The server profile comes from the server's
``profile`` request, scaled to the measured time of the recorded replay; with
no ``--server``, ``--server-speedup K`` estimates it as the robot's times / K
and the table says so.
"""

from __future__ import annotations

import argparse
import datetime
import logging
import platform
import statistics
import sys
import time

import torch

from rrto_ros.client import RrtoClient
from rrto_ros.engine import OffloadedModel, OffloadResult
from rrto_ros.graph import GraphAnalysis
from rrto_ros.local_model import TorchModule, load_local_model
from rrto_ros.plan_table import PlanTable
from rrto_ros.hybrid import PlanRuntime
from rrto_ros.planner import CostModel, Link, Power, Profiles, consolidate, optimise, refine
from rrto_ros.preprocess import WithImageInput
from rrto_ros.split import as_program
from rrto_wire import treespec
from rrto_wire.op_timing import operator_times
from rrto_wire.program import unpack_weights
from rrto_wire.messages import Kind
from rrto_wire.tensors import signature_key


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
    parser.add_argument('--robot-threads', type=int, default=0,
                        help='torch threads while profiling the robot (0: leave as is)')
    parser.add_argument('--repeats', type=int, default=5)
    parser.add_argument('--objective', choices=('latency', 'energy'), default='latency')
    parser.add_argument('--compute-w', type=float, default=Power.compute_w)
    parser.add_argument('--radio-w-per-mbps', type=float, default=Power.radio_w_per_mbps)
    parser.add_argument('--idle-w', type=float, default=Power.idle_w)
    parser.add_argument('--out', required=True, help='plan table JSON to write')
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.server_speedup <= 0:
        parser.error('--repeats must be >= 1 and --server-speedup > 0')
    return args


def example_input(shape: tuple[int, ...], image: bool) -> torch.Tensor:
    """Return a deterministic example input (uint8 frame for image input, else normal floats)."""
    generator = torch.Generator().manual_seed(0)
    if image:
        return torch.randint(0, 256, shape, dtype=torch.uint8, generator=generator)
    return torch.randn(shape, generator=generator)


def dispatch_ms(repeats: int = 5, ops: int = 64) -> float:
    """Return the fixed cost of one operator in a graph module here (a tiny tensor's relu)."""
    graph = torch.fx.Graph()
    value = graph.placeholder('x')
    for _ in range(ops):
        value = graph.call_function(torch.ops.aten.relu.default, (value,))
    graph.output(value)
    module = torch.fx.GraphModule(torch.nn.Module(), graph)
    x = torch.zeros(1)
    times = []
    with torch.inference_mode():
        for _ in range(repeats + 2):
            start = time.perf_counter()
            module(x)
            times.append((time.perf_counter() - start) * 1e3 / ops)
    return statistics.median(times[2:])


def robot_profile(program, weights: dict, model: TorchModule, x: torch.Tensor,
                  repeats: int) -> dict[str, float]:
    """Return per-operator ms on this machine, scaled to the measured local call time."""
    cpu = torch.device('cpu')
    per_op = operator_times(program.module(weights, cpu), [x], cpu, repeats)
    times = []
    for _ in range(2 * repeats + 2):
        start = time.perf_counter()
        model.run((x,), {})
        times.append((time.perf_counter() - start) * 1e3)
    scale = statistics.median(times[2:]) / max(1e-9, sum(per_op.values()))
    return {k: v * scale for k, v in per_op.items()}


def measure_plans(program, analysis, weights: dict, x: torch.Tensor, plans,
                  repeats: int) -> dict[str, float]:
    """Time the robot's side of every split or hybrid plan here (plan name -> median ms)."""
    measured = {}
    for plan in plans:
        if plan.kind in ('split', 'hybrid') and plan.name not in measured:
            runtime = PlanRuntime(program, analysis, weights, plan)
            measured[plan.name] = runtime.robot_ms([x], weights, repeats)
    return measured


def server_profile(endpoint: str, model: TorchModule, x: torch.Tensor,
                   repeats: int) -> tuple[dict[str, float], float, str]:
    """Return per-operator ms (scaled to the replay), per-call overhead ms and the device."""
    with OffloadedModel(model, endpoint, timeout_ms=30000) as om:
        if not om.warmup(x):
            raise RuntimeError(f'server {endpoint} could not record the model')
        digest = next(iter(om._targets.values())).artifact.model
        records = []
        for _ in range(max(10, repeats * 4)):
            om(x)
            if om.last.result == OffloadResult.OFFLOADED:
                records.append(om.last)
    if not records:
        raise RuntimeError('no call was offloaded while profiling the server')
    client = RrtoClient(endpoint, call_timeout_ms=120000)
    try:
        reply, _ = client.call(Kind.PROFILE, {'model': digest, 'repeats': repeats})
    finally:
        client.close()
    per_op = reply['profile']
    replay_ms = statistics.median(r.server_compute_ms for r in records)
    scale = replay_ms / max(1e-9, sum(per_op.values()))
    overhead = statistics.median(r.total_ms - r.server_compute_ms for r in records)
    return {k: v * scale for k, v in per_op.items()}, overhead, reply.get('device', '')


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format='%(levelname)s %(name)s: %(message)s')
    started = time.perf_counter()
    if args.robot_threads:
        torch.set_num_threads(args.robot_threads)
    local = load_local_model(args.model)
    model = local.module if isinstance(local, TorchModule) else None
    if model is None:
        print('rrto-plan: only PyTorch models can be split; ONNX models offload whole',
              file=sys.stderr)
        return 2
    if args.image_input:
        model = WithImageInput(model).eval()
    x = example_input(args.input_shape, args.image_input)
    flat, spec = treespec.flatten(((x,), {}))
    model = TorchModule(model, label=local.label)   # the label is part of the program digest
    artifact = model.artifact(flat, spec)
    program = as_program(artifact.program)
    blobs = [d for kind, d in artifact.blobs.values() if kind == 'weights']
    weights = unpack_weights(bytearray(blobs[0])) if blobs else {}
    analysis = GraphAnalysis(program, {k: v.shape for k, v in weights.items()})
    robot = robot_profile(program, weights, model, x, args.repeats)
    if args.server:
        server, overhead, device = server_profile(args.server, model, x, args.repeats)
        source = f'measured on {args.server} ({device})'
    else:
        server = {k: v / args.server_speedup for k, v in robot.items()}
        overhead, source = 0.5, f'estimated: robot time / {args.server_speedup:g}'
    profiles = Profiles(robot, server, overhead, dispatch_ms(), torch.get_num_threads(), source)
    power = Power(args.compute_w, args.radio_w_per_mbps, args.idle_w)
    cost = CostModel(analysis, profiles, power)
    solutions = [optimise(cost, Link(bandwidth, rtt), objective=args.objective)
                 for rtt in args.rtts for bandwidth in args.bandwidths]
    solve_s = sum(s.solve_s for s in solutions)
    solutions = consolidate(cost, solutions)
    measured = measure_plans(program, analysis, weights, x, [s.plan for s in solutions],
                             args.repeats)
    entries = []
    for solution in refine(cost, solutions, measured):
        bandwidth, rtt = solution.link.bandwidth_mbps, solution.link.rtt_ms
        entries.append(solution.to_json())
        base = {k: e.latency_ms for k, (_, e) in solution.baselines.items()}
        print(f'{bandwidth:7g} Mbit/s {rtt:5g} ms: {solution.plan.name:22s} '
              f'{solution.estimate.latency_ms:8.2f} ms predicted (local {base["local"]:.2f}, '
              f'offload {base["offload"]:.2f}, best split {base["best_split"]:.2f}) '
              f'solved in {solution.solve_s * 1e3:.0f} ms')
    table = PlanTable(artifact.model, local.label, signature_key(artifact.signature), entries,
                      {'robot_ms': robot, 'server_ms': server, 'call_overhead_ms': overhead,
                       'robot_op_ms': profiles.robot_op_ms, 'measured_plans_ms': measured,
                       'robot_threads': profiles.robot_threads, 'server': source},
                      {'compute_w': power.compute_w, 'radio_w_per_mbps': power.radio_w_per_mbps,
                       'idle_w': power.idle_w}, solve_s,
                      datetime.datetime.now().isoformat(timespec='seconds'),
                      f'{platform.node()} {platform.machine()}')
    table.save(args.out)
    print(f'wrote {args.out}: {len(entries)} grid points, {len(table.plans())} distinct plans, '
          f'solve time {solve_s:.2f} s (total {time.perf_counter() - started:.1f} s)')
    return 0


if __name__ == '__main__':
    sys.exit(main())
