"""
CURVE keys on the wire: what a client needs to reach a server that authenticates.

Keys are ZeroMQ certificate files as ``zmq.auth.create_certificates`` writes
them (``rrto-keys`` creates them): ``NAME.key`` holds a public key,
``NAME.key_secret`` the key pair.  A client loads the server's public key and
its own key pair; setting ``curve_serverkey`` makes the client verify that it
talks to that server (the handshake fails otherwise).  Key material is held in
bytes and never formatted into a message or a log line.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import zmq
import zmq.auth


@dataclass(frozen=True)
class ClientKeys:
    """A client's key pair and the public key of the server it trusts."""

    server_public: bytes = field(repr=False)
    public: bytes = field(repr=False)
    secret: bytes = field(repr=False)

    @classmethod
    def load(cls, server_key: str | os.PathLike, client_key: str | os.PathLike) -> 'ClientKeys':
        """
        Load ``server_key`` (the server's public ``.key`` file) and ``client_key``.

        ``client_key`` is the client's ``.key_secret`` file.  Raises ValueError
        naming the file (never its contents) when one is missing or malformed.
        """
        server_public, _ = _load(server_key, secret=False)
        public, secret = _load(client_key, secret=True)
        return cls(server_public, public, secret)

    def apply(self, sock: zmq.Socket) -> None:
        """Make ``sock`` a CURVE client of the server (call before ``connect``)."""
        sock.curve_serverkey = self.server_public
        sock.curve_publickey = self.public
        sock.curve_secretkey = self.secret


def _load(path: str | os.PathLike, secret: bool) -> tuple[bytes, bytes | None]:
    try:
        public, secret_key = zmq.auth.load_certificate(path)
    except (OSError, ValueError):
        raise ValueError(f'cannot read a CURVE key from {os.fspath(path)!r}') from None
    if secret and secret_key is None:
        raise ValueError(f'{os.fspath(path)!r} holds no secret key; pass the .key_secret file')
    if len(public) != 40 or (secret_key is not None and len(secret_key) != 40):
        raise ValueError(f'{os.fspath(path)!r} does not hold Z85 CURVE keys')
    return public, secret_key
