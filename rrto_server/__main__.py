"""Command line: ``python -m rrto_server --bind tcp://127.0.0.1:5555 --store DIR``."""

from __future__ import annotations

import argparse
import logging
import signal
import sys

import zmq

from rrto_server import options
from rrto_server.options import ServerConfig
from rrto_server.server import Server
from rrto_wire import heap


def parse_args(argv: list[str] | None = None) -> ServerConfig:
    """Return the ServerConfig the command line asks for (exit 2 on a bad option)."""
    return _parse(argv)[0]


def _parse(argv: list[str] | None) -> tuple[ServerConfig, str]:
    parser = argparse.ArgumentParser(
        prog='rrto_server', description=__doc__,
        epilog='server_node takes the same options as ROS parameters (config/server.yaml).')
    options.add_arguments(parser)
    parser.add_argument('--log-level', default='INFO',
                        choices=('DEBUG', 'INFO', 'WARNING', 'ERROR'), type=str.upper)
    args = parser.parse_args(argv)
    try:
        return options.config_from_args(args), args.log_level
    except ValueError as exc:
        parser.error(str(exc))


def main(argv: list[str] | None = None) -> int:
    """Run the server until SIGINT or SIGTERM."""
    config, log_level = _parse(argv)
    logging.basicConfig(level=log_level, format='%(asctime)s %(levelname)s %(name)s: %(message)s')
    options.setup_process(config)
    heap.enable()       # this process's long-lived heap is frozen where it is built
    before = options.threads_now()
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
        options.drain_threads(before)   # no thread may still be inside torch at exit
    return 0


if __name__ == '__main__':
    sys.exit(main())
