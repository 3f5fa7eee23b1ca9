"""
Page-locked host buffers for a replay's outputs, reused, never under a reply in flight.

A CUDA-graph replay copies its outputs from the device into page-locked host
memory (a device-to-host copy into pageable memory goes through the driver's
staging buffers and is slower), and the reply is sent from those buffers
without another copy.  A buffer may be reused only once its reply no longer
needs it: frames below ZeroMQ's copy threshold are copied into the message
while it is sent, so their set is free when the send returns; larger frames go
out zero-copy and their set is free once libzmq has released them
(:class:`zmq.MessageTracker`, one per zero-copy frame).

:class:`OutputBuffers` keeps up to ``max_sets`` sets per replay.  A request
that finds every set still in flight gets ``None`` and copies into fresh
pageable memory instead (correct, a little slower), as do outputs larger than
``max_bytes`` in total (the page-locked cap).
"""

from __future__ import annotations

import math
import threading
from typing import Callable, Sequence

import torch

MAX_SETS = 4                    # sets per replay: replies of one replay in flight at once
MAX_BYTES = 64 << 20            # the page-locked cap per set (all outputs of one request)


class BufferSet:
    """One request's output buffers; :meth:`release` hands them back (once)."""

    __slots__ = ('tensors', 'nbytes', '_pool', '_trackers', '_held')

    def __init__(self, pool: 'OutputBuffers', tensors: list[torch.Tensor]):
        self.tensors = tensors
        self.nbytes = sum(t.nbytes for t in tensors)
        self._pool = pool
        self._trackers: Sequence = ()
        self._held = False

    @property
    def free(self) -> bool:
        """Return True when no request holds the set and libzmq sent every frame from it."""
        return not self._held and all(t.done for t in self._trackers)

    def release(self, trackers: Sequence = ()) -> None:
        """Give the set back; it is reused once every tracker (zero-copy frames) is done."""
        self._pool.give_back(self, trackers)


class OutputBuffers:
    """Up to ``max_sets`` page-locked buffer sets for outputs of the given shapes and dtypes."""

    def __init__(self, specs: Sequence[tuple[Sequence[int], torch.dtype]],
                 max_sets: int = MAX_SETS, max_bytes: int = MAX_BYTES,
                 allocate: Callable[[tuple, torch.dtype], torch.Tensor] | None = None):
        if max_sets < 1:
            raise ValueError('max_sets must be at least 1')
        self.specs = [(tuple(shape), dtype) for shape, dtype in specs]
        self.nbytes = sum(math.prod(shape) * dtype.itemsize for shape, dtype in self.specs)
        self.max_sets = max_sets
        self.enabled = self.nbytes <= max_bytes
        self._allocate = allocate or pinned
        self._sets: list[BufferSet] = []
        self._lock = threading.Lock()
        self.misses = 0           # requests that found every set in flight

    def acquire(self) -> BufferSet | None:
        """Return a free set (allocated on first need), or None if all are in flight or too big."""
        if not self.enabled:
            return None
        with self._lock:
            for buffers in self._sets:
                if buffers.free:
                    buffers._held = True
                    buffers._trackers = ()
                    return buffers
            if len(self._sets) >= self.max_sets:
                self.misses += 1
                return None
            buffers = BufferSet(self, [self._allocate(shape, dtype)
                                       for shape, dtype in self.specs])
            buffers._held = True
            self._sets.append(buffers)
            return buffers

    def give_back(self, buffers: BufferSet, trackers: Sequence = ()) -> None:
        """Mark ``buffers`` as no longer held (see :meth:`BufferSet.release`)."""
        with self._lock:
            if buffers._pool is not self or not buffers._held:
                raise RuntimeError('buffer set released twice or to the wrong pool')
            buffers._trackers = tuple(trackers)
            buffers._held = False

    def __len__(self) -> int:
        with self._lock:
            return len(self._sets)


def pinned(shape: tuple, dtype: torch.dtype) -> torch.Tensor:
    """Return a new page-locked CPU tensor."""
    return torch.empty(shape, dtype=dtype, pin_memory=True)
