"""
Run an untrusted model once in a throwaway child process before the server does.

The way browsers isolate renderers: a program that passed the operator rules
(:mod:`rrto_wire.ops`) may still crash native code or allocate without bound,
so its first run happens in a child forked from a ``forkserver`` (torch
already imported, no server threads or sockets inherited, CUDA never
initialised there) with one CPU thread, on the server's device:

* CPU: under ``RLIMIT_AS`` (memory) and ``RLIMIT_CPU`` (time) limits;
* CUDA: the child initialises CUDA itself (a child forked from a process
  that did cannot use it; the forkserver never does), caps its caching
  allocator at its weights + ``max_bytes`` + slack
  (``torch.cuda.set_per_process_memory_fraction``), keeps ``RLIMIT_CPU``, and
  times the call by the wall clock through ``torch.cuda.synchronize``.  A
  CUDA error (a device-side assert, an illegal address) would poison the
  server's CUDA context, so it refuses the model.  ONNX models are tried on
  the CPU (onnxruntime) on either device.

A child that dies (SIGSEGV, SIGXCPU, SIGKILL), runs out of memory, raises a
CUDA error, needs more than ``max_bytes`` beyond its weights, or more than
``max_s`` for one call, gets the model refused with ``unsafe_program``; the
server itself never ran a byte of it, except in a dynamic program what its
zeros did not reach: the nodes after a guard that fails on them (a chained
program's later links) and the sizes that follow the data.  Those run first
in the server, bounded per node by ``DynamicRunner``'s budgets, not by this
trial (a14 D, docs/security.md).  Verdicts are remembered per model
digest and device in memory and under ``<store>/verdicts/``, so each model is
tried once per limit setting and device, also across restarts.  An ONNX model
may have symbolic dimensions, so it is tried at each input signature it is
recorded for (zeros of exactly that shape), with its limits set before
onnxruntime builds the session: constant folding at session creation (a
205-byte model folding into a 256 MiB initializer) counts in its memory.

The peak memory the trial measured is the model's per-call footprint; the
replay cache counts it for CPU replays (see :attr:`Verdict.peak_bytes`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import multiprocessing
import multiprocessing.forkserver
import os
import resource
import signal
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, ContextManager

import torch

from rrto_wire.program import Program
from rrto_wire.program_chain import GuardFailed
from rrto_wire.weights import load_shards, shared_to
from rrto_wire.dtypes import torch_dtype
from rrto_wire.errors import ErrorCode, ProtocolError

Pay = Callable[[], ContextManager]      # who pays a trial: a budget's context, checked and charged
FREE: Pay = contextlib.nullcontext      # nobody's budget: admins, keyless servers, the operator


def no_trial() -> ContextManager:
    """Pay for nothing: the caller runs on a device lane, where no trial may start (a14 #5)."""
    raise ProtocolError(ErrorCode.NOT_RECORDED, 'the model was not vetted before its job '
                        'reached a device lane (its verdict is gone): send the request again')


log = logging.getLogger('rrto_server.sandbox')

DEFAULT_MAX_BYTES = 1 << 30        # memory one call may need beyond the weights
DEFAULT_MAX_S = 10.0               # CPU seconds one call may take (one thread)
SLACK_BYTES = 512 << 20            # address space for the allocator, stacks, libraries
LOAD_TIMEOUT_S = 120.0             # a loaded machine may take this long to fork and read
# errors after which a CUDA context is unusable: in the server they would stop every model
CUDA_FAULTS = ('device-side assert', 'illegal memory access', 'misaligned address',
               'illegal instruction', 'unspecified launch failure', 'CUDA error')

_ONNX_TYPES = {'tensor(float)': 'float32', 'tensor(float16)': 'float16',
               'tensor(double)': 'float64', 'tensor(uint8)': 'uint8', 'tensor(int8)': 'int8',
               'tensor(int32)': 'int32', 'tensor(int64)': 'int64', 'tensor(bool)': 'bool'}


@dataclass(frozen=True)
class Verdict:
    """The outcome of one trial: safe, unsafe (refuse), or failed (the model is broken)."""

    outcome: str            # 'safe' | 'unsafe' | 'failed'
    reason: str
    peak_bytes: int
    call_s: float
    max_bytes: int
    max_s: float
    device: str = 'cpu'

    def raise_if_refused(self, digest: str) -> None:
        if self.outcome == 'unsafe':
            raise ProtocolError(ErrorCode.UNSAFE_PROGRAM,
                                f'model {digest[:12]} refused by the sandbox: {self.reason}')
        if self.outcome == 'failed':
            raise ProtocolError(ErrorCode.RECORD_FAILED,
                                f'model {digest[:12]} failed its trial run: {self.reason}')


def _read(root: Path, digest: str) -> bytearray:
    data = bytearray((root / 'blobs' / digest).read_bytes())
    if hashlib.sha256(data).hexdigest() != digest:
        raise ValueError(f'blob {digest[:12]} changed on disk')
    return data


def _rss_bytes() -> int:
    with open('/proc/self/statm') as f:
        return int(f.read().split()[1]) * os.sysconf('SC_PAGE_SIZE')


def _vm_bytes() -> int:
    with open('/proc/self/statm') as f:
        return int(f.read().split()[0]) * os.sysconf('SC_PAGE_SIZE')


def _onnx_call(data: bytearray, shapes: list | None):
    """Build the session and zero inputs (``shapes``: the recorded signature's, if any)."""
    import numpy as np
    import onnxruntime as ort
    options = ort.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    options.log_severity_level = 3
    session = ort.InferenceSession(bytes(data), sess_options=options,
                                   providers=['CPUExecutionProvider'])
    feeds = {}
    for index, arg in enumerate(session.get_inputs()):
        dtype = torch_dtype(_ONNX_TYPES.get(arg.type, 'unsupported'))
        shape = [d if isinstance(d, int) and d > 0 else 1 for d in arg.shape]
        if shapes is not None:
            if index >= len(shapes) or len(shapes[index]) != len(shape):
                raise ValueError('the signature does not match the model\'s inputs')
            shape = list(shapes[index])
        feeds[arg.name] = np.zeros(shape, dtype=torch.zeros((), dtype=dtype).numpy().dtype)

    def call() -> int:
        session.run(None, feeds)        # numpy outputs: contiguous, as the reply sends them
        return 0
    return call


def _program_call(root: Path, data: bytearray, device: torch.device):
    program = Program.parse(data)
    weights = load_shards(program.weight_shards, lambda digest: _read(root, digest))
    module = program.module(shared_to(weights, device), device)
    inputs = [torch.zeros(spec.shape, dtype=torch_dtype(spec.dtype), device=device)
              for spec in program.signature]

    def call() -> int:
        """Run it; return the bytes its reply copies (a view output, whole: a16 #7)."""
        outputs = ()
        with torch.inference_mode():
            try:
                outputs = module(*inputs)
            except GuardFailed:     # a chained program stops there on these inputs, as served
                pass
        if device.type == 'cuda':
            torch.cuda.synchronize(device)
        return sum(t.numel() * t.element_size() for t in torch.utils._pytree.tree_leaves(outputs)
                   if isinstance(t, torch.Tensor) and not t.is_contiguous())
    return call


def _cap_cuda(device: torch.device, max_bytes: int) -> int:
    """Cap the child's CUDA allocations at what it holds + ``max_bytes`` + slack; return held."""
    torch.cuda.synchronize(device)
    held = torch.cuda.memory_allocated(device)
    total = torch.cuda.get_device_properties(device).total_memory
    torch.cuda.set_per_process_memory_fraction(
        min(1.0, (held + max_bytes + SLACK_BYTES) / total), device)
    torch.cuda.reset_peak_memory_stats(device)
    return held


def refusal(message: str) -> str | None:
    """Return why an error refuses the model (out of memory, a CUDA fault), or None."""
    if any(text in message for text in ("can't allocate memory", 'out of memory',
                                        'Failed to allocate memory')):  # (onnxruntime)
        return 'ran out of its memory budget'
    if any(fault in message for fault in CUDA_FAULTS):
        return f'CUDA fault: {message[:200]}'
    return None


def _limit_cpu(max_bytes: int, max_s: float, extra_bytes: int = 0) -> None:
    limit = _vm_bytes() + max_bytes + extra_bytes + SLACK_BYTES
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    cpu = math.ceil(time.process_time() + max_s) + 1
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))


def _trial(root: str, digest: str, kind: str, max_bytes: int, max_s: float, device: str,
           conn, shapes: list | None = None) -> None:
    """Child: load the model, then run it once under memory and time limits; report."""
    torch.set_num_threads(1)
    try:
        dev = torch.device(device if kind == 'program' else 'cpu')
        if dev.type == 'cuda' and dev.index is None:
            dev = torch.device('cuda', torch.cuda.current_device())   # the cap needs an index
        data = _read(Path(root), digest)
        own = 0                     # memory of the model's own bytes, not held against it
        if kind == 'onnx':          # limits first: onnxruntime folds constants while loading
            own, rss = len(data), _rss_bytes()
            _limit_cpu(max_bytes, max_s, 2 * own)
            call = _onnx_call(data, shapes)
        else:
            call = _program_call(Path(root), data, dev)
            if dev.type == 'cuda':
                held = _cap_cuda(dev, max_bytes)
                cpu = math.ceil(time.process_time() + max_s) + 1
                resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
            else:
                _limit_cpu(max_bytes, max_s)
            rss = _rss_bytes()
        start, wall = time.process_time(), time.perf_counter()
        copied = call()             # what the reply copies is the call's too (a16 #7)
        if dev.type == 'cuda':      # the device's time and memory, not the waiting host's
            call_s = time.perf_counter() - wall
            peak = max(0, torch.cuda.max_memory_allocated(dev) - held)
        else:
            call_s = time.process_time() - start
            peak = max(0, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - rss - own)
        conn.send({'outcome': 'ran', 'peak_bytes': peak + copied, 'call_s': call_s})
    except MemoryError:
        conn.send({'outcome': 'unsafe', 'reason': 'ran out of its memory budget'})
    except Exception as exc:  # the model's own error: report it, the parent decides
        message = f'{type(exc).__name__}: {exc}'[:300]
        refused = refusal(message) or (       # an operator's own check refused it (a15 #1)
            message if getattr(exc, 'code', None) == ErrorCode.UNSAFE_PROGRAM else None)
        conn.send({'outcome': 'unsafe' if refused else 'failed', 'reason': refused or message})


class Sandbox:
    """Trial runs of stored models in a child process, with verdicts remembered."""

    def __init__(self, store_root: str | os.PathLike, max_bytes: int = DEFAULT_MAX_BYTES,
                 max_s: float = DEFAULT_MAX_S, device: torch.device | str = 'cpu'):
        self.root = Path(store_root)
        self.device = str(torch.device(device))
        self.folder = self.root / 'verdicts'
        self.folder.mkdir(parents=True, exist_ok=True)
        self.max_bytes = max_bytes
        self.max_s = max_s
        self._verdicts: dict[str, Verdict] = {}
        self._lock = threading.Lock()
        self._busy: dict[str, threading.Lock] = {}
        self.trials = 0
        self._ctx = multiprocessing.get_context('forkserver')
        self._ctx.set_forkserver_preload(['rrto_server.sandbox'])
        # the forkserver imports torch once (tens of seconds on a loaded machine): start it
        # now, beside the server's own start-up, rather than on the first upload's record
        threading.Thread(target=multiprocessing.forkserver.ensure_running, daemon=True,
                         name='rrto-sandbox-start').start()

    def check(self, digest: str, kind: str, shapes: list | None = None, *, pay: Pay) -> Verdict:
        """
        Return the model's verdict (a trial on first use); raise if it is refused.

        ``shapes`` (ONNX only: a signature's input shapes) tries the model at
        exactly those shapes, with a verdict of its own.  A trial runs inside
        ``pay()``: the requester's budget, checked before and charged after (a14 #5: no
        default, every caller names who pays; :data:`FREE` or :func:`no_trial`).
        """
        key = digest
        if shapes is not None:
            key += '-' + hashlib.sha256(json.dumps(shapes).encode()).hexdigest()[:16]
        with self._lock:
            busy = self._busy.setdefault(key, threading.Lock())
        with busy:                       # one trial per model, however many ask at once
            verdict = self._known(key)
            if verdict is None:
                with pay():
                    verdict = self._try(digest, kind, shapes)
                with self._lock:
                    self._verdicts[key] = verdict
                (self.folder / f'{key}.json').write_text(json.dumps(asdict(verdict)))
        verdict.raise_if_refused(digest)
        return verdict

    def _known(self, digest: str) -> Verdict | None:
        with self._lock:
            verdict = self._verdicts.get(digest)
        if verdict is None:
            try:
                verdict = Verdict(**json.loads((self.folder / f'{digest}.json').read_text()))
            except (OSError, ValueError, TypeError):
                return None
        if (verdict.max_bytes, verdict.max_s, verdict.device) != \
                (self.max_bytes, self.max_s, self.device):
            return None                  # limits or device changed since: try again
        return verdict

    def _try(self, digest: str, kind: str, shapes: list | None) -> Verdict:
        receiver, sender = self._ctx.Pipe(duplex=False)
        child = self._ctx.Process(target=_trial, name=f'rrto-sandbox-{digest[:8]}',
                                  daemon=True, args=(str(self.root), digest, kind,
                                                     self.max_bytes, self.max_s, self.device,
                                                     sender, shapes))
        started = time.monotonic()
        self.trials += 1
        child.start()
        sender.close()
        report = None
        if receiver.poll(LOAD_TIMEOUT_S + 3 * self.max_s):
            try:
                report = receiver.recv()
            except EOFError:
                pass
        child.join(5)
        if child.exitcode is None:
            child.kill()
            child.join()
        receiver.close()
        verdict = self._judge(report, child.exitcode)
        log.info('sandbox trial of %s: %s (%s) in %.1f s', digest[:12], verdict.outcome,
                 verdict.reason, time.monotonic() - started)
        return verdict

    def _judge(self, report: dict | None, exitcode: int | None) -> Verdict:
        limits = {'max_bytes': self.max_bytes, 'max_s': self.max_s, 'device': self.device}
        if report is None:
            if exitcode is not None and exitcode < 0:
                name = signal.Signals(-exitcode).name
                reason = ('exceeded its CPU time budget' if name == 'SIGXCPU'
                          else f'the trial process died with {name}')
            else:
                reason = f'the trial process ended without a report (exit {exitcode})'
            return Verdict('unsafe', reason, 0, 0.0, **limits)
        if report['outcome'] != 'ran':
            return Verdict(report['outcome'], report['reason'], 0, 0.0, **limits)
        peak, call_s = int(report['peak_bytes']), float(report['call_s'])
        if peak > self.max_bytes:
            return Verdict('unsafe', f'one call needs {peak >> 20} MiB, budget '
                           f'{self.max_bytes >> 20} MiB', peak, call_s, **limits)
        if call_s > self.max_s:
            return Verdict('unsafe', f'one call takes {call_s:.1f} s, budget '
                           f'{self.max_s:g} s', peak, call_s, **limits)
        return Verdict('safe', 'ran within its budgets', peak, call_s, **limits)
