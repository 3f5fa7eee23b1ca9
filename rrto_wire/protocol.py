"""
Wire contract between the robot client and rrto_server.

One message is a ZeroMQ multipart message ``[header, tensor_0, tensor_1, ...]``:

* ``header`` is a UTF-8 JSON object.  Every header carries ``v`` (the protocol
  version), ``kind`` (a :class:`Kind`) and ``id`` (the request id, echoed in the
  reply).  ``tensors`` describes the frames that follow: one descriptor
  ``{"dtype", "shape", "codec"}`` per frame, in order.
* Each tensor frame is the raw, C-contiguous bytes of one tensor (or its
  encoded form when ``codec`` is not ``raw``).  Frames are sent with
  ``copy=False`` and decoded with ``torch.frombuffer`` on the received buffer:
  no pickle, no copies on the hot path.

Every malformed message raises :class:`ProtocolError` with an :class:`ErrorCode`;
the server turns it into an ``error`` reply naming the problem and keeps serving.
"""

from __future__ import annotations

import enum
import json
import math
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import numpy as np
import torch

from rrto_wire import codecs

PROTOCOL_VERSION = 1
MAX_HEADER_BYTES = 1 << 20
DEFAULT_MAX_MESSAGE_BYTES = 64 << 20
UPLOAD_CHUNK_BYTES = 8 << 20
MAX_TENSORS = 256
MAX_RANK = 8
# Frames below this size are copied into ZeroMQ messages instead of sent zero-copy: pyzmq's
# zero-copy bookkeeping (a tracker and a GIL-taking free callback) costs more than a memcpy
# of a camera frame.  Set on every socket as ``socket.copy_threshold``.
COPY_THRESHOLD = int(__import__('os').environ.get('RRTO_COPY_THRESHOLD', 1 << 20))
MAX_PROBE_BYTES = 16 << 20


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
    OK = 'ok'
    ERROR = 'error'


REQUEST_KINDS = frozenset(k for k in Kind if k not in (Kind.OK, Kind.ERROR))


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
    INTERNAL = 'internal'


class ProtocolError(Exception):
    """A request that cannot be served, with the code its error reply carries."""

    def __init__(self, code: ErrorCode, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


# name on the wire -> (torch dtype, numpy dtype used to view the bytes)
_DTYPES: dict[str, tuple[torch.dtype, np.dtype]] = {
    'float32': (torch.float32, np.dtype(np.float32)),
    'float16': (torch.float16, np.dtype(np.float16)),
    'bfloat16': (torch.bfloat16, np.dtype(np.int16)),
    'float64': (torch.float64, np.dtype(np.float64)),
    'uint8': (torch.uint8, np.dtype(np.uint8)),
    'int8': (torch.int8, np.dtype(np.int8)),
    'int16': (torch.int16, np.dtype(np.int16)),
    'int32': (torch.int32, np.dtype(np.int32)),
    'int64': (torch.int64, np.dtype(np.int64)),
    'bool': (torch.bool, np.dtype(np.bool_)),
}
_NAME_OF_DTYPE = {torch_dtype: name for name, (torch_dtype, _) in _DTYPES.items()}


def dtype_name(dtype: torch.dtype) -> str:
    """Return the wire name of a torch dtype, or raise ProtocolError if unsupported."""
    try:
        return _NAME_OF_DTYPE[dtype]
    except KeyError:
        raise ProtocolError(ErrorCode.BAD_REQUEST, f'unsupported dtype {dtype}') from None


def torch_dtype(name: str) -> torch.dtype:
    """Return the torch dtype for a wire name, or raise ProtocolError."""
    try:
        return _DTYPES[name][0]
    except (KeyError, TypeError):
        raise ProtocolError(ErrorCode.BAD_REQUEST, f'unsupported dtype {name!r}') from None


@dataclass(frozen=True)
class TensorSpec:
    """Shape and dtype of one tensor; a tuple of these is an input signature."""

    dtype: str
    shape: tuple[int, ...]

    @classmethod
    def of(cls, tensor: torch.Tensor) -> 'TensorSpec':
        return cls(dtype_name(tensor.dtype), tuple(int(s) for s in tensor.shape))

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * _DTYPES[self.dtype][1].itemsize

    def to_json(self) -> dict:
        return {'dtype': self.dtype, 'shape': list(self.shape)}

    @classmethod
    def from_json(cls, obj: Any) -> 'TensorSpec':
        if not isinstance(obj, dict):
            raise ProtocolError(ErrorCode.BAD_REQUEST, 'tensor spec must be an object')
        torch_dtype(obj.get('dtype'))
        return cls(obj['dtype'], _checked_shape(obj.get('shape')))

    def __str__(self) -> str:
        return f"{self.dtype}[{','.join(map(str, self.shape))}]"


Signature = tuple[TensorSpec, ...]


def signature_of(tensors: Iterable[torch.Tensor]) -> Signature:
    """Return the input signature (dtypes and shapes) of a flat tensor list."""
    return tuple(TensorSpec.of(t) for t in tensors)


def signature_key(signature: Sequence[TensorSpec]) -> str:
    """Return a short canonical string for a signature, e.g. ``uint8[1,224,224,3]``."""
    return ';'.join(str(spec) for spec in signature)


def signature_from_json(obj: Any) -> Signature:
    if not isinstance(obj, list) or len(obj) > MAX_TENSORS:
        raise ProtocolError(ErrorCode.BAD_REQUEST, 'signature must be a list of tensor specs')
    return tuple(TensorSpec.from_json(item) for item in obj)


def _checked_shape(shape: Any) -> tuple[int, ...]:
    if not isinstance(shape, list) or len(shape) > MAX_RANK:
        raise ProtocolError(ErrorCode.BAD_REQUEST,
                            f'shape must be a list of at most {MAX_RANK} ints')
    if not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in shape):
        raise ProtocolError(ErrorCode.BAD_REQUEST,
                            f'shape {shape!r} has a non-integer or negative size')
    return tuple(shape)


def _as_cpu_contiguous(tensor: torch.Tensor) -> torch.Tensor:
    tensor = tensor.detach()
    if tensor.device.type != 'cpu':
        tensor = tensor.cpu()
    return tensor.contiguous()


def tensor_frame(tensor: torch.Tensor) -> memoryview:
    """Return a zero-copy buffer over a CPU tensor's bytes (copies only if not contiguous)."""
    tensor = _as_cpu_contiguous(tensor)
    if tensor.numel() == 0:
        return memoryview(b'')
    if tensor.dtype == torch.bfloat16:
        tensor = tensor.view(torch.int16)
    return memoryview(tensor.numpy().reshape(-1)).cast('B')


def encode(header: dict, tensors: Sequence[torch.Tensor] = (), codec: str = codecs.RAW) -> list:
    """Build the frames of one message; ``header`` gains ``v`` and ``tensors``."""
    descriptors, frames = [], []
    for tensor in tensors:
        spec = TensorSpec.of(tensor)
        used, frame = codecs.encode(codec, tensor)
        descriptors.append({'dtype': spec.dtype, 'shape': list(spec.shape), 'codec': used})
        frames.append(frame if used != codecs.RAW else tensor_frame(tensor))
    full = dict(header)
    full['v'] = PROTOCOL_VERSION
    full['tensors'] = descriptors
    return [json.dumps(full, separators=(',', ':')).encode()] + frames


def _buffer(frame: Any) -> memoryview:
    buf = getattr(frame, 'buffer', None)
    return memoryview(buf if buf is not None else frame)


def message_size(frames: Sequence[Any]) -> int:
    """Return the total payload size of a message in bytes."""
    return sum(len(_buffer(f)) for f in frames)


def decode_header(frame: Any) -> dict:
    """Parse and validate the header frame; raise ProtocolError naming the problem."""
    raw = _buffer(frame)
    if len(raw) > MAX_HEADER_BYTES:
        raise ProtocolError(ErrorCode.TOO_LARGE,
                            f'header of {len(raw)} bytes exceeds {MAX_HEADER_BYTES}')
    try:
        header = json.loads(bytes(raw))
    except (UnicodeDecodeError, ValueError) as exc:
        raise ProtocolError(ErrorCode.BAD_REQUEST, f'header is not JSON: {exc}') from None
    if not isinstance(header, dict):
        raise ProtocolError(ErrorCode.BAD_REQUEST, 'header must be a JSON object')
    if header.get('v') != PROTOCOL_VERSION:
        raise ProtocolError(
            ErrorCode.VERSION,
            f'protocol version {header.get("v")!r} not supported '
            f'(server speaks {PROTOCOL_VERSION})')
    try:
        header['kind'] = Kind(header.get('kind'))
    except ValueError:
        raise ProtocolError(ErrorCode.BAD_REQUEST,
                            f'unknown message kind {header.get("kind")!r}') from None
    if not isinstance(header.get('tensors', []), list):
        raise ProtocolError(ErrorCode.BAD_REQUEST, "'tensors' must be a list")
    return header


def decode_tensors(header: dict, frames: Sequence[Any]) -> list[torch.Tensor]:
    """Decode the tensor frames that follow a header, zero-copy for raw frames."""
    descriptors = header.get('tensors', [])
    if len(descriptors) != len(frames):
        raise ProtocolError(
            ErrorCode.BAD_REQUEST,
            f'header describes {len(descriptors)} tensors but {len(frames)} frames follow')
    if len(frames) > MAX_TENSORS:
        raise ProtocolError(ErrorCode.TOO_LARGE, f'{len(frames)} tensors exceed {MAX_TENSORS}')
    tensors = []
    for index, (desc, frame) in enumerate(zip(descriptors, frames)):
        spec = TensorSpec.from_json(desc)
        codec = desc.get('codec', codecs.RAW)
        buf = _buffer(frame)
        if codec != codecs.RAW:
            tensors.append(codecs.decode(codec, buf, spec.dtype, spec.shape, index))
            continue
        if len(buf) != spec.nbytes:
            raise ProtocolError(
                ErrorCode.BAD_REQUEST,
                f'tensor {index} ({spec}) needs {spec.nbytes} bytes, frame has {len(buf)}')
        tensors.append(tensor_from_buffer(buf, spec))
    return tensors


def tensor_from_buffer(buf: memoryview, spec: TensorSpec) -> torch.Tensor:
    """View a received buffer as a tensor of the given spec without copying."""
    dtype = torch_dtype(spec.dtype)
    if spec.nbytes == 0:
        return torch.empty(spec.shape, dtype=dtype)
    if dtype == torch.bfloat16:
        return torch.frombuffer(buf, dtype=torch.int16).view(torch.bfloat16).reshape(spec.shape)
    return torch.frombuffer(buf, dtype=dtype).reshape(spec.shape)


def error_header(request_id: Any, code: ErrorCode, message: str) -> dict:
    """Return the header of an error reply."""
    return {'kind': Kind.ERROR.value, 'id': request_id, 'code': code.value, 'message': message}


def ok_header(request_id: Any, **fields: Any) -> dict:
    """Return the header of a success reply."""
    header = {'kind': Kind.OK.value, 'id': request_id}
    header.update(fields)
    return header
