"""
Framing of one message between the robot client and rrto_server.

One message is a ZeroMQ multipart message ``[header, tensor_0, tensor_1, ...]``:

* ``header`` is a UTF-8 JSON object, one of the typed headers of
  :mod:`rrto_wire.messages` (``v``, ``kind``, ``id``, ``tensors`` and the
  kind's own fields).  ``tensors`` describes the frames that follow: one
  :class:`~rrto_wire.messages.Frame` ``{"dtype", "shape", "codec"}`` per frame.
* Each tensor frame is the raw, C-contiguous bytes of one tensor (or its
  encoded form when ``codec`` is not ``raw``).  Frames are sent with
  ``copy=False`` and raw frames are decoded as views of the received buffer
  (:func:`~rrto_wire.tensors.tensor_from_buffer`): no pickle, no copies on the
  hot path.

Decoding checks every declared size before allocating: the sum of the
declared tensor sizes against the caller's budget, each raw frame's length,
and each compressed frame against its declared size (see :mod:`rrto_wire.codecs`).
"""

from __future__ import annotations

from typing import Any, Sequence

import msgspec
import numpy
import torch
import zmq
import zmq.backend

from rrto_wire import codecs
from rrto_wire.dtypes import DTYPES, dtype_name
from rrto_wire.errors import ErrorCode, ProtocolError
from rrto_wire.limits import MAX_TENSORS, PROTOCOL_VERSION
from rrto_wire.messages import Frame, Kind, encode_header
from rrto_wire.tensors import NUMPY_VIEW, tensor_frame, tensor_from_buffer

_MORE = int(zmq.SNDMORE | zmq.NOBLOCK)   # ints: pyzmq's flag enums cost a few us a message
_LAST = int(zmq.NOBLOCK)
_SEND = zmq.backend.Socket.send          # below pyzmq's Python ``send`` (send_frames)
_ENCODE = msgspec.json.Encoder().encode     # encode_header's, without its call (issue 11)


def encode(header: dict, tensors: Sequence[torch.Tensor] = (), codec: str = codecs.RAW) -> list:
    """Build the frames of one message; ``header`` gains ``v`` and ``tensors``."""
    if codec == codecs.RAW:
        return encode_raw(dict(header), *raw_body(tensors))
    descriptors, frames = [], []
    for tensor in tensors:
        used, frame = codecs.encode(codec, tensor)
        descriptors.append({'dtype': dtype_name(tensor.dtype), 'shape': tuple(tensor.shape),
                            'codec': used})
        frames.append(frame if used != codecs.RAW else tensor_frame(tensor))
    return encode_raw(dict(header), descriptors, frames)


def raw_body(tensors: Sequence[torch.Tensor]) -> tuple[list[dict], list]:
    """Return the descriptors and zero-copy frames of CPU tensors sent raw (no codec)."""
    return ([{'dtype': dtype_name(t.dtype), 'shape': tuple(t.shape), 'codec': codecs.RAW}
             for t in tensors], [tensor_frame(t) for t in tensors])


def raw_descriptors(tensors: Sequence[torch.Tensor]) -> list[dict]:
    """Return the descriptors of tensors sent raw (no codec): :func:`raw_body`'s, no frames."""
    return [{'dtype': dtype_name(t.dtype), 'shape': tuple(t.shape), 'codec': codecs.RAW}
            for t in tensors]


def encode_raw(header: dict, descriptors: list[dict], frames: list) -> list:
    """
    Build the frames of one message from tensors already described and framed.

    ``header`` is changed in place (it gains ``v`` and ``tensors``): the express
    path keeps one reply's descriptors and frames per replay (see
    :func:`raw_body`) and encodes only its header per request.
    """
    header['v'] = PROTOCOL_VERSION
    header['tensors'] = descriptors
    return [_ENCODE(header)] + frames


def split_header(header: dict, tensors: Sequence[torch.Tensor]) -> tuple[bytes, bytes] | None:
    """
    Return the bytes of a raw message's header before and after its ``id`` (None: not apart).

    ``header`` starts with ``kind`` and ``id`` (an int), as the robot's requests
    do: a message of the same other fields and tensor dtypes and shapes has the
    header ``before + b'%d' % id + after``, byte for byte :func:`encode`'s.
    """
    if list(header)[:2] != ['kind', 'id']:
        return None
    encoded = encode_raw(dict(header, id=0), raw_descriptors(tensors), [])[0]
    before = encode_header({'kind': header['kind']})[:-1] + b',"id":'
    if not encoded.startswith(before + b'0'):
        return None
    return before, encoded[len(before) + 1:]


def _buffer(frame: Any) -> memoryview:
    buf = getattr(frame, 'buffer', None)
    return memoryview(buf if buf is not None else frame)


def message_size(frames: Sequence[Any]) -> int:
    """Return the total payload size of a message in bytes (of any buffer's shape)."""
    total = 0
    for frame in frames:        # bytes, memoryviews, zmq.Frames: each has the buffer protocol
        total += memoryview(frame).nbytes
    return total


def decoded_size(descriptors: Sequence[Frame]) -> int:
    """Return how many bytes the described tensors occupy once decoded."""
    return sum(d.nbytes for d in descriptors)


def decode_tensors(descriptors: Sequence[Frame], frames: Sequence[Any],
                   max_bytes: int) -> list[torch.Tensor]:
    """
    Decode the tensor frames that follow a header, zero-copy for raw frames.

    ``max_bytes`` bounds the whole message once decoded; it is checked against
    the declared shapes before any frame is touched.
    """
    if len(descriptors) != len(frames):
        raise ProtocolError(
            ErrorCode.BAD_REQUEST,
            f'header describes {len(descriptors)} tensors but {len(frames)} frames follow')
    if len(frames) > MAX_TENSORS:
        raise ProtocolError(ErrorCode.TOO_LARGE, f'{len(frames)} tensors exceed {MAX_TENSORS}')
    sizes = [d.nbytes for d in descriptors]
    total = sum(sizes)
    if total > max_bytes:
        raise ProtocolError(ErrorCode.TOO_LARGE,
                            f'tensors decode to {total} bytes, more than {max_bytes}')
    tensors = []
    for index, (desc, frame, size) in enumerate(zip(descriptors, frames, sizes)):
        buf = _buffer(frame)
        if desc.codec != codecs.RAW:
            tensors.append(codecs.decode(desc.codec, buf, desc, index, max_bytes))
            continue
        if len(buf) != size:
            raise ProtocolError(
                ErrorCode.BAD_REQUEST,
                f'tensor {index} ({desc}) needs {size} bytes, frame has {len(buf)}')
        tensors.append(tensor_from_buffer(buf, desc))
    return tensors


def view_raw(descriptors: Sequence[Frame], frames: Sequence[Any],
             sizes: Sequence[int]) -> list[torch.Tensor] | None:
    """
    View raw frames already described and sized (``sizes``) as tensors, zero-copy.

    Returns None when a frame's length is not its size (:func:`decode_tensors`
    names the problem); the caller has compared the descriptors and their count.
    """
    tensors = []
    for desc, frame, size in zip(descriptors, frames, sizes):
        buf = getattr(frame, 'buffer', frame)       # _buffer's: a zmq.Frame's, or the buffer
        if len(buf) != size:
            return None
        entry = DTYPES[desc.dtype]
        if size and entry.view is entry.torch:      # tensor_from_buffer's view, inline
            tensors.append(torch.from_numpy(numpy.frombuffer(buf, NUMPY_VIEW[desc.dtype])
                                            .reshape(desc.shape)))
        else:
            tensors.append(tensor_from_buffer(buf, desc))
    return tensors


def send_frames(sock: zmq.Socket, frames: Sequence[Any]) -> None:
    """
    ``sock.send_multipart(frames, copy=False, flags=NOBLOCK)``, its flags as ints.

    Each part goes to libzmq through pyzmq's compiled ``send``: the Python one in
    front of it only adds routing ids and groups (none on a DEALER), a step per
    part (issue 11).  Every frame is a buffer (bytes, memoryview, ``zmq.Frame``).
    """
    for frame in frames[:-1]:       # once the first part is queued, libzmq takes them all
        _SEND(sock, frame, _MORE, False)
    _SEND(sock, frames[-1], _LAST, False)


def recv_frames(sock: zmq.Socket) -> list:
    """``sock.recv_multipart(copy=False)``: each part says whether more follow."""
    frame = sock.recv(0, copy=False)
    frames = [frame]
    while frame.more:
        frame = sock.recv(0, copy=False)
        frames.append(frame)
    return frames


def error_header(request_id: Any, code: ErrorCode, message: str) -> dict:
    """Return the header of an error reply."""
    return {'kind': Kind.ERROR.value, 'id': request_id, 'code': code.value, 'message': message}


_OK = Kind.OK.value     # once: an enum member's value is a descriptor call


def ok_header(request_id: Any, **fields: Any) -> dict:
    """Return the header of a success reply."""
    header = {'kind': _OK, 'id': request_id}
    header.update(fields)
    return header
