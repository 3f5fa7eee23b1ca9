"""
A byte budget for uploads waiting for the server's control thread.

Uploads (``put``) are written to the store by one control thread, which also
runs the sandbox's trial of a newly recorded model (up to minutes).  Chunks
that arrive meanwhile wait in its queue, each holding a whole message; the
budget bounds them, and a chunk beyond it is answered ``overloaded`` (the
client sends it again later) instead of being held.
"""

from __future__ import annotations

import threading

from rrto_wire.errors import ErrorCode, ProtocolError


class PutQueue:
    """Bytes of queued uploads: at most ``max_bytes`` (one message is always let in)."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self.queued = 0
        self._lock = threading.Lock()

    def enter(self, nbytes: int) -> None:
        """Count ``nbytes`` more as queued, or raise ``overloaded`` if they do not fit."""
        with self._lock:
            if self.queued and self.queued + nbytes > self.max_bytes:
                raise ProtocolError(ErrorCode.OVERLOADED,
                                    f'{self.queued} bytes of uploads are queued; send this '
                                    'chunk again later')
            self.queued += nbytes

    def leave(self, nbytes: int) -> None:
        """Count ``nbytes`` as no longer queued (the control thread took them)."""
        with self._lock:
            self.queued -= nbytes
