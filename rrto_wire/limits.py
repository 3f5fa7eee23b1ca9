"""
Every size limit of the wire contract, named once.

The server checks declared sizes against these before it allocates anything;
the client uses the same numbers to stay inside them.
"""

import os

PROTOCOL_VERSION = 2
MAX_HEADER_BYTES = 1 << 20
DEFAULT_MAX_MESSAGE_BYTES = 64 << 20
UPLOAD_CHUNK_BYTES = 8 << 20
MAX_TENSORS = 256
MAX_RANK = 8
MAX_DIM = (1 << 31) - 1               # one dimension; the product is bounded by bytes limits
MAX_DECODED_BYTES = 256 << 20         # one tensor after decoding (codecs)
MAX_PROBE_BYTES = 16 << 20
MAX_JPEG_SIDE = 16384
MAX_NAME_CHARS = 256                  # task, session, upload ids, operator and value names
MAX_KEY_CHARS = 16384                 # replay keys name a whole signature
MAX_DIGESTS = 64
MAX_LIST_ITEMS = 4096                 # operator arguments, fetch lists
MAX_DEPTH = 16                        # nesting of free-form JSON values (operator arguments)
MAX_PRIORITY = 1 << 31
MAX_BLOB_BYTES = 1 << 40
MAX_REPLY_BYTES = 1 << 30             # one reply's tensors, decoded, when no size is expected
REPLY_FRAMING_BYTES = 64 << 10        # frame headers and CURVE boxes of MAX_TENSORS + 1 frames


def reply_bytes(tensor_bytes: int) -> int:
    """
    Return the most bytes on the wire of a reply whose tensors decode to ``tensor_bytes``.

    A header, the tensor frames (a codec may add up to 1/64), their framing.  The robot
    drops a reply past it before it is whole (:mod:`rrto_ros.reply_guard`).
    """
    return MAX_HEADER_BYTES + tensor_bytes + tensor_bytes // 64 + REPLY_FRAMING_BYTES


MAX_REPLY_PART_BYTES = reply_bytes(MAX_REPLY_BYTES)   # ZMQ_MAXMSGSIZE of the robot's sockets

# Frames below this size are copied into ZeroMQ messages instead of sent zero-copy: pyzmq's
# zero-copy bookkeeping (a tracker and a GIL-taking free callback) costs more than a memcpy
# of a camera frame.  Set on every socket as ``socket.copy_threshold``.
COPY_THRESHOLD = int(os.environ.get('RRTO_COPY_THRESHOLD', 1 << 20))
