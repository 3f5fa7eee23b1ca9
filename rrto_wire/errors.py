"""
Error codes of the wire contract and the one exception that carries them.

Every malformed or unservable request raises :class:`ProtocolError` with an
:class:`ErrorCode`; the server turns it into exactly one ``error`` reply and
keeps serving.  Text that came from the network passes through :func:`clip`
before it goes into a reply or a log line.
"""

from __future__ import annotations

import enum
from typing import Any

import msgspec

MAX_ECHO_CHARS = 120


class ErrorCode(str, enum.Enum):
    """Reasons an error reply gives; clients branch on these, never on text."""

    BAD_REQUEST = 'bad_request'
    VERSION = 'version_mismatch'
    TOO_LARGE = 'too_large'
    UNKNOWN_MODEL = 'unknown_model'
    NOT_RECORDED = 'not_recorded'
    SIGNATURE = 'signature_mismatch'
    UPLOAD_DISABLED = 'upload_disabled'
    DIGEST = 'digest_mismatch'
    RECORD_FAILED = 'record_failed'
    EXEC_FAILED = 'exec_failed'
    DEADLINE = 'deadline_missed'
    OVERLOADED = 'overloaded'
    UNAUTHORIZED = 'unauthorized'       # no valid key (or a revoked one)
    FORBIDDEN = 'forbidden'             # the key's role or quota does not allow this request
    UNSAFE_PROGRAM = 'unsafe_program'   # refused by the operator rules or the sandbox
    BLOB_CORRUPT = 'blob_corrupt'       # a stored blob failed its digest check: upload it again
    BAD_REPLY = 'bad_reply'
    INTERNAL = 'internal'


class ProtocolError(Exception):
    """
    A request that cannot be served, with the code its error reply carries.

    ``request_id`` is the id read from a header that failed to decode, if any.
    """

    request_id = None

    def __init__(self, code: ErrorCode, message: str):
        message = clip(message, 4 * MAX_ECHO_CHARS)
        super().__init__(message)
        self.code = code
        self.message = message


def detached(error: ProtocolError) -> ProtocolError:
    """
    Return ``error`` as a new exception with no traceback and no chained exceptions.

    An exception keeps its traceback, hence every frame between its raise and
    its catch and each frame's values (a refused call's tensors), and the frame
    that caught it holds it back: a reference cycle, freed only by a full
    collection, which a frozen heap (:mod:`rrto_wire.heap`) makes rare (a16 #3:
    20 refused calls kept +458 MiB).  An error kept past its ``except`` block
    (to answer later, or to answer several requests) is kept detached.
    """
    copy = ProtocolError(error.code, error.message)
    copy.request_id = error.request_id
    return copy


def clip(text: object, limit: int = MAX_ECHO_CHARS) -> str:
    """Return ``str(text)`` cut to ``limit`` characters, saying how much was cut."""
    text = str(text)
    if len(text) <= limit:
        return text
    return f'{text[:limit]}...({len(text) - limit} more characters)'


def invalid_program(message: str) -> ProtocolError:
    """Return the ``bad_request`` error for a malformed program or weights blob."""
    return ProtocolError(ErrorCode.BAD_REQUEST, f'invalid program: {clip(message, 400)}')


def decode_program_json(data: bytes, what: str, schema: Any = Any) -> Any:
    """
    Decode a program's or weights index's JSON strictly (msgspec): one error for any malformation.

    Unlike ``json.loads``, msgspec refuses lone UTF-16 surrogates (escapes D800-DFFF),
    which no reply could encode again, and non-JSON literals (``NaN``).
    """
    try:
        return msgspec.json.decode(data, type=schema)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise invalid_program(f'{what} is not valid: {exc}') from None
    except RecursionError:
        raise invalid_program(f'{what} nests too deeply') from None
