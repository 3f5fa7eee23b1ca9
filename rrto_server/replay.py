"""
Record once per (model, input signature, options); replay for every request after.

A :class:`Replay` is a model prepared for one exact input signature:

* CUDA, mode ``replay``: every segment is captured as a ``torch.cuda.CUDAGraph``
  (warm-up on a side stream, then capture with static buffers, one memory pool
  per replay), exactly as ``torch/cuda/graphs.py`` prescribes.  Serving a
  request copies inputs into the static input buffers and replays.
* CPU, mode ``replay``: every segment is the recorded ATen graph as an fx
  module, bit-identical to local eager execution (``cpu_backend='fx'``, the
  default), or a frozen TorchScript trace of it (``cpu_backend='frozen'``:
  batch norm folded into convolutions, results differ ~1e-4 relative).
* mode ``eager``: the graph modules run op by op on the device, the
  "offload without replay" baseline.
* ONNX models: an onnxruntime session (CUDA provider with CUDA graphs and
  IOBinding where usable, else CPU), one segment.

A replay is cut into segments (see :mod:`rrto_server.segments`).  An
:class:`Execution` is one inference stepping through them; the scheduler may
run another execution between two steps.  When a second execution of the
same CUDA-graph replay starts while the first is suspended, the first one's
live tensors are saved out of the static buffers and restored when it resumes.

An execution's work is split between CPU workers and the device lane that
runs it: :meth:`Replay.start` (decode already done) stages the inputs on the
device from a CPU worker, :meth:`Execution.step` only launches and runs
segments (the last one leaves the outputs on the device), and
:meth:`Execution.host_outputs` copies them back from a CPU worker again, so a
request in its CPU phase never holds a device lane.
"""

from __future__ import annotations

import contextlib
import logging
import math
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from rrto_server import segments as segmentation
from rrto_server.models import LoadedModel
from rrto_wire.protocol import (ErrorCode, ProtocolError, Signature, TensorSpec,
                                signature_key, torch_dtype)

log = logging.getLogger('rrto_server.replay')

# precision -> autocast dtype; 'fp32' is strict fp32 (TF32 off), 'tf32' lets CUDA use TF32
PRECISIONS = {'fp32': None, 'tf32': None, 'fp16': torch.float16, 'bf16': torch.bfloat16}
MODES = ('replay', 'eager')
WARMUP_ITERS = 3


@dataclass(frozen=True)
class RecordOptions:
    """What a client may choose per recording."""

    precision: str = 'fp32'
    mode: str = 'replay'
    segments: str = segmentation.WHOLE

    @classmethod
    def from_json(cls, obj: Any) -> 'RecordOptions':
        obj = obj or {}
        if not isinstance(obj, dict):
            raise ProtocolError(ErrorCode.BAD_REQUEST, 'options must be an object')
        unknown = set(obj) - {'precision', 'mode', 'segments'}
        if unknown:
            raise ProtocolError(ErrorCode.BAD_REQUEST, f'unknown record options {sorted(unknown)}')
        opts = cls(**obj)
        if opts.precision not in PRECISIONS:
            raise ProtocolError(ErrorCode.BAD_REQUEST,
                                f'precision must be one of {list(PRECISIONS)}')
        if opts.mode not in MODES:
            raise ProtocolError(ErrorCode.BAD_REQUEST, f'mode must be one of {MODES}')
        segmentation.parse_granularity(opts.segments)
        return opts

    def to_json(self) -> dict:
        return {'precision': self.precision, 'mode': self.mode, 'segments': self.segments}

    @property
    def key(self) -> str:
        return f'{self.precision}/{self.mode}/{self.segments}'


def replay_key(digest: str, signature: Signature, options: RecordOptions) -> str:
    """Return the id a client uses to run a replay."""
    return f'{digest}|{signature_key(signature)}|{options.key}'


class Execution:
    """One inference in progress: which segment runs next and the values it needs."""

    def __init__(self, replay: 'Replay', inputs: Sequence[torch.Tensor]):
        self.replay = replay
        self.next_segment = 0
        self.env: dict[str, Any] = {}
        self.saved: dict[str, torch.Tensor] | None = None
        self.outputs: list[torch.Tensor] | None = None
        self.compute_s = 0.0
        self.preemptions = 0
        replay.runner.begin(self, inputs)

    @property
    def done(self) -> bool:
        return self.outputs is not None

    @property
    def num_segments(self) -> int:
        return self.replay.runner.num_segments

    def step(self) -> bool:
        """Run the next segment; return True once the outputs are ready (on the device)."""
        if self.done:
            return True
        start = time.perf_counter()
        runner = self.replay.runner
        runner.run_segment(self, self.next_segment)
        self.next_segment += 1
        if self.next_segment == runner.num_segments:
            self.outputs = runner.collect(self)
        self.compute_s += time.perf_counter() - start
        return self.done

    def host_outputs(self) -> list[torch.Tensor]:
        """Return the outputs on the CPU in the program's dtypes (call from a CPU worker)."""
        if self.outputs is None:
            raise RuntimeError('execution has not finished')
        host = self.replay.runner.to_host(self.outputs)
        self.env = {}
        return host

    def release(self) -> None:
        """Drop this execution's device state (it is abandoned or has failed)."""
        self.replay.runner.release(self)

    def run(self) -> list[torch.Tensor]:
        """Run every remaining segment now; return the outputs on the CPU."""
        while not self.step():
            pass
        return self.host_outputs()


class _EnvRunner:
    """Segments as callables over a per-execution value map (CPU and eager modes)."""

    backend = 'fx'

    def __init__(self, modules, live, input_names, output_names, device, precision, out_dtypes):
        self.modules = modules
        self.live = live
        self.input_names = input_names
        self.output_names = output_names
        self.device = device
        self.precision = precision
        self.out_dtypes = out_dtypes
        self.num_segments = len(modules)

    def _precision(self):
        """Apply the recorded precision: autocast dtype, and TF32 only when asked for."""
        if self.precision == 'fp32' and self.device.type != 'cuda':
            return contextlib.nullcontext()   # nothing to switch: skip two context managers
        return self._precision_context()

    @contextlib.contextmanager
    def _precision_context(self):
        dtype = PRECISIONS[self.precision]
        autocast = (torch.autocast(self.device.type, enabled=False) if dtype is None else
                    torch.autocast(self.device.type, dtype=dtype, cache_enabled=False))
        if self.device.type != 'cuda':
            with autocast:
                yield
            return
        tf32 = self.precision == 'tf32'
        matmul = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = tf32
        try:
            with torch.backends.cudnn.flags(enabled=True, benchmark=False, deterministic=False,
                                            allow_tf32=tf32), autocast:
                yield
        finally:
            torch.backends.cuda.matmul.allow_tf32 = matmul

    def begin(self, ex: Execution, inputs: Sequence[torch.Tensor]) -> None:
        ex.env = dict(zip(self.input_names, stage(inputs, self.device)))

    def run_segment(self, ex: Execution, k: int) -> None:
        ins, outs = self.live[k]
        if k == 0 and self.device.type == 'cuda':
            stream = torch.cuda.current_stream(self.device)
            for name in self.input_names:           # staged on a CPU worker's copy stream
                ex.env[name].record_stream(stream)
        with torch.inference_mode(), self._precision():
            results = self.modules[k](*[ex.env[n] for n in ins])
        ex.env.update(zip(outs, results))

    def collect(self, ex: Execution) -> list[torch.Tensor]:
        # ex.env stays alive until host_outputs/release: the lane has not yet waited for
        # the last segment, and freeing a tensor another stream still reads is a race
        return [ex.env[n] for n in self.output_names]

    def to_host(self, outputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        return to_host(outputs, self.out_dtypes)

    def release(self, ex: Execution) -> None:
        ex.env = {}
        ex.saved = None


_PER_THREAD = threading.local()


def _copy_stream(device: torch.device):
    """Return this thread's CUDA stream for host<->device copies (CPU workers use it)."""
    streams = getattr(_PER_THREAD, 'streams', None)
    if streams is None:
        streams = _PER_THREAD.streams = {}
    key = str(device)
    if key not in streams:
        streams[key] = torch.cuda.Stream(device)
    return streams[key]


PINNED_BYTES_PER_THREAD = 64 << 20   # page-locked bounce buffers each thread may keep


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
    cache = getattr(_PER_THREAD, 'pinned', None)
    if cache is None:
        cache = _PER_THREAD.pinned = OrderedDict()
    key = (tuple(shape), dtype)
    buf = cache.get(key)
    if buf is None:
        buf = cache[key] = torch.empty(key[0], dtype=dtype, pin_memory=True)
        while sum(b.nbytes for b in cache.values()) > PINNED_BYTES_PER_THREAD:
            cache.popitem(last=False)
    cache.move_to_end(key)
    return buf


def stage(tensors: Sequence[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    """Copy host tensors to ``device`` on this thread's copy stream and wait for them."""
    if device.type != 'cuda':
        return [t.to(device) for t in tensors]
    stream = _copy_stream(device)
    with torch.cuda.stream(stream):
        # straight from the request's (pageable) frames: through a page-locked bounce
        # buffer this measured 0.04 ms slower for a 150 KB frame on an H100 host
        staged = [t.to(device, non_blocking=False) for t in tensors]
    stream.synchronize()
    return staged


def to_host(tensors: Sequence[torch.Tensor], dtypes: Sequence[torch.dtype]) -> list[torch.Tensor]:
    """Copy finished device outputs to the CPU in ``dtypes`` (off the device lanes)."""
    if not tensors or all(t.device.type == 'cpu' for t in tensors):
        return [t.to(dt).contiguous() for t, dt in zip(tensors, dtypes)]
    device = tensors[0].device
    stream = _copy_stream(device)
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


class _FrozenRunner(_EnvRunner):
    """CPU replay: each segment a frozen TorchScript trace of its ATen graph."""

    backend = 'frozen'

    def __init__(self, *args, example: Sequence[torch.Tensor]):
        super().__init__(*args)
        env = dict(zip(self.input_names, example))
        frozen = []
        with torch.inference_mode(False), torch.no_grad():
            for module, (ins, outs) in zip(self.modules, self.live):
                values = [env[n] for n in ins]
                traced = torch.jit.trace(module, tuple(values), check_trace=False, strict=False)
                frozen.append(torch.jit.freeze(traced.eval()))
                env.update(zip(outs, module(*values)))
        self.modules = frozen


class _CudaGraphRunner(_EnvRunner):
    """CUDA replay: one captured graph per segment over static buffers shared by all segments."""

    backend = 'cudagraph'

    def __init__(self, *args, signature: Signature):
        super().__init__(*args)
        self.static: dict[str, torch.Tensor] = {
            name: torch.zeros(spec.shape, dtype=torch_dtype(spec.dtype), device=self.device)
            for name, spec in zip(self.input_names, signature)}
        self.owner: Execution | None = None
        self._lock = threading.Lock()
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side), torch.inference_mode(), self._precision():
            for _ in range(WARMUP_ITERS):
                env = dict(self.static)
                for module, (ins, outs) in zip(self.modules, self.live):
                    env.update(zip(outs, module(*[env[n] for n in ins])))
        torch.cuda.current_stream(self.device).wait_stream(side)
        torch.cuda.synchronize(self.device)
        pool = torch.cuda.graph_pool_handle()
        self.graphs = []
        for module, (ins, outs) in zip(self.modules, self.live):
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool, stream=side,
                                  capture_error_mode='thread_local'):
                with torch.inference_mode(), self._precision():
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

    def begin(self, ex: Execution, inputs: Sequence[torch.Tensor]) -> None:
        # staged on the device by a CPU worker; copied into the static buffers at step 0
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
            owner.preemptions += 1
        stream = torch.cuda.current_stream(self.device)
        if ex.next_segment == 0:
            for name, tensor in ex.env.items():
                self.static[name].copy_(tensor, non_blocking=True)
                tensor.record_stream(stream)
        elif ex.saved is not None:
            for name, tensor in ex.saved.items():
                self.static[name].copy_(tensor, non_blocking=True)
                tensor.record_stream(stream)  # saved on another lane's stream, maybe
            ex.saved = None
        self.owner = ex

    def run_segment(self, ex: Execution, k: int) -> None:
        with self._lock, torch.inference_mode():
            self._acquire(ex)
            self.graphs[k].replay()

    def collect(self, ex: Execution) -> list[torch.Tensor]:
        with self._lock, torch.inference_mode():
            outputs = [self.static[n].clone() for n in self.output_names]
            self.owner = None
        return outputs

    def release(self, ex: Execution) -> None:
        with self._lock:
            if self.owner is ex:
                self.owner = None
        super().release(ex)


class _OnnxRunner:
    """ONNX model through onnxruntime; a single segment."""

    num_segments = 1
    backend = 'onnxruntime'

    def __init__(self, model: LoadedModel, signature: Signature, device: torch.device,
                 providers: list):
        import onnxruntime as ort
        options = ort.SessionOptions()
        options.log_severity_level = 3
        self.session = ort.InferenceSession(
            model.onnx_bytes,
            sess_options=options,
            providers=providers)
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.device = device
        _check_onnx_signature(self.session, signature)
        self.on_cuda = 'CUDAExecutionProvider' in self.session.get_providers()

    def begin(self, ex: Execution, inputs: Sequence[torch.Tensor]) -> None:
        ex.env = dict(zip(self.input_names, inputs))

    def run_segment(self, ex: Execution, k: int) -> None:
        feeds = {n: t.numpy() for n, t in ex.env.items()}
        ex.env = {'outputs': self.session.run(self.output_names, feeds)}

    def collect(self, ex: Execution) -> list[torch.Tensor]:
        return [torch.from_numpy(a) for a in ex.env.pop('outputs')]

    def to_host(self, outputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        return list(outputs)

    def release(self, ex: Execution) -> None:
        ex.env = {}


_ONNX_TYPES = {
    'tensor(float)': 'float32',
    'tensor(float16)': 'float16',
    'tensor(double)': 'float64',
    'tensor(uint8)': 'uint8',
    'tensor(int8)': 'int8',
    'tensor(int16)': 'int16',
    'tensor(int32)': 'int32',
    'tensor(int64)': 'int64',
    'tensor(bool)': 'bool'}


def _check_onnx_signature(session, signature: Signature) -> None:
    declared = session.get_inputs()
    if len(declared) != len(signature):
        raise ProtocolError(ErrorCode.SIGNATURE,
                            f'model takes {len(declared)} inputs, request has {len(signature)}')
    for arg, spec in zip(declared, signature):
        want = _ONNX_TYPES.get(arg.type)
        dims = arg.shape
        fixed_ok = len(dims) == len(spec.shape) and all(
            not isinstance(d, int) or d == s for d, s in zip(dims, spec.shape))
        if want != spec.dtype or not fixed_ok:
            raise ProtocolError(ErrorCode.SIGNATURE,
                                f'input {arg.name!r} expects {want}{list(dims)}, got {spec}')


def onnx_providers(device: torch.device) -> list:
    """Choose onnxruntime providers that will really work here (no failing CUDA probe)."""
    import onnxruntime as ort
    available = ort.get_available_providers()
    if device.type == 'cuda' and 'CUDAExecutionProvider' in available:
        return [('CUDAExecutionProvider',
                 {'device_id': device.index or 0}),
                'CPUExecutionProvider']
    return ['CPUExecutionProvider']


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
        except ProtocolError:
            raise
        except Exception as exc:
            log.exception('recording %s failed', self.key)
            raise ProtocolError(ErrorCode.RECORD_FAILED,
                                f'recording failed: {type(exc).__name__}: {exc}')
        if self.runner.backend != 'cudagraph':
            self._warm_up()  # first-run allocations happen here, not in a request
        self.nbytes = torch.cuda.memory_allocated(device) - before if device.type == 'cuda' else 0
        self.record_ms = (time.perf_counter() - started) * 1e3
        self.backend = self.runner.backend
        # measured by rrto_server.profiling when recorded (see docs/scheduler.md)
        self.utilisation: float | None = None
        self.segment_ms: list[float] = []

    @property
    def num_segments(self) -> int:
        return self.runner.num_segments

    def _warm_up(self) -> None:
        inputs = [torch.zeros(s.shape, dtype=torch_dtype(s.dtype)) for s in self.signature]
        for _ in range(WARMUP_ITERS if self.device.type == 'cuda' else 1):
            Execution(self, inputs).run()

    @property
    def shares_buffers(self) -> bool:
        """Return True when all executions share one set of device buffers (CUDA graphs)."""
        return isinstance(self.runner, _CudaGraphRunner)

    def _record(self, cpu_backend: str):
        opts, device = self.options, self.device
        if opts.precision in ('fp16', 'tf32') and device.type != 'cuda':
            raise ProtocolError(ErrorCode.BAD_REQUEST,
                                f'{opts.precision} needs a CUDA server; use fp32 or bf16')
        if self.model.kind == 'onnx':
            if opts.precision != 'fp32' or opts.segments != segmentation.WHOLE:
                raise ProtocolError(
                    ErrorCode.BAD_REQUEST,
                    'ONNX models record with fp32, whole segments')
            return _OnnxRunner(self.model, self.signature, device, onnx_providers(device))
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
        out_dtypes = _output_dtypes(program)
        args = (modules, live, program.input_names, program.output_names, device, opts.precision,
                out_dtypes)
        if opts.mode == 'eager':
            return _EnvRunner(*args)
        if device.type == 'cuda':
            return _CudaGraphRunner(*args, signature=self.signature)
        if cpu_backend == 'frozen' and opts.precision == 'fp32':
            example = [torch.zeros(s.shape, dtype=torch_dtype(s.dtype)) for s in self.signature]
            return _FrozenRunner(*args, example=example)
        return _EnvRunner(*args)

    def start(self, inputs: Sequence[torch.Tensor]) -> Execution:
        """Begin one inference; inputs must match the recorded signature exactly."""
        got = tuple(TensorSpec.of(t) for t in inputs)
        if got != self.signature:
            raise ProtocolError(
                ErrorCode.SIGNATURE,
                f'replay expects {signature_key(self.signature)}, got {signature_key(got)}')
        self.runs += 1
        return Execution(self, inputs)


def _output_dtypes(program) -> list[torch.dtype]:
    specs = {n.name: n.out for n in program.nodes}
    specs.update({name: spec for name, spec in program.inputs})
    dtypes = []
    for name in program.output_names:
        spec = specs.get(name)
        if spec is None:
            raise ProtocolError(ErrorCode.BAD_REQUEST, f'program output {name!r} is not a tensor')
        dtypes.append(torch_dtype(spec.dtype))
    return dtypes


class ReplayCache:
    """Recorded replays, least recently used evicted beyond a count or a byte budget."""

    def __init__(self, max_replays: int = 32, max_bytes: int = 8 << 30):
        self.max_replays = max_replays
        self.max_bytes = max_bytes
        self._replays: OrderedDict[str, Replay] = OrderedDict()
        self._lock = threading.Lock()
        self.evictions = 0

    def get(self, key: str) -> Replay | None:
        with self._lock:
            replay = self._replays.get(key)
            if replay is not None:
                self._replays.move_to_end(key)
            return replay

    def add(self, replay: Replay) -> None:
        with self._lock:
            self._replays[replay.key] = replay
            self._replays.move_to_end(replay.key)
            while len(self._replays) > 1 and (
                    len(self._replays) > self.max_replays or self.nbytes > self.max_bytes):
                self._replays.popitem(last=False)
                self.evictions += 1

    @property
    def nbytes(self) -> int:
        return sum(r.nbytes for r in self._replays.values())

    def __len__(self) -> int:
        return len(self._replays)

    def items(self) -> list[Replay]:
        with self._lock:
            return list(self._replays.values())
