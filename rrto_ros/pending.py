"""
A request in flight on an :class:`~rrto_ros.client.RrtoClient`: its reply taken once, or abandoned.

The client serves one request at a time: its lock, taken by ``start()``, is
released when the reply is taken (:meth:`PendingReply.take`, :meth:`PendingReply.result`)
or the request cancelled.
"""

from __future__ import annotations

from typing import Any, Sequence

import msgspec
import torch

from rrto_ros import reply_check
from rrto_wire import replies
from rrto_wire.messages import Kind


class PendingReply:
    """A request in flight; :meth:`result` waits for its reply, :meth:`cancel` abandons it."""

    def __init__(self, client: Any, request_id: int, kind: Kind, deadline: float,
                 expect: Sequence[reply_check.Leaf] | None = None):
        self._client = client
        self._expect = expect
        self._id = request_id
        self._kind = kind
        self._deadline = deadline
        self._open = True

    def _release(self) -> None:
        if self._open:
            self._open = False
            self._client._lock.release()

    def result(self) -> tuple[dict, list[torch.Tensor]]:
        """Wait for the reply; raise ServerUnavailable on timeout, RemoteError on an error."""
        header, tensors = self.take()
        return msgspec.to_builtins(header), tensors

    def take(self) -> tuple[replies.Ok, list[torch.Tensor]]:
        """As :meth:`result`, with the reply's header as decoded (no dict built)."""
        if not self._open:
            raise RuntimeError('this reply was already taken or cancelled')
        try:
            reply_header, reply = self._client._await(self._id, self._kind, self._deadline)
        finally:        # as _release: once, unless cancel() (another thread's) released it
            if self._open:
                self._open = False
                self._client._lock.release()
        return self._client._finish(reply_header, reply, self._expect)

    def cancel(self) -> None:
        """Stop waiting; a late reply is recognised by its id and dropped."""
        self._release()
