"""
Command line: ``python -m rrto_fleet --replicas 2 --directory tcp://0.0.0.0:5600 -- OPTIONS``.

Connects to a Ray cluster (``--address``, default: start a local one), starts
the replicas and the directory (:func:`rrto_fleet.ray_fleet.start_fleet`) and
runs until SIGINT or SIGTERM.  Everything after ``--`` is an option of
``python -m rrto_server`` and applies to every replica; the host of its
``--bind`` is where replicas listen (each on a free port), its ``--store``
must be shared by all of them (a shared filesystem across hosts).
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading

from rrto_fleet.directory import Policy
from rrto_server.__main__ import parse_args as server_args


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(prog='rrto_fleet', description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--address', default=None,
                        help="Ray cluster to join ('auto', 'ray://...'; default: start one)")
    parser.add_argument('--replicas', type=int, default=1, help='replicas (default: 1)')
    parser.add_argument('--gpus-per-replica', type=float, default=1.0,
                        help='GPUs each replica reserves (default: %(default)s)')
    parser.add_argument('--directory', default='tcp://0.0.0.0:5600',
                        help='endpoint the directory binds for robots (default: %(default)s)')
    parser.add_argument('--fleet-key', default=None, metavar='KEY_SECRET',
                        help='with --keys: a client .key_secret allow-listed in that key '
                             'directory, used by the replicas to record models')
    parser.add_argument('--scale-up', type=float, default=Policy.scale_up, metavar='PER_S',
                        help='inferences/s per replica above which a model gains a replica')
    parser.add_argument('--scale-down', type=float, default=Policy.scale_down, metavar='PER_S',
                        help='inferences/s per replica (one fewer) below which it loses one')
    argv = sys.argv[1:] if argv is None else argv
    split = argv.index('--') if '--' in argv else len(argv)
    args = parser.parse_args(argv[:split])
    if args.replicas < 1 or args.gpus_per_replica < 0:
        parser.error('--replicas must be at least 1 and --gpus-per-replica non-negative')
    if not 0 <= args.scale_down < args.scale_up:
        parser.error('--scale-down must be below --scale-up')
    return args, argv[split + 1:]


def main(argv: list[str] | None = None) -> int:
    """Start the fleet and serve until SIGINT or SIGTERM."""
    args, rest = parse_args(argv)
    config = server_args(rest)
    import ray
    from rrto_fleet.ray_fleet import runtime_env, start_fleet
    ray.init(address=args.address, runtime_env=runtime_env(), include_dashboard=False)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    fleet = start_fleet(config, args.replicas, args.directory, args.gpus_per_replica,
                        Policy(args.scale_up, args.scale_down), fleet_key=args.fleet_key)
    print(f'rrto_fleet: directory at {fleet.endpoint}, {args.replicas} replicas', flush=True)
    stop.wait()
    fleet.stop()
    ray.shutdown()
    return 0


if __name__ == '__main__':
    sys.exit(main())
