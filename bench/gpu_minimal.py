"""
The least Python a GPU server can be: one model, one loop, no checks (a floor, not a server).

``bench.gpu_floor`` compares the project's request path with two floors: the
bare CUDA-graph replay and a bare pyzmq echo.  Between them lies a third one,
what Python with pyzmq and torch costs when it does nothing but serve: this
module's child process records one model's CUDA graph with the input copied in
from a page-locked staging buffer and the outputs copied out to page-locked
buffers inside the graph (as the project's express path does), then loops:
``recv_multipart(copy=False)``, one memcpy of the frame into the staging
buffer, ``replay()``, one synchronisation, ``send_multipart`` of the output
buffers without a copy (each reply is sent before the next request is read,
and waits for libzmq to release the buffers, so none is overwritten while
queued).  No header is decoded, no size is checked, nothing is counted: the
difference between the project's server and this one is the project's own
Python (admission, validation, scheduling, counters), and what this one costs
beyond the bare replay is what a Python server cannot avoid.

The reply's second frame is the server's receipt-to-reply time (float64, ms),
measured as the project's server measures its ``server_ms``.

:class:`Minimal` is the robot's side: a DEALER socket that sends the frame's
bytes and waits for the reply (as bare as :class:`bench.gpu_floor.Echo`).
"""

from __future__ import annotations

import struct
import subprocess
import sys
import time

import numpy
import torch

from bench import gpu_models
from rrto_wire import treespec


def record(name: str, device: torch.device) -> tuple:
    """Return (graph, staging input, page-locked outputs, example frame) for ``name``."""
    from bench.gpu_floor import strict_fp32
    model, frame = gpu_models.build(name)
    model = model.to(device).eval()
    staging = torch.empty_like(frame).pin_memory()
    staging.copy_(frame)
    static_in = staging.to(device)
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.inference_mode(), strict_fp32():
        with torch.cuda.stream(side):
            for _ in range(3):
                model(static_in)
        torch.cuda.current_stream(device).wait_stream(side)
        outs = treespec.flatten(model(static_in))[0]
        host_out = [torch.empty(t.shape, dtype=t.dtype, pin_memory=True) for t in outs]
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_in.copy_(staging, non_blocking=True)
            outs = treespec.flatten(model(static_in))[0]
            for host, out in zip(host_out, outs):
                host.copy_(out, non_blocking=True)
    graph.replay()
    torch.cuda.synchronize(device)
    return graph, staging, host_out, frame


def serve(endpoint: str, name: str, device_name: str) -> None:
    """Serve ``name`` on ``endpoint`` with the minimal loop (child process; never returns)."""
    import zmq
    device = torch.device(device_name)
    graph, staging, host_out, _ = record(name, device)
    stream = torch.cuda.current_stream(device)
    destination = staging.numpy().reshape(-1).view(numpy.uint8)
    outputs = [memoryview(t.numpy()).cast('B') for t in host_out]
    sock = zmq.Context.instance().socket(zmq.ROUTER)
    sock.bind(endpoint)
    print('ready', flush=True)
    while True:
        frames = sock.recv_multipart(copy=False)
        received = time.perf_counter()
        numpy.copyto(destination, numpy.frombuffer(frames[1].buffer, numpy.uint8))
        graph.replay()
        stream.synchronize()
        took = struct.pack('<d', (time.perf_counter() - received) * 1e3)
        tracker = sock.send_multipart([frames[0], took, *outputs], copy=False, track=True)
        tracker.wait()      # the output buffers are reused by the next request


class Minimal:
    """The robot's side of the minimal server floor, for one model."""

    def __init__(self, name: str, device: str):
        import zmq
        from rrto_server.process import child_env, free_port
        self.port = free_port()
        self.proc = subprocess.Popen(
            [sys.executable, '-m', 'bench.gpu_floor', '--minimal-server',
             f'tcp://127.0.0.1:{self.port}', name, device],
            env=child_env(), stdout=subprocess.PIPE, text=True)
        if self.proc.stdout.readline().strip() != 'ready':
            self.close()
            raise RuntimeError(f'{name}: the minimal server did not start')
        self.sock = zmq.Context.instance().socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(f'tcp://127.0.0.1:{self.port}')

    def round_trip(self, frame: torch.Tensor) -> tuple[float, float, list]:
        """Return (wall ms, server ms, reply frames) of one request carrying ``frame``."""
        payload = memoryview(frame.contiguous().numpy()).cast('B')
        start = time.perf_counter()
        self.sock.send(payload, copy=False)
        if not self.sock.poll(30000):
            raise RuntimeError('the minimal server did not answer')
        reply = self.sock.recv_multipart(copy=False)
        wall = (time.perf_counter() - start) * 1e3
        return wall, struct.unpack('<d', reply[0].bytes)[0], reply[1:]

    def close(self) -> None:
        if getattr(self, 'sock', None) is not None:
            self.sock.close(0)
        self.proc.kill()
        self.proc.wait()
