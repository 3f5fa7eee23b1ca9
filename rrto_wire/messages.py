"""
Every message header of the protocol as a typed, strictly decoded struct.

A header is one JSON object tagged by ``kind``.  Requests and replies are
:class:`msgspec.Struct` types with ``forbid_unknown_fields``; types, ranges,
string lengths, list lengths and shape dimensions are part of the schema, so a
header that decodes is a header the server can use.  :func:`decode_request`
and :func:`rrto_wire.replies.decode_reply` are the only places headers are decoded; every
failure is a :class:`~rrto_wire.errors.ProtocolError` with a client error code
(``bad_request``, ``version_mismatch`` or ``too_large``), never anything else.

This module holds the kinds and the requests; the replies (decoded against
the request kind they answer) are in :mod:`rrto_wire.replies`.
"""

from __future__ import annotations

import enum
from typing import Annotated, Any, Literal, Union

import msgspec

from rrto_wire.codecs import CodecName
from rrto_wire.errors import ErrorCode, ProtocolError, clip
from rrto_wire.limits import (MAX_BLOB_BYTES, MAX_DEPTH, MAX_DIGESTS, MAX_HEADER_BYTES,
                              MAX_KEY_CHARS, MAX_LIST_ITEMS, MAX_NAME_CHARS, MAX_PRIORITY,
                              MAX_TENSORS, PROTOCOL_VERSION)
from rrto_wire.tensors import TensorSpec


class Kind(str, enum.Enum):
    """Message kinds; requests first, then the two reply kinds."""

    HELLO = 'hello'        # version check and liveness probe
    MISSING = 'missing'    # which of these blob digests does the store lack?
    PUT = 'put'            # one chunk of a blob upload
    RECORD = 'record'      # record a replay for (model, signature, options)
    INFER = 'infer'        # run a recorded replay on input tensors
    OP = 'op'              # naive mode: run one operator, keep results remote
    RELEASE = 'release'    # naive mode: drop a session's remote tensors
    STATS = 'stats'        # server and per-model counters
    PROFILE = 'profile'    # per-operator compute times of a stored program on the server
    PROBE = 'probe'        # link measurement: optional uint8 payload up, ``reply_bytes`` down
    EVICT = 'evict'        # admin: drop a model's replays (and its stored blobs)
    OK = 'ok'
    ERROR = 'error'


REPLY_KINDS = frozenset({Kind.OK.value, Kind.ERROR.value})
KIND_OF = {kind.value: kind for kind in Kind}    # a decoded tag's kind, without Kind()

Name = Annotated[str, msgspec.Meta(max_length=MAX_NAME_CHARS)]
Digest = Annotated[str, msgspec.Meta(pattern='^[0-9a-f]{64}$')]
RequestId = Union[Annotated[int, msgspec.Meta(ge=-(1 << 62), le=1 << 62)], Name, None]
Count = Annotated[int, msgspec.Meta(ge=0, le=MAX_BLOB_BYTES)]


class Frame(TensorSpec, frozen=True):
    """Descriptor of one tensor frame: the tensor's spec and how its bytes travel."""

    codec: CodecName = 'raw'


Frames = Annotated[list[Frame], msgspec.Meta(max_length=MAX_TENSORS)]


def _depth(value: Any, limit: int) -> int:
    if limit < 0:
        raise ValueError(f'nests deeper than {MAX_DEPTH} levels')
    if isinstance(value, list):
        return 1 + max((_depth(v, limit - 1) for v in value), default=0)
    if isinstance(value, dict):
        return 1 + max((_depth(v, limit - 1) for v in value.values()), default=0)
    return 0


class Message(msgspec.Struct, tag_field='kind', forbid_unknown_fields=True, kw_only=True):
    """Fields every header carries."""

    v: int
    id: RequestId = None
    tensors: Frames = []


# ------------------------------------------------------------------------------- requests

class Scheduled(Message, kw_only=True):
    """Scheduling fields of requests that run on the device (see ``rrto_server.scheduler``)."""

    priority: Annotated[int, msgspec.Meta(ge=-MAX_PRIORITY, le=MAX_PRIORITY)] = 0
    deadline_ms: Annotated[float, msgspec.Meta(gt=0, le=1e9)] | None = None
    task: Annotated[str, msgspec.Meta(max_length=128)] = ''
    late: Literal['drop', 'run'] | None = None


class RecordOptions(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """What a client may choose per recording."""

    precision: Literal['fp32', 'tf32', 'fp16', 'bf16'] = 'fp32'
    mode: Literal['replay', 'eager'] = 'replay'
    segments: Annotated[str, msgspec.Meta(max_length=32)] = 'whole'

    @property
    def key(self) -> str:
        """Return the options' part of a replay key."""
        return f'{self.precision}/{self.mode}/{self.segments}'

    def to_json(self) -> dict:
        """Return the options as plain JSON data."""
        return msgspec.structs.asdict(self)


class Hello(Message, tag='hello', kw_only=True):
    """Version check and liveness probe."""


class Missing(Message, tag='missing', kw_only=True):
    """Ask which of these blob digests the store lacks."""

    digests: Annotated[list[Digest], msgspec.Meta(max_length=MAX_DIGESTS)]


class Put(Message, tag='put', kw_only=True):
    """One chunk of a blob upload (one uint8 tensor frame)."""

    digest: Digest
    blob_kind: Annotated[str, msgspec.Meta(max_length=32)]
    upload: Annotated[str, msgspec.Meta(max_length=64)]
    offset: Count
    total: Count


class Record(Scheduled, tag='record', kw_only=True):
    """Record a replay of ``model`` for ``signature`` with ``options``."""

    model: Digest
    signature: Annotated[tuple[TensorSpec, ...], msgspec.Meta(max_length=MAX_TENSORS)]
    options: RecordOptions = RecordOptions()


class Infer(Scheduled, tag='infer', kw_only=True):
    """Run a recorded replay on the attached tensors."""

    replay: Annotated[str, msgspec.Meta(max_length=MAX_KEY_CHARS)]


class Op(Scheduled, tag='op', kw_only=True):
    """Naive mode: run one operator of a stored program, keep its result remote."""

    model: Digest
    session: Name
    op: Name | None = None
    args: Annotated[list[Any], msgspec.Meta(max_length=MAX_LIST_ITEMS)] = []
    kwargs: Annotated[dict[Name, Any], msgspec.Meta(max_length=MAX_LIST_ITEMS)] = {}
    out: Name | None = None
    inputs: Annotated[list[Name], msgspec.Meta(max_length=MAX_TENSORS)] = []
    fetch: Annotated[list[Name], msgspec.Meta(max_length=MAX_LIST_ITEMS)] = []
    end: bool = False

    def __post_init__(self):
        """Bound the nesting of the free-form operator arguments."""
        _depth(self.args, MAX_DEPTH)
        _depth(self.kwargs, MAX_DEPTH)


class Release(Message, tag='release', kw_only=True):
    """Naive mode: drop a session's remote tensors."""

    session: Name


class Stats(Message, tag='stats', kw_only=True):
    """Server and per-model counters."""


class Profile(Scheduled, tag='profile', kw_only=True):
    """Per-operator compute times of a stored program on the server's device."""

    model: Digest
    repeats: Annotated[int, msgspec.Meta(ge=1, le=100)] = 5


class Probe(Message, tag='probe', kw_only=True):
    """Link measurement: an optional uint8 payload up, ``reply_bytes`` zeros down."""

    reply_bytes: Count = 0


class Evict(Message, tag='evict', kw_only=True):
    """Admin: drop every replay of ``model``, unload it, and (``store``) delete its blobs."""

    model: Digest
    store: bool = True


Request = Union[Hello, Missing, Put, Record, Infer, Op, Release, Stats, Profile, Probe, Evict]
REQUEST_TYPES: dict[Kind, type] = {Kind(t.__struct_config__.tag): t for t in Request.__args__}

# ------------------------------------------------------------------------------- decoding


class _Peek(msgspec.Struct):
    """The two fields read from a header that failed to decode, to name the problem."""

    v: Any = None
    kind: Any = None
    id: Any = None


_REQUESTS = msgspec.json.Decoder(Request)
_PEEK = msgspec.json.Decoder(_Peek)
_ENCODER = msgspec.json.Encoder()


def _why(raw: memoryview, exc: Exception, request: bool) -> ProtocolError:
    """Turn a decoding failure into the error reply's code and text."""
    if isinstance(exc, RecursionError):
        return ProtocolError(ErrorCode.BAD_REQUEST, 'header nests too deeply')
    if isinstance(exc, msgspec.DecodeError) and not isinstance(exc, msgspec.ValidationError):
        return ProtocolError(ErrorCode.BAD_REQUEST, f'header is not JSON: {clip(exc)}')
    try:
        peek = _PEEK.decode(raw)
    except RecursionError:
        return ProtocolError(ErrorCode.BAD_REQUEST, 'header nests too deeply')
    except msgspec.DecodeError:
        return ProtocolError(ErrorCode.BAD_REQUEST, 'header must be a JSON object')
    error = _named(peek, str(exc), request)
    if isinstance(peek.id, (int, str)) and not isinstance(peek.id, bool) \
            and len(str(peek.id)) <= 20:
        error.request_id = peek.id      # so the sender can match the error to its request
    return error


def _named(peek: _Peek, text: str, request: bool) -> ProtocolError:
    if not (type(peek.v) is int and peek.v == PROTOCOL_VERSION):
        return ProtocolError(ErrorCode.VERSION,
                             f'protocol version {clip(repr(peek.v), 40)} not supported '
                             f'(this side speaks {PROTOCOL_VERSION})')
    if text.endswith('at `$.kind`') or 'missing required field `kind`' in text:
        if request and peek.kind in REPLY_KINDS:
            return ProtocolError(ErrorCode.BAD_REQUEST, f"'{peek.kind}' is a reply kind")
        return ProtocolError(ErrorCode.BAD_REQUEST,
                             f'unknown message kind {clip(repr(peek.kind), 40)}')
    return ProtocolError(ErrorCode.BAD_REQUEST, f'bad header: {clip(text, 300)}')


def decode_header(decoder: msgspec.json.Decoder, frame: Any, request: bool) -> Any:
    """Decode one header frame with ``decoder``; raise ProtocolError naming any problem."""
    buf = getattr(frame, 'buffer', None)        # a zmq.Frame's memory, or the bytes given
    raw = memoryview(buf if buf is not None else frame)
    if len(raw) > MAX_HEADER_BYTES:
        raise ProtocolError(ErrorCode.TOO_LARGE,
                            f'header of {len(raw)} bytes exceeds {MAX_HEADER_BYTES}')
    try:
        message = decoder.decode(raw)
    except (msgspec.DecodeError, RecursionError) as exc:
        raise _why(raw, exc, request) from None
    if message.v != PROTOCOL_VERSION:
        raise ProtocolError(ErrorCode.VERSION,
                            f'protocol version {message.v} not supported '
                            f'(this side speaks {PROTOCOL_VERSION})')
    return message


def decode_request(frame: Any) -> Request:
    """Decode and validate a request header; raise ProtocolError naming the problem."""
    return decode_header(_REQUESTS, frame, request=True)


def encode_header(header: dict) -> bytes:
    """Serialise a header dict (with ``v`` and ``tensors`` already set) as compact JSON."""
    return _ENCODER.encode(header)
