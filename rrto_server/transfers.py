"""
Host <-> device copies of a replay's inputs and outputs, off the device lanes.

(:func:`copy_bytes` is the host-side memcpy of a request's frame into a CUDA
graph's page-locked staging buffer, which the graph then copies itself.)

Each thread (the I/O thread, every CPU worker) has its own CUDA copy stream
and its own page-locked bounce buffers, so a copy never waits for another
thread's and a lane never waits for a copy.  A bulk input is staged in pieces
(:data:`STAGE_CHUNK_BYTES`): one long pageable copy held up the CUDA graphs
that other threads launched meanwhile, an urgent request's among them.
"""

from __future__ import annotations

import math
import threading
from typing import Sequence

import numpy
import torch

from rrto_server.lru import LRU

PINNED_BYTES_PER_THREAD = 64 << 20   # page-locked bounce buffers each thread may keep
# a bulk input is staged in pieces of this size, so an urgent request's graph passes between
# them: beside one pageable copy of a 19 MB batch an express-shaped step (600 KB in, compute,
# out) took 0.95 ms median / 1.58 p99 against 0.047 / 0.091 alone; beside 1 MiB pieces
# 0.099 / 0.37, 4 MiB 0.19 / 0.48 (H200, python -m bench.server_phases --interference)
STAGE_CHUNK_BYTES = 1 << 20

_PER_THREAD = threading.local()


def copy_stream(device: torch.device):
    """Return this thread's CUDA stream for host<->device copies (CPU workers use it)."""
    streams = getattr(_PER_THREAD, 'streams', None)
    if streams is None:
        streams = _PER_THREAD.streams = {}
    key = str(device)
    if key not in streams:
        streams[key] = torch.cuda.Stream(device)
    return streams[key]


def _pinned_cache() -> LRU:
    cache = getattr(_PER_THREAD, 'pinned', None)
    if cache is None:
        cache = _PER_THREAD.pinned = LRU(max_weight=PINNED_BYTES_PER_THREAD,
                                         weight=lambda buf: buf.nbytes)
    return cache


def pinned_buffers() -> list[torch.Tensor]:
    """Return the page-locked bounce buffers this thread keeps (for tests and stats)."""
    return _pinned_cache().values()


def _pinned(shape, dtype: torch.dtype) -> torch.Tensor | None:
    """
    Return this thread's page-locked buffer for (shape, dtype), or None if too large.

    Copies from the device into pageable host memory are staged by the driver
    and slower (0.51-0.61 -> 0.42 ms for keypoint_net's 0.7 MB of outputs on an
    H100 host, copy included); allocating page-locked memory per call costs more
    than it saves, so each thread (the I/O thread, every CPU worker) keeps
    buffers up to ``PINNED_BYTES_PER_THREAD``, least recently used first out.  A
    thread uses a buffer for one copy at a time and waits for that copy.
    """
    nbytes = math.prod(shape) * dtype.itemsize
    if nbytes > PINNED_BYTES_PER_THREAD:
        return None
    cache = _pinned_cache()
    key = (tuple(shape), dtype)
    buf = cache.get(key)
    if buf is None:
        buf = torch.empty(key[0], dtype=dtype, pin_memory=True)
        cache.put(key, buf)
    return buf


def stage(tensors: Sequence[torch.Tensor], device: torch.device,
          chunk_bytes: int | None = None) -> list[torch.Tensor]:
    """
    Copy host tensors to ``device`` on this thread's copy stream and wait for them.

    A contiguous tensor larger than ``chunk_bytes`` (default :data:`STAGE_CHUNK_BYTES`)
    is copied in pieces of that size, so that an urgent request's copies and graph,
    launched from another thread, pass between them.
    """
    if device.type != 'cuda':
        return [t.to(device) for t in tensors]
    stream = copy_stream(device)
    with torch.cuda.stream(stream):
        # straight from the request's (pageable) frames: through a page-locked bounce
        # buffer this measured 0.04 ms slower for a 150 KB frame on an H100 host
        staged = [_to_device(t, device, chunk_bytes) for t in tensors]
    stream.synchronize()
    return staged


def _to_device(tensor: torch.Tensor, device: torch.device, chunk: int | None) -> torch.Tensor:
    chunk = chunk or STAGE_CHUNK_BYTES
    if tensor.nbytes <= chunk or not tensor.is_contiguous() or tensor.device.type != 'cpu':
        return tensor.to(device, non_blocking=False)
    staged = torch.empty(tensor.shape, dtype=tensor.dtype, device=device)
    source, target = tensor.reshape(-1).view(torch.uint8), staged.reshape(-1).view(torch.uint8)
    for start in range(0, source.numel(), chunk):
        target[start:start + chunk].copy_(source[start:start + chunk], non_blocking=False)
    return staged


def to_host(tensors: Sequence[torch.Tensor], dtypes: Sequence[torch.dtype]) -> list[torch.Tensor]:
    """Copy finished device outputs to the CPU in ``dtypes`` (off the device lanes)."""
    if not tensors or all(t.device.type == 'cpu' for t in tensors):
        return [t.to(dt).contiguous() for t, dt in zip(tensors, dtypes)]
    device = tensors[0].device
    stream = copy_stream(device)
    # on a lane the producer was already waited for; a direct caller (Execution.run, tests,
    # profiling) produced them on its current stream, which the copy must follow
    stream.wait_stream(torch.cuda.current_stream(device))
    host = []
    with torch.cuda.stream(stream):
        for t, dt in zip(tensors, dtypes):
            bounce = _pinned(t.shape, dt)
            if bounce is None:
                host.append(t.to('cpu', dtype=dt).contiguous())
                continue
            bounce.copy_(t, non_blocking=True)
            stream.synchronize()
            host.append(bounce.clone())     # the reply owns its memory; the buffer is reused
    return host


def copy_to_host(tensors: Sequence[torch.Tensor], destinations: Sequence[torch.Tensor]) -> None:
    """Copy device tensors into page-locked host ``destinations`` on this thread's copy stream."""
    device = tensors[0].device
    stream = copy_stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))   # as to_host: follow the producer
    with torch.cuda.stream(stream):
        for tensor, host in zip(tensors, destinations):
            host.copy_(tensor, non_blocking=True)
    stream.synchronize()


def byte_view(tensor: torch.Tensor) -> numpy.ndarray:
    """Return a flat uint8 numpy view of a CPU tensor's bytes (copied only if not contiguous)."""
    return tensor.contiguous().reshape(-1).view(torch.uint8).numpy()


def copy_bytes(destination: numpy.ndarray, tensor: torch.Tensor) -> None:
    """
    Copy a tensor's bytes into a flat uint8 host array (``destination``, see :func:`byte_view`).

    A plain memcpy: torch's CPU ``copy_`` wakes its OpenMP thread pool for every
    call, which cost the I/O thread about 0.3 ms per 150 KB camera frame on a
    16-core H200 host (py-spy: a quarter of its samples in libgomp).  A device
    tensor (a direct caller's) is copied by torch.
    """
    if tensor.device.type != 'cpu':
        torch.from_numpy(destination).copy_(tensor.reshape(-1).view(torch.uint8))
        return
    numpy.copyto(destination, byte_view(tensor))


def copy_frame(destination: numpy.ndarray, buffer) -> None:
    """Copy a received frame's bytes (any buffer of exactly its size) into ``destination``."""
    numpy.copyto(destination, numpy.frombuffer(buffer, numpy.uint8))
