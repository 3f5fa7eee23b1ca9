r"""
What a row split in which the server finishes the network could gain, by the planner's model.

In today's plans (:mod:`rrto_ros.split`) a hybrid ``hybrid@k:f`` splits the rows
of the first ``k`` operators between robot and server and the robot runs the
rest of the network (``nodes[k:]``) after merging.  This prices the kind issue
13's sixth session named as missing, ``finish@k:f``: the same row split, then
the server merges and runs the rest, and only the model's outputs come down.
With the cost model of :class:`~rrto_ros.planner.CostModel` (its public
estimates of ``hybrid@k:f``, ``split@k`` and ``offload``), two ways:

* ``seq``: one request, one reply, as the server runs any recorded program: the
  robot computes its band, then sends the server's input rows and its own rows
  of the crossing values together; the server computes its band, merges, runs
  the rest.  Every term is its share of ``offload`` or ``split@k`` or more
  (halo rows), so it is never below ``min(offload, split@k)`` under the model;
* ``stream``: an upper bound for a kind the server cannot run: the input rows go
  up first and the server computes its band while the robot computes its own;
  the robot's rows follow in a second part, and the server keeps its band
  between the parts.

The robot's operators are timed here (:func:`rrto_ros.plan_profile.robot_profile`)
and scaled to ``--local-ms``; the server gets the same shares scaled to
``--server-ms``; byte costs, call overhead and contention default to the H200
host's Tiny-YOLO table of 2026-12-01.  ``--measure N`` times the robot's band
of the N best candidates as run (:func:`rrto_ros.split.band_program`).

    python -m bench.hybrid_finish python:bench.unseen_models:tiny_yolo --size 240x320 \
        --local-ms 19 --server-ms 8 --grid 50,100,300 --rtt 4
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from bench.hybrid import load_model
from rrto_ros import plan_profile
from rrto_ros.plan_solve import prepare
from rrto_ros.planner import CostModel, Link, Profiles
from rrto_ros.split import Plan, as_program, band_program, hybrid_targets

RATIOS = [round(0.05 * i, 2) for i in range(1, 20)]


def finish_ms(cost: CostModel, link: Link, cut: int, ratio: float) -> dict[str, float]:
    """Return ``finish@cut:ratio``'s modelled ms on ``link`` (seq, stream) and the robot band."""
    hybrid = cost.estimate(Plan('hybrid', cut, ratio), link)
    split = cost.estimate(Plan('split', cut), link)
    if not hybrid.bytes_down:   # the robot computes every row: that is split@cut
        return {'seq': split.latency_ms, 'stream': split.latency_ms,
                'robot_band_ms': split.robot_compute_ms}
    p = cost.profiles
    in_up, out = hybrid.bytes_up, split.bytes_down
    mine = split.bytes_up - hybrid.bytes_down   # the robot's rows of the crossing values
    band = hybrid.busy_ms - p.contention * sum(cost.io_ms(in_up, hybrid.bytes_down))
    s_band, s_rest = hybrid.server_compute_ms, split.server_compute_ms
    send_in, recv = cost.io_ms(in_up, out)
    send_mine, _ = cost.io_ms(mine, 0)
    seq = (band + link.rtt_ms + p.call_overhead_ms + send_in + send_mine + recv + s_band
           + s_rest + link.transfer_ms(in_up + mine, link.up)
           + link.transfer_ms(out, link.bandwidth_mbps))
    half, up_in = link.rtt_ms / 2, link.transfer_ms(in_up, link.up) + send_in
    server_band = half + up_in + s_band
    mine_at = (max(band + p.contention * send_in + send_mine, up_in)
               + link.transfer_ms(mine, link.up) + half)
    stream = (max(server_band, mine_at) + s_rest + half + p.call_overhead_ms + recv
              + link.transfer_ms(out, link.bandwidth_mbps))
    return {'seq': seq, 'stream': stream, 'robot_band_ms': band}


def best(cost: CostModel, link: Link, way: str) -> tuple[float, int, float]:
    """Return (ms, cut, ratio) of the fastest ``finish`` plan on ``link`` (way: seq, stream)."""
    return min((finish_ms(cost, link, cut, ratio)[way], cut, ratio)
               for cut in cost.cuts for ratio in RATIOS)


def _median_ms(call, repeats: int = 7) -> float:
    times = []
    for _ in range(repeats + 1):
        start = time.perf_counter()
        call()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times[1:])


def band_ratio(model, prepared: tuple, x: torch.Tensor, cut: int, ratio: float) -> float:
    """Return the robot's band of ``finish@cut:ratio`` as run here, over a local call."""
    _, program, weights, analysis = prepared
    robot, _ = hybrid_targets(analysis, cut, ratio)
    live = {v: iv for v, iv in robot.items() if iv[1] > iv[0]}
    if not live:
        return 0.0
    doc, rows = band_program(analysis, cut, live, 'finish-band')
    module = as_program(doc).module(weights, torch.device('cpu'))
    inputs = [x.narrow(analysis.axis[n], a, b - a).contiguous() for n, (a, b) in rows.items()]
    with torch.inference_mode():
        band = _median_ms(lambda: module(*inputs))
    return band / _median_ms(lambda: model.run((x,), {}))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('model', help='zoo name or python:module:factory')
    parser.add_argument('--size', default='240x320', help='frame HxW')
    parser.add_argument('--local-ms', type=float, required=True, help="the robot's local ms")
    parser.add_argument('--server-ms', type=float, required=True, help="offload's server ms")
    parser.add_argument('--up-ms-per-mb', type=float, default=0.48)
    parser.add_argument('--down-ms-per-mb', type=float, default=0.93)
    parser.add_argument('--call-overhead-ms', type=float, default=0.745)
    parser.add_argument('--contention', type=float, default=1.0)
    parser.add_argument('--op-ms', type=float, default=0.005, help="robot's ms per operator")
    parser.add_argument('--grid', default='50,100,300', help='bandwidths, Mbit/s')
    parser.add_argument('--rtt', type=float, default=4.0)
    parser.add_argument('--measure', type=int, default=0, help='robot bands to time here')
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    height, width = (int(s) for s in args.size.split('x'))
    model = load_model(args.model)
    x = plan_profile.example_input((1, height, width, 3), image=True)
    prepared = prepare(model, x)
    _, program, weights, analysis = prepared
    here = plan_profile.robot_profile(program, weights, model, x, 3)
    total = sum(here.values())
    cost = CostModel(analysis, Profiles(
        {k: v * args.local_ms / total for k, v in here.items()},
        {k: v * args.server_ms / total for k, v in here.items()}, args.call_overhead_ms,
        args.op_ms, 1, 'robot shares', args.up_ms_per_mb, args.down_ms_per_mb, args.contention))
    print(f'{args.model} {args.size}: {len(cost.cuts)} cuts, in {cost.in_bytes / 1e3:.0f} KB, '
          f'out {cost.out_bytes / 1e3:.0f} KB; local {args.local_ms:g} ms, server '
          f'{args.server_ms:g} ms, RTT {args.rtt:g} ms')
    chosen = []
    for bandwidth in (float(b) for b in args.grid.split(',')):
        link = Link(bandwidth, args.rtt)
        base = {name: e.latency_ms for name, (_, e) in cost.baselines(link).items()}
        floor = min(base.values())
        line = ' '.join(f'{name} {ms:.1f}' for name, ms in base.items())
        for way in ('seq', 'stream'):
            ms, cut, ratio = best(cost, link, way)
            chosen.append((cut, ratio))
            line += (f' | {way} {ms:.1f} (finish@{cut}:{ratio:.2f}, '
                     f'{100 * (1 - ms / floor):+.1f} %)')
        print(f'{bandwidth:g} Mbit/s: {line}')
    for cut, ratio in list(dict.fromkeys(chosen))[:args.measure]:
        modelled = finish_ms(cost, Link(1e6, 0.0), cut, ratio)['robot_band_ms']
        print(f'robot band finish@{cut}:{ratio:.2f}: run here '
              f'{band_ratio(model, prepared, x, cut, ratio):.2f} x local, modelled '
              f'{modelled / args.local_ms:.2f} x local')
    return 0


if __name__ == '__main__':
    raise SystemExit(main())
