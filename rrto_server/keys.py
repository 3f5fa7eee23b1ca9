"""
``rrto-keys``: create and manage the CURVE keys of a server and its robots.

Commands (see ``docs/security.md`` for a fleet how-to)::

    rrto-keys server KEYS_DIR              the server's key pair (KEYS_DIR/server.key[_secret])
    rrto-keys client OUT_DIR NAME          a robot's key pair (OUT_DIR/NAME.key[_secret])
    rrto-keys allow KEYS_DIR PUBLIC_KEY [--role R --max-priority P --store-mb M --in-flight N
                                         --replays K --replay-mb B]
                                           allow-list a robot's public key with a grant
    rrto-keys revoke KEYS_DIR NAME         remove it (effective within a second, no restart)
    rrto-keys list KEYS_DIR                names and grants (never keys)

Secret files are written with mode 0600.  No command prints key material.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
from dataclasses import asdict
from pathlib import Path

import zmq.auth

from rrto_server.auth import CLIENTS, ROLES, SERVER_KEY, Grant

_NAME = re.compile(r'^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$')


def _name(value: str) -> str:
    if not _NAME.match(value) or value == SERVER_KEY:
        raise argparse.ArgumentTypeError(
            f'{value!r}: names are 1-64 of [A-Za-z0-9_.-], starting alphanumeric, not '
            f'{SERVER_KEY!r}')
    return value


def create_pair(folder: str | os.PathLike, name: str) -> tuple[Path, Path]:
    """Create ``folder/name.key`` (public) and ``folder/name.key_secret`` (mode 0600)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if (folder / f'{name}.key_secret').exists():
        raise FileExistsError(f'{folder / name}.key_secret exists; not overwriting a key')
    old = os.umask(0o077)
    try:
        public, secret = zmq.auth.create_certificates(folder, name)
    finally:
        os.umask(old)
    os.chmod(secret, 0o600)
    os.chmod(public, 0o644)
    return Path(public), Path(secret)


def allow(keys_dir: str | os.PathLike, public_key: str | os.PathLike, grant: Grant,
          name: str | None = None) -> Path:
    """Allow-list a client public key file under ``keys_dir/clients`` with ``grant``."""
    source = Path(public_key)
    _, secret = zmq.auth.load_certificate(source)
    if secret is not None:
        raise ValueError(f'{source} holds a secret key; allow-list the public .key file')
    name = name or source.stem
    clients = Path(keys_dir) / CLIENTS
    clients.mkdir(parents=True, exist_ok=True)
    (clients / f'{name}.json').write_text(json.dumps(asdict(grant), indent=1))
    target = clients / f'{name}.key'
    shutil.copyfile(source, target.with_suffix('.tmp'))
    os.replace(target.with_suffix('.tmp'), target)     # the watcher never sees half a key
    return target


def revoke(keys_dir: str | os.PathLike, name: str) -> bool:
    """Remove a client's key and grant; return False if it was not allowed."""
    clients = Path(keys_dir) / CLIENTS
    present = (clients / f'{name}.key').exists()
    (clients / f'{name}.key').unlink(missing_ok=True)
    (clients / f'{name}.json').unlink(missing_ok=True)
    return present


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog='rrto-keys', description=__doc__.split('\n')[1])
    sub = parser.add_subparsers(dest='command', required=True)
    p = sub.add_parser('server', help="create the server's key pair")
    p.add_argument('keys_dir')
    p = sub.add_parser('client', help="create a robot's key pair")
    p.add_argument('out_dir')
    p.add_argument('name', type=_name)
    p = sub.add_parser('allow', help="allow-list a robot's public key")
    p.add_argument('keys_dir')
    p.add_argument('public_key')
    p.add_argument('--name', type=_name)
    p.add_argument('--role', choices=ROLES, default=Grant.role)
    p.add_argument('--max-priority', type=int, default=Grant.max_priority)
    p.add_argument('--store-mb', type=int, default=Grant.store_bytes >> 20)
    p.add_argument('--in-flight', type=int, default=Grant.max_in_flight)
    p.add_argument('--replays', type=int, default=Grant.max_replays,
                   help='replays the server keeps for this key')
    p.add_argument('--replay-mb', type=int, default=Grant.replay_bytes >> 20,
                   help='device memory of the replays the server keeps for this key')
    p = sub.add_parser('revoke', help="remove a robot's key")
    p.add_argument('keys_dir')
    p.add_argument('name', type=_name)
    p = sub.add_parser('list', help='show allowed names and grants')
    p.add_argument('keys_dir')
    args = parser.parse_args(argv)
    try:
        if args.command == 'server':
            public, _ = create_pair(args.keys_dir, SERVER_KEY)
            (Path(args.keys_dir) / CLIENTS).mkdir(exist_ok=True)
            print(f'server key pair in {args.keys_dir}; give robots {public}')
        elif args.command == 'client':
            public, secret = create_pair(args.out_dir, args.name)
            print(f'robot key pair {secret} (keep on the robot); allow-list {public} on servers')
        elif args.command == 'allow':
            grant = Grant.from_json({'role': args.role, 'max_priority': args.max_priority,
                                     'store_bytes': args.store_mb << 20,
                                     'max_in_flight': args.in_flight,
                                     'max_replays': args.replays,
                                     'replay_bytes': args.replay_mb << 20})
            print(f'allowed {allow(args.keys_dir, args.public_key, grant, args.name)}')
        elif args.command == 'revoke':
            if not revoke(args.keys_dir, args.name):
                print(f'{args.name} was not allowed', file=sys.stderr)
                return 1
            print(f'revoked {args.name}')
        else:
            for key in sorted((Path(args.keys_dir) / CLIENTS).glob('*.key')):
                grant = key.with_suffix('.json')
                print(key.stem, grant.read_text().replace('\n', '') if grant.exists() else '')
    except (OSError, ValueError) as exc:
        print(f'rrto-keys: {exc}', file=sys.stderr)
        return 2
    return 0


if __name__ == '__main__':
    sys.exit(main())
