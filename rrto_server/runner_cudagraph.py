"""
CUDA replay: every segment captured as a ``torch.cuda.CUDAGraph`` over static buffers.

Warm-up on a side stream, then capture with static buffers (one memory pool
per replay), exactly as ``torch/cuda/graphs.py`` prescribes.  When a second
execution starts while the first is suspended between segments, the first
one's live tensors are saved out of the static buffers and restored when it
resumes.

The copies are part of the request's one pass over the device.  Inputs up to
``STAGED_INPUT_BYTES`` are copied from page-locked host buffers by the first
captured graph itself: a request is one memcpy of its frames into those
buffers, the replays and one synchronisation (larger inputs are staged on a
CPU worker's copy stream instead, so a best-effort batch never holds a lane
while it is copied).  Outputs go back into a page-locked
:class:`~rrto_server.host_buffers.BufferSet` that the reply is sent from and
that is reused only once ZeroMQ has sent it: on the lane, right after the
last graph, when they total at most ``LANE_COPY_BYTES`` or the step runs on
the I/O thread (an idle device, see :attr:`Execution.copy_on_lane`),
otherwise from a device copy on a CPU worker's copy stream.

A replay of one segment with staged inputs also captures an *express* graph
(:mod:`rrto_server.express`): the staging copy, the segment and the copies of
its outputs into page-locked buffers of its own, all in one graph, so an
express request is one memcpy, one replay and one synchronisation, and its
reply is sent from those buffers.
"""

from __future__ import annotations

import threading
from typing import Sequence

import torch

from rrto_server import host_buffers
from rrto_server.runner import Execution
from rrto_server.runner_fx import FxRunner
from rrto_server.transfers import byte_view, copy_bytes, copy_frame, copy_to_host, stage
from rrto_wire.dtypes import torch_dtype
from rrto_wire.tensors import Signature

WARMUP_ITERS = 3
# inputs up to this size are copied inside the first graph from page-locked buffers: a
# 150 KB frame took 0.17 ms to stage from its pageable frame on a copy stream (H200 host)
STAGED_INPUT_BYTES = 4 << 20
# outputs up to this size are copied back on the lane, in the step that finished them
LANE_COPY_BYTES = 1 << 20


class CudaGraphRunner(FxRunner):
    """CUDA replay: one captured graph per segment over static buffers shared by all segments."""

    backend = 'cudagraph'

    def __init__(self, *args, signature: Signature):
        super().__init__(*args)
        self.static: dict[str, torch.Tensor] = {
            name: torch.zeros(spec.shape, dtype=torch_dtype(spec.dtype), device=self.device)
            for name, spec in zip(self.input_names, signature)}
        # page-locked buffers the first graph copies its inputs from (None: staged by workers)
        self.staging: dict[str, torch.Tensor] | None = None
        if sum(spec.nbytes for spec in signature) <= STAGED_INPUT_BYTES:
            self.staging = {name: torch.empty(spec.shape, dtype=torch_dtype(spec.dtype),
                                              pin_memory=True)
                            for name, spec in zip(self.input_names, signature)}
            self._staging_bytes = {name: byte_view(host) for name, host in self.staging.items()}
        self._staged = torch.cuda.Event()   # the last replay of graph 0 has read the staging
        self.owner: Execution | None = None
        self._lock = threading.Lock()
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side), torch.inference_mode(), self.precision_context():
            for _ in range(WARMUP_ITERS):
                env = dict(self.static)
                for module, (ins, outs) in zip(self.modules, self.live):
                    env.update(zip(outs, module(*[env[n] for n in ins])))
        torch.cuda.current_stream(self.device).wait_stream(side)
        torch.cuda.synchronize(self.device)
        pool = torch.cuda.graph_pool_handle()
        self.graphs = []
        for k, (module, (ins, outs)) in enumerate(zip(self.modules, self.live)):
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool, stream=side,
                                  capture_error_mode='thread_local'):
                if k == 0 and self.staging is not None:
                    for name, host in self.staging.items():
                        self.static[name].copy_(host, non_blocking=True)
                with torch.inference_mode(), self.precision_context():
                    results = module(*[self.static[n] for n in ins])
            self.static.update(zip(outs, results))
            self.graphs.append(graph)
        torch.cuda.synchronize(self.device)
        # names each segment still needs from earlier ones, for saving a suspended execution
        self.needed_from = []
        for k in range(self.num_segments + 1):
            needed = set(n for n in self.output_names if n is not None)
            for ins, _ in self.live[k:]:
                needed.update(ins)
            self.needed_from.append(needed)
        self.output_buffers = host_buffers.OutputBuffers(
            [(self.static[n].shape, dt) for n, dt in zip(self.output_names, self.out_dtypes)],
            max_sets=host_buffers.MAX_SETS, max_bytes=host_buffers.MAX_BYTES)
        self.copies_on_lane = (self.output_buffers.enabled
                               and self.output_buffers.nbytes <= LANE_COPY_BYTES)
        self.express_outputs: list[torch.Tensor] | None = None
        if self.num_segments == 1 and self.staging is not None and self.output_buffers.enabled:
            self._capture_express(pool, side)

    def _capture_express(self, pool, side) -> None:
        # one more graph of the one segment for the express path: inputs in from the staging
        # buffers, outputs out to page-locked buffers of its own, all inside the graph.  It
        # shares the replay's memory pool (its temporaries may reuse graph 0's, never graph
        # 0's static inputs or outputs, which stay allocated), and never runs beside graph 0
        # (the runner's lock)
        self.express_outputs = [host_buffers.pinned(shape, dtype)
                                for shape, dtype in self.output_buffers.specs]
        self._express = torch.cuda.CUDAGraph()
        (ins, outs), module = self.live[0], self.modules[0]
        with torch.cuda.graph(self._express, pool=pool, stream=side,
                              capture_error_mode='thread_local'):
            for name, host in self.staging.items():
                self.static[name].copy_(host, non_blocking=True)
            with torch.inference_mode(), self.precision_context():
                env = dict(zip(outs, module(*[self.static[n] for n in ins])))
            for host, name in zip(self.express_outputs, self.output_names):
                host.copy_(env[name] if name in env else self.static[name], non_blocking=True)
        self._express.replay()      # the first replay uploads the graph: not in a request
        torch.cuda.synchronize(self.device)

    @property
    def can_express(self) -> bool:
        """Return True when :meth:`express` may run (one segment, staged inputs, outputs fit)."""
        return self.express_outputs is not None

    def express(self, buffers, signature) -> list[torch.Tensor]:
        """
        Launch the express graph on request bytes checked against the signature.

        Returns :attr:`express_outputs`, the same page-locked tensors every time,
        complete once the current stream is synchronised: as after
        :meth:`run_segment`, the lane running the step does that (``Lane.run``
        waits for its stream after every step), so the express path pays for no
        second synchronisation and never asks torch for the current stream (that
        Python call was 13 % of the I/O thread's samples per request on an H200).
        The caller must not run it again before a reply sent from them is released.
        """
        with self._lock:
            self._staged.synchronize()       # a direct caller's graph 0 may still read them
            for name, buffer in zip(self.input_names, buffers):
                copy_frame(self._staging_bytes[name], buffer)
            self._express.replay()
        return self.express_outputs

    def begin(self, ex: Execution, inputs: Sequence[torch.Tensor]) -> None:
        if self.staging is not None:
            ex.env = dict(zip(self.input_names, inputs))   # host views of the request's frames
        else:   # large: staged on the device by a CPU worker, copied in at step 0
            ex.env = dict(zip(self.input_names, stage(inputs, self.device)))

    def _acquire(self, ex: Execution) -> None:
        # the caller runs on the lane's stream; every earlier segment has completed (the
        # scheduler waits for each one), so static buffers hold the owner's finished values
        if self.owner is ex:
            return
        owner = self.owner
        if owner is not None and not owner.done and owner.saved is None:
            owner.saved = {n: self.static[n].clone() for n in self.needed_from[owner.next_segment]
                           if n in self.static}
            owner.saves += 1
        if ex.next_segment == 0 and self.staging is not None:
            self._staged.synchronize()       # a direct caller may not have waited for it
            for name, tensor in ex.env.items():
                copy_bytes(self._staging_bytes[name], tensor)
        elif ex.next_segment == 0:
            stream = torch.cuda.current_stream(self.device)
            for name, tensor in ex.env.items():
                self.static[name].copy_(tensor, non_blocking=True)
                tensor.record_stream(stream)
        elif ex.saved is not None:
            stream = torch.cuda.current_stream(self.device)
            for name, tensor in ex.saved.items():
                self.static[name].copy_(tensor, non_blocking=True)
                tensor.record_stream(stream)  # saved on another lane's stream, maybe
            ex.saved = None
        self.owner = ex

    def run_segment(self, ex: Execution, k: int) -> None:
        with self._lock, torch.inference_mode():
            self._acquire(ex)
            self.graphs[k].replay()
            if k == 0:
                self._staged.record()
            if k == self.num_segments - 1 and (self.copies_on_lane or ex.copy_on_lane):
                ex.buffers = self.output_buffers.acquire()
                if ex.buffers is not None:
                    for host, name in zip(ex.buffers.tensors, self.output_names):
                        host.copy_(self.static[name], non_blocking=True)
                    # a lane waits for its step anyway; a direct caller waits in to_host
                    ex.copied = torch.cuda.Event()
                    ex.copied.record()

    def collect(self, ex: Execution) -> list[torch.Tensor]:
        with self._lock, torch.inference_mode():
            if ex.buffers is not None:
                outputs = ex.buffers.tensors
            else:   # copied back later by a CPU worker: out of the way of the next execution
                outputs = [self.static[n].clone() for n in self.output_names]
            self.owner = None
        return outputs

    def to_host(self, ex: Execution) -> list[torch.Tensor]:
        if ex.on_host:
            ex.copied.synchronize()          # copied on the lane (done if a lane ran it)
            return ex.buffers.tensors
        ex.buffers = self.output_buffers.acquire()
        if ex.buffers is None:               # over the page-locked cap, or every set in flight
            return super().to_host(ex)
        copy_to_host(ex.outputs, ex.buffers.tensors)
        return ex.buffers.tensors

    def release(self, ex: Execution) -> None:
        with self._lock:
            if self.owner is ex:
                self.owner = None
        super().release(ex)
