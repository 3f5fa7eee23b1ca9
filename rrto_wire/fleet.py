"""
The fleet directory's wire contract: which replicas hold a model warm.

A fleet (:mod:`rrto_fleet`) runs one rrto_server replica per GPU and a
directory that maps a model digest to the replica endpoints holding it
recorded.  Robots ask the directory over ZeroMQ (a DEALER to its ROUTER
front), then send every inference straight to a replica with the ordinary
protocol of :mod:`rrto_wire.protocol`.

One message is one frame: a JSON object decoded by one strict schema
(unknown fields, wrong types, out-of-range values and other versions are
refused).  Requests:

* ``hello``: liveness and version.
* ``resolve`` ``model``: the live replicas holding ``model`` warm (``model``
  empty: every live replica, for uploads and other model-less requests).
* ``warm`` ``model``, ``signature``, ``options``, ``replicas``: have at least
  ``replicas`` replicas record the stored model for that input signature and
  record options, then answer as ``resolve`` does, with the ``replay`` id to
  send inferences for (the same on every replica).

Replies are ``ok`` with ``endpoints`` (endpoint and load: the replica's
inferences per second), or ``error`` with a ``code`` and a ``message``.
"""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec

DIRECTORY_VERSION = 1
MAX_MESSAGE_BYTES = 64 << 10
MAX_REPLICAS = 64
MAX_TEXT = 200

Digest = Annotated[str, msgspec.Meta(pattern='^([0-9a-f]{64})?$')]


class Spec(msgspec.Struct, forbid_unknown_fields=True):
    """One input tensor's dtype and shape, as in a ``record`` request."""

    dtype: Annotated[str, msgspec.Meta(max_length=16)]
    shape: Annotated[list[Annotated[int, msgspec.Meta(ge=0)]], msgspec.Meta(max_length=8)]


class Request(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True):
    """A robot's request to the directory."""

    v: int
    kind: Literal['hello', 'resolve', 'warm']
    id: Annotated[int, msgspec.Meta(ge=0, lt=1 << 53)]
    model: Digest = ''
    signature: Annotated[list[Spec], msgspec.Meta(max_length=256)] = []
    options: Annotated[dict[Annotated[str, msgspec.Meta(max_length=32)],
                            Annotated[str, msgspec.Meta(max_length=64)]],
                       msgspec.Meta(max_length=8)] = {}
    replicas: Annotated[int, msgspec.Meta(ge=1, le=MAX_REPLICAS)] = 1


class Holder(msgspec.Struct, forbid_unknown_fields=True):
    """One replica endpoint and its load (inferences per second)."""

    endpoint: str
    load: float = 0.0


class Reply(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True):
    """The directory's answer to one request."""

    v: int
    kind: Literal['ok', 'error']
    id: int
    endpoints: list[Holder] = []
    replay: str = ''      # warm: the replay id the holders recorded (the same on each)
    code: str = ''
    message: str = ''


class DirectoryError(Exception):
    """A request the directory cannot serve, with the code its error reply carries."""

    def __init__(self, code: str, message: str):
        super().__init__(f'{code}: {message}')
        self.code = code
        self.message = message[:MAX_TEXT]


_REQUEST = msgspec.json.Decoder(Request)
_REPLY = msgspec.json.Decoder(Reply)
_ENCODER = msgspec.json.Encoder()


def decode_request(frame: bytes | memoryview) -> Request:
    """Decode one request; raise DirectoryError (``bad_request``/``version_mismatch``)."""
    if len(frame) > MAX_MESSAGE_BYTES:
        raise DirectoryError('too_large', f'request of {len(frame)} bytes')
    try:
        request = _REQUEST.decode(frame)
    except msgspec.DecodeError as exc:   # ValidationError is a DecodeError
        raise DirectoryError('bad_request', str(exc)) from None
    if request.v != DIRECTORY_VERSION:
        raise DirectoryError('version_mismatch',
                             f'directory protocol {request.v} (this is {DIRECTORY_VERSION})')
    return request


def decode_reply(frame: bytes | memoryview) -> Reply:
    """Decode one reply; raise DirectoryError if it is not a valid reply."""
    try:
        reply = _REPLY.decode(frame)
    except msgspec.DecodeError as exc:
        raise DirectoryError('bad_reply', str(exc)) from None
    if reply.v != DIRECTORY_VERSION:
        raise DirectoryError('version_mismatch', f'directory answered protocol {reply.v}')
    return reply


def encode(message: Request | Reply) -> bytes:
    """Return the one frame of a request or a reply."""
    return _ENCODER.encode(message)


def ok(request_id: int, endpoints: list[Holder], replay: str = '') -> Reply:
    """Return a success reply listing ``endpoints`` (and, for ``warm``, the replay id)."""
    return Reply(DIRECTORY_VERSION, 'ok', request_id, endpoints=endpoints, replay=replay)


def error(request_id: int, code: str, message: str) -> Reply:
    """Return an error reply (the message truncated)."""
    return Reply(DIRECTORY_VERSION, 'error', request_id, code=code, message=message[:MAX_TEXT])
