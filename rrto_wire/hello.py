"""
The one out-of-band ``hello``: is a server answering at this endpoint, and what does it say.

:func:`ask_hello` is the request on a connected socket (the client's
background prober uses it on a socket set up like its own, CURVE keys
included); :func:`hello` opens a socket for it (process helpers, bring-up,
tests).  In-band, a connected :class:`rrto_ros.client.Client` sends the same
request through its one call path (``Client.hello``).
"""

from __future__ import annotations

import msgspec
import zmq

from rrto_wire import messages, replies
from rrto_wire import protocol as wire
from rrto_wire.curve import ClientKeys
from rrto_wire.errors import ProtocolError
from rrto_wire.limits import reply_bytes


def ask_hello(sock: zmq.Socket, timeout_ms: float) -> dict | None:
    """
    Send one hello on the connected DEALER ``sock``; return the reply as plain data.

    Returns None when the message could not be sent or nothing answered within
    ``timeout_ms`` (each), the reply was an error, or it did not decode as a
    hello reply (a peer that is not this protocol's server).
    """
    try:
        if not sock.poll(timeout_ms, zmq.POLLOUT):
            return None
        sock.send_multipart(wire.encode({'kind': messages.Kind.HELLO.value, 'id': 0}))
        if not sock.poll(timeout_ms, zmq.POLLIN):
            return None
        reply = replies.decode_reply(sock.recv_multipart()[0], messages.Kind.HELLO)
        return msgspec.to_builtins(reply) if isinstance(reply, replies.HelloOk) else None
    except (zmq.ZMQError, ProtocolError):
        return None


def hello(endpoint: str, timeout_ms: float = 1000,
          keys: ClientKeys | None = None) -> dict | None:
    """Ask ``hello`` on a fresh DEALER socket (CURVE with ``keys``); see :func:`ask_hello`."""
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.MAXMSGSIZE, reply_bytes(0))      # a part: a hello reply is a header
    if keys is not None:
        keys.apply(sock)
    sock.connect(endpoint)
    try:
        return ask_hello(sock, timeout_ms)
    finally:
        sock.close(linger=0)
