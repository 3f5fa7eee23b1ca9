"""
Record once per (model, input signature, options); replay for every request after.

A :class:`Replay` is a model prepared for one exact input signature, served by
one :class:`~rrto_server.runner.Runner`:

* CUDA, mode ``replay``: every segment a captured CUDA graph
  (:mod:`rrto_server.runner_cudagraph`).
* CPU, mode ``replay``: every segment the recorded ATen graph as an fx
  module, bit-identical to local eager execution (``cpu_backend='fx'``, the
  default), or a frozen TorchScript trace of it (``cpu_backend='frozen'``:
  batch norm folded into convolutions, results differ ~1e-4 relative); see
  :mod:`rrto_server.runner_fx`.
* mode ``eager``: the graph modules run op by op on the device, the
  "offload without replay" baseline.
* a program whose sizes depend on the data (``"dynamic"``, see
  :mod:`rrto_wire.ops_dynamic`): op by op on any device and in any mode,
  each operator's output size checked before it is allocated, backend
  ``eager-dynamic`` (:class:`~rrto_server.runner_fx.DynamicRunner`); never
  a CUDA graph.
* ONNX models: an onnxruntime session, one segment
  (:mod:`rrto_server.runner_onnx`).

A replay is cut into segments (see :mod:`rrto_server.segments`).  An
:class:`~rrto_server.runner.Execution` is one inference stepping through them;
the scheduler may run another execution between two steps.  Inputs are
staged and outputs copied back by CPU workers (:mod:`rrto_server.transfers`),
so a request in its CPU phase never holds a device lane.
"""

from __future__ import annotations

import collections
import logging
import time
from typing import Sequence

import torch

from rrto_server import segments as segmentation
from rrto_server import work_rate
from rrto_server.express import ExpressPlan
from rrto_server.models import LoadedModel
from rrto_server.replay_key import replay_key
from rrto_server.runner import Execution, Runner
from rrto_server.runner_cudagraph import WARMUP_ITERS, CudaGraphRunner
from rrto_server.runner_fx import DynamicRunner, FrozenRunner, FxRunner
from rrto_server.sandbox import DEFAULT_MAX_BYTES, DEFAULT_MAX_S, refusal
from rrto_server.runner_onnx import OnnxRunner, onnx_providers
from rrto_wire.dtypes import torch_dtype
from rrto_wire.errors import ErrorCode, ProtocolError
from rrto_wire.messages import RecordOptions
from rrto_wire.tensors import Signature, TensorSpec, signature_key

log = logging.getLogger('rrto_server.replay')

# the device time of this many recent runs corrects the record-time profile (their median)
SERVED_RUNS = 9
SERVED_MIN = 3      # runs served before they count


class Replay:
    """A model recorded for one input signature and one set of options."""

    def __init__(self, model: LoadedModel, signature: Signature, options: RecordOptions,
                 device: torch.device, cpu_backend: str = 'fx'):
        self.model = model
        self.signature = tuple(signature)
        self.options = options
        self.device = device
        self.key = replay_key(model.digest, self.signature, options)
        self.runs = 0
        started = time.perf_counter()
        before = torch.cuda.memory_allocated(device) if device.type == 'cuda' else 0
        try:
            self.runner = self._record(cpu_backend)
            if self.runner.backend != 'cudagraph':
                self._warm_up()  # first-run allocations happen here, not in a request
        except ProtocolError:
            raise
        except Exception as exc:    # out of memory: the program's, not the server's (a14 #2)
            log.exception('recording %s failed', self.key)
            raise ProtocolError(ErrorCode.UNSAFE_PROGRAM if refusal(str(exc)) else
                                ErrorCode.RECORD_FAILED,
                                f'recording failed: {type(exc).__name__}: {exc}')
        # on the CPU: the weights plus what one call needed in the sandbox trial
        self.nbytes = (torch.cuda.memory_allocated(device) - before if device.type == 'cuda'
                       else model.nbytes + model.call_bytes)
        self.record_ms = (time.perf_counter() - started) * 1e3
        self.backend = self.runner.backend
        # all executions share one set of device buffers (CUDA graphs): never two side by side
        self.shares_buffers = isinstance(self.runner, CudaGraphRunner)
        # measured by rrto_server.profiling when recorded (see docs/scheduler.md)
        self.utilisation: float | None = None
        self._served: collections.deque = collections.deque(maxlen=SERVED_RUNS)
        self._served_ms: float | None = None      # their median, once SERVED_MIN are in
        # how long the longest segment takes now, in ms (None before profiling): the
        # record-time profile (segment_ms) scaled to the median device time of the last runs
        # served (from the SERVED_MIN-th on), as a profile taken while the machine was busy,
        # or cold, says nothing of the steady state; set with segment_ms and by served()
        self.longest_segment_ms: float | None = None
        self.segment_ms: list[float] = []
        # the common request's short path (rrto_server.express), where the runner has one
        self.express = ExpressPlan(self.signature, self.runner) if self.runner.can_express \
            else None

    @property
    def num_segments(self) -> int:
        return self.runner.num_segments

    def served(self, compute_s: float) -> None:
        """Note the device time of one run served to the end (its steps, each waited for)."""
        runs = self._served
        runs.append(compute_s * 1e3)
        n = len(runs)
        if n >= SERVED_MIN:     # their median (statistics.median's, without its checks)
            ordered = sorted(runs)
            half = n // 2
            self._served_ms = (ordered[half] if n % 2 else
                               (ordered[half - 1] + ordered[half]) / 2)
            self._scale()

    @property
    def segment_ms(self) -> list[float]:
        """Return each segment's device time when profiled, in ms (empty before)."""
        return self._segment_ms

    @segment_ms.setter
    def segment_ms(self, value: list[float]) -> None:
        self._segment_ms = value
        self._scale()

    def _scale(self) -> None:
        # longest_segment_ms once per profile or served run, not per request (Server._inline_ok)
        segments, served = self._segment_ms, self._served_ms
        if not segments:
            self.longest_segment_ms = None
            return
        longest, total = max(segments), sum(segments)
        self.longest_segment_ms = (longest if served is None or total <= 0
                                   else longest * served / total)

    def _warm_up(self) -> None:
        inputs = [torch.zeros(s.shape, dtype=torch_dtype(s.dtype)) for s in self.signature]
        for _ in range(WARMUP_ITERS if self.device.type == 'cuda' else 1):
            Execution(self.runner, inputs).run()

    @property
    def copies_on_start(self) -> bool:
        """
        Return True when :meth:`start` copies the inputs to the device (and waits for them).

        False on a CPU server and for a CUDA graph that copies its inputs inside
        the graph (see :mod:`rrto_server.runner_cudagraph`): starting keeps views
        of the request's frames, so any thread may do it.
        """
        if self.device.type != 'cuda':
            return False
        return not (isinstance(self.runner, CudaGraphRunner) and self.runner.staging is not None)

    def _record(self, cpu_backend: str) -> Runner:
        opts, device = self.options, self.device
        if opts.precision in ('fp16', 'tf32') and device.type != 'cuda':
            raise ProtocolError(ErrorCode.BAD_REQUEST,
                                f'{opts.precision} needs a CUDA server; use fp32 or bf16')
        if self.model.kind == 'onnx':
            if opts.precision != 'fp32' or opts.segments != segmentation.WHOLE:
                raise ProtocolError(
                    ErrorCode.BAD_REQUEST,
                    'ONNX models record with fp32, whole segments')
            return OnnxRunner(self.model, self.signature, device, onnx_providers(device))
        program = self.model.program
        if self.signature != program.signature:
            raise ProtocolError(
                ErrorCode.SIGNATURE,
                f'model {self.model.digest[:12]} was exported for '
                f'{signature_key(program.signature)}, '
                f'request has {signature_key(self.signature)}; export it for this signature')
        weights = self.model.weights(device)
        cuts = segmentation.bounds(program, opts.segments)
        live = program.live_ranges(cuts)
        edges = [0] + cuts + [len(program.nodes)]
        modules = [program.module(weights, device, a, b, ins, outs)
                   for (a, b), (ins, outs) in zip(zip(edges, edges[1:]), live)]
        out_specs = program.output_specs()
        out_dtypes = [torch_dtype(spec.dtype) for spec in out_specs]
        args = (modules, live, program.input_names, program.output_names, device, opts.precision,
                out_dtypes)
        if program.dynamic:
            verdict = self.model.verdict       # the sandbox's limits per call, as configured
            max_bytes, max_s = ((verdict.max_bytes, verdict.max_s) if verdict is not None
                                else (DEFAULT_MAX_BYTES, DEFAULT_MAX_S))
            rate = work_rate.rate(device)      # measured once per process
            return DynamicRunner(*args, max_bytes=max_bytes, max_work=rate.max_work(max_s),
                                 rate=rate,
                                 out_shapes=[tuple(spec.shape) for spec in out_specs])
        if opts.mode == 'eager':
            return FxRunner(*args)
        if device.type == 'cuda':
            return CudaGraphRunner(*args, signature=self.signature)
        if cpu_backend == 'frozen' and opts.precision == 'fp32':
            example = [torch.zeros(s.shape, dtype=torch_dtype(s.dtype)) for s in self.signature]
            return FrozenRunner(*args, example=example)
        return FxRunner(*args)

    def start(self, inputs: Sequence[torch.Tensor]) -> Execution:
        """Begin one inference; inputs must match the recorded signature exactly."""
        got = tuple(TensorSpec.of(t) for t in inputs)
        if got != self.signature:
            raise ProtocolError(
                ErrorCode.SIGNATURE,
                f'replay expects {signature_key(self.signature)}, got {signature_key(got)}')
        self.runs += 1
        return Execution(self.runner, inputs)
