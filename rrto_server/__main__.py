"""Command line: ``python -m rrto_server --bind tcp://127.0.0.1:5555 --store DIR``."""

from __future__ import annotations

import argparse
import logging
import signal
import sys

from rrto_server.protocol import DEFAULT_MAX_MESSAGE_BYTES
from rrto_server.server import Server, ServerConfig


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
    parser.add_argument('--log-level', default='INFO')
    args = parser.parse_args(argv)
    for name in ('max_replays',):
        if getattr(args, name) < 1:
            parser.error(f'--{name.replace("_", "-")} must be at least 1')
    if args.max_message_mb <= 0 or args.max_replay_mb <= 0:
        parser.error('sizes must be positive')
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
        cpu_backend=args.cpu_backend)


def main(argv: list[str] | None = None) -> int:
    """Run the server until SIGINT or SIGTERM."""
    config = parse_args(argv)
    try:
        server = Server(config)
    except (ValueError, OSError) as exc:
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
