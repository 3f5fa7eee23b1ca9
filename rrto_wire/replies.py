"""
Every reply header: ``ok`` with the fields of the request kind it answers, or ``error``.

Replies are decoded against the request kind they answer (:func:`decode_reply`),
strictly, like requests (:mod:`rrto_wire.messages`).
"""

from __future__ import annotations

from typing import Annotated, Any, Union

import msgspec

from rrto_wire.messages import Kind, Message, decode_header


class Error(Message, tag='error', kw_only=True):
    """The error reply to any request."""

    code: Annotated[str, msgspec.Meta(max_length=64)]
    message: Annotated[str, msgspec.Meta(max_length=4096)] = ''
    server_ms: float = 0.0


class Ok(Message, tag='ok', kw_only=True):
    """Fields of every success reply."""

    server_ms: float = 0.0


class HelloOk(Ok, tag='ok', kw_only=True):
    """The server's identity and limits."""

    server: str
    protocol: int
    device: str
    upload: bool
    max_message_bytes: int
    chunk_bytes: int


class MissingOk(Ok, tag='ok', kw_only=True):
    """The digests the store lacks."""

    missing: list[str]


class PutOk(Ok, tag='ok', kw_only=True):
    """Whether the blob is now complete and verified."""

    complete: bool


class RecordOk(Ok, tag='ok', kw_only=True):
    """What was recorded (or found already recorded)."""

    replay: str
    recorded: bool
    record_ms: float
    segments: int
    backend: str
    nbytes: int
    label: str | None
    utilisation: float | None
    segment_ms: list[float]


class InferTiming(msgspec.Struct, forbid_unknown_fields=True):
    """Where an inference spent its time on the server."""

    queue_ms: float                 # arrival to the first step (prepare_ms included)
    compute_ms: float
    prepare_ms: float = 0.0         # arrival to the device queue: checks, decoding, staging
    segments: int = 1
    preemptions: int = 0
    packed_steps: int = 0
    deadline_missed: bool = False


class InferOk(Ok, tag='ok', kw_only=True):
    """The outputs (as tensor frames) and their timing."""

    timing: InferTiming


class OpOk(Ok, tag='ok', kw_only=True):
    """Fetched tensors (as frames) and timing."""

    timing: InferTiming


class ReleaseOk(Ok, tag='ok', kw_only=True):
    """Session dropped."""


class StatsOk(Ok, tag='ok', kw_only=True):
    """Server counters (see ``Server.snapshot``)."""

    stats: dict[str, Any]


class ProfileOk(Ok, tag='ok', kw_only=True):
    """Per-operator times of a program on the server's device."""

    profile: dict[str, Any]
    device: str


class ProbeOk(Ok, tag='ok', kw_only=True):
    """How many bytes the probe brought (and ``reply_bytes`` zeros as one frame)."""

    received_bytes: int


class EvictOk(Ok, tag='ok', kw_only=True):
    """What an eviction dropped: replays, and blobs deleted or kept (used by another model)."""

    replays: int
    unloaded: bool
    deleted: list[str]
    kept: list[str]


REPLY_TYPES: dict[Kind, type] = {
    Kind.HELLO: HelloOk, Kind.MISSING: MissingOk, Kind.PUT: PutOk, Kind.RECORD: RecordOk,
    Kind.INFER: InferOk, Kind.OP: OpOk, Kind.RELEASE: ReleaseOk, Kind.STATS: StatsOk,
    Kind.PROFILE: ProfileOk, Kind.PROBE: ProbeOk, Kind.EVICT: EvictOk}

_REPLIES = {kind: msgspec.json.Decoder(Union[ok, Error]) for kind, ok in REPLY_TYPES.items()}
_ERRORS = msgspec.json.Decoder(Error)


def decode_reply(frame: Any, kind: Kind | None) -> Ok | Error:
    """
    Decode the reply to a request of ``kind`` (None: only an error reply is valid).

    Raises ProtocolError when the header is not a valid reply to that kind.
    """
    return decode_header(_REPLIES[kind] if kind is not None else _ERRORS, frame, request=False)
