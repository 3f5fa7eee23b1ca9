"""Command line: ``python -m rrto_server --bind tcp://127.0.0.1:5555 --store DIR``."""

from __future__ import annotations

import argparse
import logging
import signal
import sys

import zmq

from rrto_wire import strategy as strategy_file
from rrto_wire.limits import DEFAULT_MAX_MESSAGE_BYTES
from rrto_server.lanes import DROP, LATE_POLICIES
from rrto_server.scheduler import POLICIES, PREEMPTIVE
from rrto_server.server import Server, ServerConfig

GIL_SWITCH_S = 0.0005


def parse_args(argv: list[str] | None = None) -> ServerConfig:
    parser = argparse.ArgumentParser(prog='rrto_server', description=__doc__)
    parser.add_argument('--bind', default='tcp://127.0.0.1:5555',
                        help='ZeroMQ endpoint to bind (default: %(default)s)')
    parser.add_argument(
        '--store',
        default='rrto_store',
        help='directory of the content-addressed model store (default: %(default)s)')
    parser.add_argument('--device', default='auto',
                        help="'auto' (CUDA if available), 'cpu', 'cuda' or 'cuda:N'")
    parser.add_argument('--no-upload', action='store_true',
                        help='refuse uploads; serve only models already in the store')
    parser.add_argument('--max-message-mb', type=float, default=DEFAULT_MAX_MESSAGE_BYTES / 2**20,
                        help='largest request accepted, in MiB (default: %(default)s)')
    parser.add_argument('--max-replays', type=int, default=32,
                        help='recorded replays kept before the least recently used is dropped')
    parser.add_argument('--max-replay-mb', type=float, default=8192,
                        help='device memory for recorded replays, in MiB (default: %(default)s)')
    parser.add_argument(
        '--cpu-backend',
        choices=(
            'fx',
            'frozen'),
        default='fx',
        help='CPU replay: the recorded fx graph (bit-exact with local eager), or a frozen '
             'TorchScript trace (folds batch norm; differs ~1e-4 relative)')
    parser.add_argument('--threads', type=int, default=0,
                        help='torch intra-op threads of this process (0: torch default)')
    sched = parser.add_argument_group('GPU scheduler (docs/scheduler.md)')
    sched.add_argument('--sched-policy', choices=POLICIES, default=PREEMPTIVE,
                       help='fifo, priority (no preemption) or preemptive (re-pick after '
                            'every segment; default)')
    sched.add_argument('--pack-theta', type=float, default=None,
                       help='packing threshold: a lower-priority segment runs beside a '
                            'higher-priority one while their utilisations sum to at most this; '
                            '0 turns packing off (default: 1.0 on CUDA, off on CPU)')
    sched.add_argument('--strategy', metavar='FILE',
                       help='strategy file from rrto-plan-tasks: its theta is the packing '
                            'threshold unless --pack-theta is given')
    sched.add_argument('--profile-util', choices=('auto', 'on', 'off'), default='auto',
                       help='profile each replay\'s utilisation when recording (auto: when '
                            'packing is on)')
    sched.add_argument('--late-policy', choices=LATE_POLICIES, default=DROP,
                       help='requests whose deadline passed before they start: drop (answer '
                            'deadline_missed at once) or run late; a request\'s own "late" '
                            'field wins (default: %(default)s)')
    sched.add_argument('--task-late', action='append', default=[], metavar='TASK=POLICY',
                       help='late policy for one task, e.g. --task-late slam=run (repeatable)')
    sched.add_argument('--cpu-workers', type=int, default=2,
                       help='threads for decoding, staging and encoding (default: %(default)s)')
    sched.add_argument('--inline-max-ms', type=float, default=5.0, metavar='MS',
                       help='when the device is idle, serve raw-frame requests of replays whose '
                            'segments take at most MS on the I/O thread, skipping two thread '
                            'hand-offs (0: never; default: %(default)s)')
    sched.add_argument('--sched-trace', type=int, default=0, metavar='N',
                       help='keep the last N device steps in the stats (default: off)')
    trust = parser.add_argument_group('trust (docs/security.md)')
    trust.add_argument('--keys', metavar='DIR',
                       help="CURVE key directory made by rrto-keys; required unless the bind "
                            "address is loopback or --insecure is given")
    trust.add_argument('--insecure', action='store_true',
                       help='serve plain TCP on a non-loopback address (anyone may connect)')
    trust.add_argument('--allow-naive', action='store_true',
                       help='serve per-operator (naive) requests, the baseline mode')
    trust.add_argument('--max-store-mb', type=float, default=32768,
                       help='store quota; least recently used unpinned blobs are evicted')
    trust.add_argument('--program-max-mb', type=float, default=1024,
                       help='memory one call of a model may need (sandbox trial)')
    trust.add_argument('--program-max-s', type=float, default=10.0,
                       help='CPU seconds one call of a model may take (sandbox trial)')
    trust.add_argument('--admission-capacity', type=int, default=64,
                       help='inference requests in flight before low priorities are shed')
    parser.add_argument('--log-level', default='INFO')
    args = parser.parse_args(argv)
    for name in ('max_replays', 'cpu_workers'):
        if getattr(args, name) < 1:
            parser.error(f'--{name.replace("_", "-")} must be at least 1')
    if args.max_message_mb <= 0 or args.max_replay_mb <= 0:
        parser.error('sizes must be positive')
    if args.pack_theta is not None and not 0 <= args.pack_theta <= 2:
        parser.error('--pack-theta must be between 0 (off) and 2')
    if args.strategy and args.pack_theta is None:
        try:
            args.pack_theta = strategy_file.load(args.strategy).theta
        except ValueError as exc:
            parser.error(str(exc))
    task_late = {}
    for item in args.task_late:
        task, _, late = item.rpartition('=')
        if not task or late not in LATE_POLICIES:
            parser.error(f'--task-late expects TASK=drop or TASK=run, got {item!r}')
        task_late[task] = late
    logging.basicConfig(level=args.log_level.upper(),
                        format='%(asctime)s %(levelname)s %(name)s: %(message)s')
    return ServerConfig(
        bind=args.bind,
        store=args.store,
        device=args.device,
        allow_upload=not args.no_upload,
        max_message_bytes=int(
            args.max_message_mb * 2**20),
        max_replays=args.max_replays,
        max_replay_bytes=int(
            args.max_replay_mb * 2**20),
        cpu_backend=args.cpu_backend,
        sched_policy=args.sched_policy,
        pack_theta=args.pack_theta,
        profile_util={'auto': None, 'on': True, 'off': False}[args.profile_util],
        late_policy=args.late_policy,
        task_late=task_late,
        cpu_workers=args.cpu_workers,
        inline_max_ms=args.inline_max_ms,
        threads=args.threads,
        sched_trace=args.sched_trace,
        keys=args.keys, insecure=args.insecure, allow_naive=args.allow_naive,
        max_store_bytes=int(args.max_store_mb * 2**20),
        program_max_bytes=int(args.program_max_mb * 2**20), program_max_s=args.program_max_s,
        admission_capacity=args.admission_capacity)


def main(argv: list[str] | None = None) -> int:
    """Run the server until SIGINT or SIGTERM."""
    config = parse_args(argv)
    # lane threads must get the GIL back quickly after a step (default interval: 5 ms)
    sys.setswitchinterval(GIL_SWITCH_S)
    try:
        server = Server(config)
    except (ValueError, OSError, zmq.ZMQError) as exc:
        print(f'rrto_server: {exc}', file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, lambda *_: server.stop())
    signal.signal(signal.SIGINT, lambda *_: server.stop())
    try:
        server.serve_forever()
    finally:
        server.close()
    return 0


if __name__ == '__main__':
    sys.exit(main())
