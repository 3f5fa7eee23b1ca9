"""
Measure, at record time, what the scheduler needs to know about a replay.

``segment_ms``
    each segment's solo duration (median of a few runs, each step waited
    for): the preemption granularity this replay offers.  A more urgent
    request waits at most for the rest of one of these.

``utilisation``
    the share of the device the replay occupies while it runs, in [0, 1]:

        u = 1 - (probe rate while the replay runs) / (probe rate alone)

    The probe is a stream of short, wide elementwise kernels on a
    *low-priority* CUDA stream (on the CPU: a thread of small tensor ops)
    that soaks up whatever the replay leaves idle, SM slots and the gaps
    between its kernels alike; the replay runs back to back on the
    high-priority stream (lane 0's).  A replay that saturates the device
    starves the probe (u near 1); a small network that leaves most SMs
    idle lets the probe keep most of its rate (u near 0).  This is what
    the packing rule needs: whether a co-runner on the other stream would
    find room.  Measurement noise is a few percent; when the probe runs
    dry before the replay ends, u is overestimated (the safe direction).

Profiling runs inside the record job, one call per step (:func:`profile_steps`); each
step holds every lane, so nothing else disturbs it, and more urgent work runs
between two steps.

Per-operator durations for the hybrid planner (the server's ``profile``
requests) are :class:`rrto_wire.op_timing.OperatorTimer`'s, shared with the robot;
a key's ``profile`` requests (and its recordings) spend a :class:`DeviceBudget` of device
seconds.
"""

from __future__ import annotations

import contextlib
import logging
import math
import statistics
import threading
import time
from typing import Iterator

import torch

from rrto_wire.dtypes import torch_dtype
from rrto_wire.errors import ErrorCode, ProtocolError

log = logging.getLogger('rrto_server.profiling')

RUNS = 3
CUDA_WINDOW_S = 0.02
CPU_WINDOW_S = 0.05
MAX_ITERS = 200
PROBE_TARGET_S = 1.5e-4
PROBE_MIN_ELEMS, PROBE_MAX_ELEMS = 1 << 20, 1 << 26


def example_inputs(replay) -> list[torch.Tensor]:
    """Return deterministic inputs of the replay's signature (normal floats, zero ints)."""
    return example_tensors(replay.signature)


def example_tensors(signature) -> list[torch.Tensor]:
    """Return deterministic CPU tensors of a signature (normal floats, zero ints)."""
    generator = torch.Generator().manual_seed(0)
    inputs = []
    for spec in signature:
        dtype = torch_dtype(spec.dtype)
        if dtype.is_floating_point:
            inputs.append(torch.randn(spec.shape, generator=generator).to(dtype))
        else:
            inputs.append(torch.zeros(spec.shape, dtype=dtype))
    return inputs


def _sync(device: torch.device) -> None:
    if device.type == 'cuda':
        torch.cuda.current_stream(device).synchronize()


def timed_run(replay, inputs: list[torch.Tensor]) -> list[float]:
    """Return each segment's solo duration in milliseconds over one call (each step waited for)."""
    execution = replay.start(inputs)
    _sync(replay.device)
    times = []
    for _ in range(replay.num_segments):
        start = time.perf_counter()
        execution.step()
        _sync(replay.device)
        times.append((time.perf_counter() - start) * 1e3)
    return times


def _run_back_to_back(replay, executions) -> None:
    # one stream: freeing each execution's tensors right away is ordered after its kernels
    for execution in executions:
        while not execution.step():
            pass
        execution.release()
        execution.outputs = None


def _cpu_utilisation(replay, inputs: list[torch.Tensor], solo_s: float) -> float:
    buf = torch.zeros(1 << 15)
    stamps: list[float] = []
    stop = threading.Event()

    def probe() -> None:
        while not stop.is_set():
            buf.add_(1.0)
            stamps.append(time.perf_counter())

    def rate(start: float, end: float) -> float:
        return sum(1 for t in stamps if start < t <= end) / max(end - start, 1e-9)

    thread = threading.Thread(target=probe, name='rrto-probe', daemon=True)
    thread.start()
    try:
        time.sleep(CPU_WINDOW_S / 5)
        t0 = time.perf_counter()
        time.sleep(CPU_WINDOW_S)
        alone = rate(t0, time.perf_counter())
        iters = max(1, min(MAX_ITERS, math.ceil(CPU_WINDOW_S / max(solo_s, 1e-6))))
        executions = [replay.start(inputs) for _ in range(iters)]
        t0 = time.perf_counter()
        _run_back_to_back(replay, executions)
        during = rate(t0, time.perf_counter())
    finally:
        stop.set()
        thread.join()
    return min(1.0, max(0.0, 1.0 - during / alone)) if alone > 0 else 1.0


def _probe_buffer(device: torch.device, stream) -> tuple[torch.Tensor, float]:
    """Return a probe buffer whose ``add_`` takes about PROBE_TARGET_S, and that time."""
    elems = PROBE_MIN_ELEMS
    while True:
        with torch.cuda.stream(stream):
            buf = torch.zeros(elems, device=device)     # allocated on the probe's stream
            buf.add_(1.0)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record(stream)
            for _ in range(5):
                buf.add_(1.0)
            end.record(stream)
        end.synchronize()
        seconds = start.elapsed_time(end) / 5e3
        if seconds >= PROBE_TARGET_S or elems >= PROBE_MAX_ELEMS:
            return buf, seconds
        del buf
        elems *= 2


def _cuda_utilisation(replay, inputs: list[torch.Tensor], solo_s: float) -> float:
    device = replay.device
    high = torch.cuda.current_stream(device)
    low = torch.cuda.Stream(device, priority=0)
    buf, probe_s = _probe_buffer(device, low)
    iters = max(1, min(MAX_ITERS, math.ceil(CUDA_WINDOW_S / max(solo_s, 1e-6))))
    executions = [replay.start(inputs) for _ in range(iters)]

    def enqueue_probe(count: int, ref) -> list:
        events = []
        with torch.cuda.stream(low):
            ref.record(low)
            for _ in range(count):
                buf.add_(1.0)
                event = torch.cuda.Event(enable_timing=True)
                event.record(low)
                events.append(event)
        return events

    ref = torch.cuda.Event(enable_timing=True)
    alone_events = enqueue_probe(max(20, int(CUDA_WINDOW_S / probe_s)), ref)
    alone_events[-1].synchronize()
    alone = len(alone_events) / (ref.elapsed_time(alone_events[-1]) / 1e3)
    # enough probe work queued to outlast enqueueing it plus the replay window, twice over
    count = int(2 * (iters * solo_s + 2e-5 * iters) / probe_s) + 50
    ref = torch.cuda.Event(enable_timing=True)
    events = enqueue_probe(count, ref)
    begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    begin.record(high)
    _run_back_to_back(replay, executions)
    end.record(high)
    torch.cuda.synchronize(device)
    t0, t1 = ref.elapsed_time(begin), ref.elapsed_time(end)
    times = [ref.elapsed_time(e) for e in events]
    if times[-1] < t1:
        log.warning('utilisation probe of %s ran dry; the estimate is high', replay.key[:24])
    during = sum(1 for t in times if t0 < t <= t1) / max((t1 - t0) / 1e3, 1e-9)
    return min(1.0, max(0.0, 1.0 - during / alone))


def profile_steps(replay, utilisation: bool = True) -> Iterator[None]:
    """
    Measure ``replay.segment_ms`` and, if asked, ``replay.utilisation`` (in place), in steps.

    Each iteration does about one call of the replay (a warm run, then ``RUNS``
    timed runs, then the utilisation window), so the record job that drives it
    holds the device for one call at a time; each segment's time is the median of
    the timed runs.
    """
    inputs = example_inputs(replay)
    replay.start(inputs).run()
    yield
    samples = []
    for _ in range(RUNS):
        samples.append(timed_run(replay, inputs))
        yield
    replay.segment_ms = [statistics.median(s) for s in zip(*samples)]
    if not utilisation:
        return
    solo_s = sum(replay.segment_ms) / 1e3
    if replay.device.type == 'cuda':
        replay.utilisation = _cuda_utilisation(replay, inputs, solo_s)
    else:
        replay.utilisation = _cpu_utilisation(replay, inputs, solo_s)


class DeviceBudget:
    """
    Device seconds each key may spend on one kind of background work: a token bucket per key.

    A key holds up to ``burst_s`` seconds and earns ``rate`` seconds back per second.
    Every step of a job of that kind (a ``profile`` call, a stage of a recording) is
    charged what it took; a request arriving, or a step starting, with the key's bucket
    empty is refused ``overloaded``, so one key's work of that kind never holds the
    device for longer than its bucket, whatever the number of requests it sends.
    The server keeps one for ``profile`` (10 s at once, 0.1 s back per second) and one
    for ``record`` (:mod:`rrto_server.recording`).  Each also pays for the sandbox trial
    that vets a program first used by that kind of request (:meth:`spending`).
    """

    def __init__(self, what: str, burst_s: float = 10.0, rate: float = 0.1,
                 clock=time.monotonic):
        self.what = what
        self.burst_s, self.rate, self.clock = float(burst_s), float(rate), clock
        self._left: dict = {}              # key -> (seconds left, when)
        self._lock = threading.Lock()

    def _refill(self, key) -> float:
        now = self.clock()
        left, when = self._left.get(key, (self.burst_s, now))
        left = min(self.burst_s, left + (now - when) * self.rate)
        self._left[key] = (left, now)
        return left

    def check(self, key) -> None:
        """Raise ``overloaded`` when ``key`` has no time left."""
        with self._lock:
            left = self._refill(key)
        if left <= 0:
            wait = -left / self.rate if self.rate > 0 else math.inf
            raise ProtocolError(
                ErrorCode.OVERLOADED,
                f'this key spent its {self.what} budget ({self.burst_s:g} s of device time, '
                f'{self.rate:g} s per second back); retry in {min(wait, 1e6):.1f} s')

    def charge(self, key, seconds: float) -> None:
        """Take ``seconds`` of device time from ``key``'s bucket."""
        with self._lock:
            left = self._refill(key)
            self._left[key] = (left - seconds, self.clock())

    @contextlib.contextmanager
    def spending(self, key) -> Iterator[None]:
        """Check ``key``'s bucket (``overloaded`` when empty), then charge what the body took."""
        self.check(key)
        start = time.perf_counter()
        try:
            yield
        finally:
            self.charge(key, time.perf_counter() - start)
