"""
End to end through the link emulator with the GPU server: measured against the floor.

Three processes on one host: ``python -m rrto_server`` on the GPU, the link
emulator (``bench.linkemu``, a shaping proxy on loopback) in front of it, and
this process as the robot (``rrto_ros.offload``, raw codec, so the bytes on
the wire are the frame's).  For every preset link and every point of the
bandwidth grid (clean links, 4 ms RTT), ``--calls`` calls after warm-up:

    floor = RTT + (bytes up - burst) / uplink rate + (bytes down - burst) / downlink rate
            + bare replay

with the bytes the calls put on the wire and the bare replay (CUDA graph with
page-locked copies in and out, ``bench.gpu_floor.bare``) measured in this run.
``ratio = measured median / floor`` (goal <= 1.10 on every point).  Beside
each call, a bare pyzmq echo of the same bytes goes through a second emulator
with the same link (``echo_ratio = (echo median + bare replay) / floor``):
what the link and the emulator's own forwarding leave for any request path.
``robot_beyond_echo_ms`` is the median per call of wall - echo - the reply's
``server_ms`` (the robot's own part), ``robot_cpu_ms`` the median CPU time of
the calling thread per call: the robot's work, which runs slower after a long
wait for the reply (issue 11: after waits of tens of milliseconds the same
work took 2.5-3 times the CPU on the 2-core development VM, a bare client's
too).  Links with loss stall a connection 200 ms per lost packet, so their
mean is far above the floor; the median is what the ratio uses.

Usage: ``python -m bench.gpu_e2e --device cuda --out docs/results/gpu_e2e_h200.json``
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch

from bench import gpu_models
from bench.gpu_floor import Echo, bare
from bench.link_config import PRESETS, grid_link
from bench.link_process import EmulatorProcess
from bench.link_shaper import MIN_BURST_BYTES
from bench.matrix import GRID_MBPS, GRID_RTT_MS, LINK_PRESETS
from rrto_wire.summary import percentile


def links() -> list:
    """Return every link of the section: the presets, then the bandwidth grid."""
    return [PRESETS[name] for name in LINK_PRESETS] + [grid_link(m, GRID_RTT_MS)
                                                       for m in GRID_MBPS]


def floor_ms(link, bytes_up: float, bytes_down: float, bare_ms: float) -> float:
    """
    Return RTT + serialisation both ways + the bare replay.

    Serialisation counts the bytes beyond each direction's burst allowance (the
    emulator's token bucket is full after an idle gap: ``burst_ms`` of data at
    the rate, at least two packets), so no call can beat the floor.
    """
    wire_ms = 0.0
    for direction, nbytes in ((link.up, bytes_up), (link.down, bytes_down)):
        if direction.mbps:
            rate = direction.mbps * 1e6 / 8                           # bytes per second
            burst = max(direction.burst_ms / 1e3 * rate, MIN_BURST_BYTES)
            wire_ms += max(0.0, nbytes - burst) / rate * 1e3
    return link.rtt_ms + wire_ms + bare_ms


def measure_link(om, frame, emulators, echo, link, calls: int, bare_ms: float) -> dict:
    """Set the link, warm up, time ``calls`` offloaded calls and as many echoes; the point."""
    from rrto_ros import OffloadResult
    for emulator in emulators:
        emulator.set_link(link)
    walls, echoes, sent, received, offloaded = [], [], [], [], 0
    cpus, beyond = [], []
    for i in range(calls + 3):
        cpu = time.thread_time()
        start = time.perf_counter()
        om(frame)
        wall = (time.perf_counter() - start) * 1e3
        cpu = (time.thread_time() - cpu) * 1e3
        if om.last.result == OffloadResult.OFFLOADED:
            sent.append(om.last.bytes_sent)
            received.append(om.last.bytes_received)
        if sent:   # the same bytes through the same link to a bare pyzmq echo server
            echo_ms = echo.round_trip(sent[-1], received[-1])
        if i < 3:
            continue
        walls.append(wall)
        echoes.append(echo_ms)
        cpus.append(cpu)
        if om.last.result == OffloadResult.OFFLOADED:
            offloaded += 1
            beyond.append(wall - echo_ms - om.last.server_ms)
    bytes_up = statistics.median(sent) if sent else 0.0
    bytes_down = statistics.median(received) if received else 0.0
    floor = floor_ms(link, bytes_up, bytes_down, bare_ms)
    median = statistics.median(walls)
    return {'link': link.name, 'mbps': link.up.mbps, 'rtt_ms': link.rtt_ms,
            'jitter_ms': link.up.jitter_ms, 'loss': link.up.loss, 'calls': calls,
            'offloaded': offloaded, 'bytes_up': bytes_up, 'bytes_down': bytes_down,
            'median_ms': median, 'p99_ms': percentile(walls, 99), 'floor_ms': floor,
            'ratio': median / floor, 'echo_ms': statistics.median(echoes),
            # the link (and the emulator's own forwarding) with a bare echo in place of the
            # server: what any request path would get, bare replay added
            'echo_ratio': (statistics.median(echoes) + bare_ms) / floor,
            'robot_cpu_ms': statistics.median(cpus),
            'robot_beyond_echo_ms': statistics.median(beyond) if beyond else None}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog='bench.gpu_e2e', description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    parser.add_argument('--model', default='resnet18')
    parser.add_argument('--calls', type=int, default=40)
    parser.add_argument('--server-args', default='', help='extra rrto_server options')
    parser.add_argument('--out', help='write the results as JSON here')
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    model, frame = gpu_models.build(args.model)
    bare_ms = bare(model, frame, device, iters=200)['graph_io_ms']
    print(f'{args.model}: bare replay with copies {bare_ms:.3f} ms', flush=True)
    rows = []
    echo = Echo()
    try:
        _run(args, model, frame, bare_ms, echo, rows, argv)
    finally:
        echo.close()
    return 0


def _run(args, model, frame, bare_ms: float, echo, rows: list, argv) -> None:
    from bench.machine import write_results
    from rrto_ros import offload
    from rrto_server.process import ServerProcess, child_env
    with tempfile.TemporaryDirectory() as store, \
            ServerProcess(store, None, *args.server_args.split(), device=args.device) as server, \
            EmulatorProcess(('127.0.0.1', server.port), env=child_env()) as emulator, \
            EmulatorProcess(('127.0.0.1', echo.port), env=child_env()) as echo_link:
        echo.connect(echo_link.port)
        with offload(model, server=f'tcp://127.0.0.1:{emulator.port}', timeout_ms=5000,
                     codec='raw') as om:
            if not om.warmup(frame):
                raise RuntimeError('the server did not record the model')
            for link in links():
                row = measure_link(om, frame, (emulator, echo_link), echo, link, args.calls,
                                   bare_ms)
                row.update(model=args.model, bare_ms=bare_ms)
                print(f"{row['link']:16s} median {row['median_ms']:8.3f} ms  floor "
                      f"{row['floor_ms']:8.3f} ms  ratio {row['ratio']:.3f}  p99 "
                      f"{row['p99_ms']:8.3f}  echo+bare/floor {row['echo_ratio']:.3f}"
                      f"  robot cpu {row['robot_cpu_ms']:.3f}"
                      f"  offloaded {row['offloaded']}/{row['calls']}",
                      flush=True)
                rows.append(row)
                if args.out:   # after every link: a run cut short keeps what it measured
                    write_results(args.out, 'python -m bench.gpu_e2e', argv, rows)


if __name__ == '__main__':
    raise SystemExit(main())
