r"""
Userspace emulator of the robot-server link: the command line.

The emulator is four modules, one concern each: :mod:`bench.link_config`
(rate specs, directions, presets), :mod:`bench.link_shaper` (when data
passes: bandwidth, delay, jitter, loss), :mod:`bench.link_proxy` (the
shaping TCP proxy, :class:`~bench.link_proxy.LinkEmulator`; its docstring
describes the model) and :mod:`bench.link_process` (the emulator in a child
process).  This module is their command line.

Library::

    with LinkEmulator(upstream=('127.0.0.1', 5555), link=PRESETS['wifi_congested']) as emu:
        robot_endpoint = f'tcp://127.0.0.1:{emu.port}'
        emu.set_link(grid_link(5))          # change the link between two inferences

Command line (``--control``: JSON commands on stdin, used by the benchmarks)::

    python -m bench.linkemu --upstream 127.0.0.1:5555 --listen 127.0.0.1:6000 \
        --preset wifi_congested
    python -m bench.linkemu --upstream 127.0.0.1:5555 --rate 20 --rtt-ms 10 --jitter-ms 2
    python -m bench.linkemu --upstream 127.0.0.1:5555 --steps 100:3,5:3,50:3 --rtt-ms 4
    python -m bench.linkemu --upstream 127.0.0.1:5555 --rtt-ms 40 \
        --trace cellular_mahimahi/Verizon-LTE-short.up \\
        --down-trace cellular_mahimahi/Verizon-LTE-short.down
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from bench.link_config import PRESETS, LinkConfig, symmetric
from bench.link_proxy import LinkEmulator


def _address(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(':')
    return host or '127.0.0.1', int(port)


def link_from_args(args: argparse.Namespace) -> LinkConfig:
    if args.link_json:
        return LinkConfig.from_json(json.loads(args.link_json))
    if args.preset:
        return PRESETS[args.preset]
    rate = down = None
    if args.rate is not None:
        rate = {'mbps': args.rate}
    elif args.steps:
        rate = {'steps': [[float(x) for x in s.split(':')] for s in args.steps.split(',')]}
    elif args.trace:
        rate = {'trace': args.trace, 'offset_s': args.offset_s}
        down = {'trace': args.down_trace or args.trace, 'offset_s': args.offset_s}
    if args.down_rate is not None:
        down = {'mbps': args.down_rate}
    return symmetric('cli', rate, args.rtt_ms, args.jitter_ms, args.loss, args.stall_ms,
                     down_rate=down)


def _serve_control(emu: LinkEmulator) -> None:
    for line in sys.stdin:
        try:
            request = json.loads(line)
            if request['cmd'] == 'stop':
                break
            if request['cmd'] == 'set':
                emu.set_link(LinkConfig.from_json(request['link']))
                reply = {'ok': True}
            elif request['cmd'] == 'stats':
                reply = {'ok': True, 'stats': emu.stats()}
            else:
                reply = {'ok': False, 'error': f'unknown command {request["cmd"]!r}'}
        except (ValueError, KeyError, TypeError, OSError) as exc:
            reply = {'ok': False, 'error': f'{type(exc).__name__}: {exc}'}
        print(json.dumps(reply), flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog='python -m bench.linkemu', description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--upstream', required=True, help='server HOST:PORT')
    parser.add_argument('--listen', default='127.0.0.1:0', help='HOST:PORT for the robot')
    parser.add_argument('--preset', choices=sorted(PRESETS))
    parser.add_argument('--rate', type=float, help='Mbit/s both ways (or uplink with --down-rate)')
    parser.add_argument('--down-rate', type=float, help='downlink Mbit/s')
    parser.add_argument('--steps', help='MBPS:SECONDS,... looping, e.g. 100:3,5:3,50:3')
    parser.add_argument('--trace', help='uplink trace (path or relative to the traces folder)')
    parser.add_argument('--down-trace', help='downlink trace (default: the uplink trace)')
    parser.add_argument('--offset-s', type=float, default=0.0, help='start this far into traces')
    parser.add_argument('--rtt-ms', type=float, default=0.0)
    parser.add_argument('--jitter-ms', type=float, default=0.0)
    parser.add_argument('--loss', type=float, default=0.0, help='per-packet loss probability')
    parser.add_argument('--stall-ms', type=float, default=200.0, help='stall per lost packet')
    parser.add_argument('--link-json', help=argparse.SUPPRESS)
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--control', action='store_true',
                        help='read JSON commands (set, stats, stop) on stdin, answer on stdout')
    args = parser.parse_args(argv)
    try:
        link = link_from_args(args)
        emu = LinkEmulator(_address(args.upstream), link, _address(args.listen), args.seed)
    except (ValueError, OSError) as exc:
        parser.exit(2, f'linkemu: {exc}\n')
    with emu:
        if args.control:
            print(json.dumps({'ok': True, 'port': emu.port}), flush=True)
            _serve_control(emu)
        else:
            print(f'linkemu: 127.0.0.1:{emu.port} -> {args.upstream}: {link}', flush=True)
            try:
                while True:
                    time.sleep(3600)
            except KeyboardInterrupt:
                pass
    return 0


if __name__ == '__main__':
    sys.exit(main())
