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
:class:`BareClient` is the same bare robot against the project's server: it
sends the request the project's robot sends (its header captured once by
:func:`captured_header`, a new id each call) and waits for the reply, so the
robot's own Python (the call path, checks, records) separates from the
server's and the wire's.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import struct
import subprocess
import sys
import time

import numpy
import torch

from bench import gpu_models
from rrto_wire import protocol, treespec


def record(name: str, device: torch.device) -> tuple:
    """
    Return (run, staging input, page-locked outputs) for ``name`` on ``device``.

    On CUDA ``run`` replays the graph (inputs in, outputs out inside it) and
    synchronises; on a CPU (tests) it runs the model eagerly into the same buffers.
    """
    from bench.gpu_floor import strict_fp32
    model, frame = gpu_models.build(name)
    model = model.to(device).eval()
    if device.type != 'cuda':
        staging = frame.clone()
        with torch.inference_mode():
            host_out = [t.clone(memory_format=torch.contiguous_format)     # sent as bytes
                        for t in treespec.flatten(model(staging))[0]]

        def run_eager():
            with torch.inference_mode():
                for host, out in zip(host_out, treespec.flatten(model(staging))[0]):
                    host.copy_(out)
        return run_eager, staging, host_out
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
    stream = torch.cuda.current_stream(device)

    def run_graph():
        graph.replay()
        stream.synchronize()
    run_graph()
    return run_graph, staging, host_out


def serve(endpoint: str, name: str, device_name: str) -> None:
    """Serve ``name`` on ``endpoint`` with the minimal loop (child process; never returns)."""
    import zmq
    run, staging, host_out = record(name, torch.device(device_name))
    destination = staging.numpy().reshape(-1).view(numpy.uint8)
    outputs = [memoryview(t.numpy()).cast('B') for t in host_out]
    sock = zmq.Context.instance().socket(zmq.ROUTER)
    sock.bind(endpoint)
    print('ready', flush=True)
    while True:
        frames = sock.recv_multipart(copy=False)
        received = time.perf_counter()
        numpy.copyto(destination, numpy.frombuffer(frames[1].buffer, numpy.uint8))
        run()
        took = struct.pack('<d', (time.perf_counter() - received) * 1e3)
        # the peer's routing id as bytes: a received Frame cannot be sent tracked
        tracker = sock.send_multipart([frames[0].bytes, took, *outputs], copy=False,
                                      track=True)
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


def captured_header(call) -> dict:
    """
    Return the header of the last message ``call()`` sends through the wire protocol.

    Read off the frames sent (``protocol.send_frames``), not ``encode``: the
    robot sends a repeated INFER's header from kept bytes (issue 11).
    """
    seen = []
    send = protocol.send_frames

    def recording(sock, frames):
        seen.append(json.loads(bytes(memoryview(frames[0]))))
        return send(sock, frames)
    protocol.send_frames = recording
    try:
        call()
    finally:
        protocol.send_frames = send
    if not seen:
        raise RuntimeError('the call sent no message')
    return seen[-1]


class BareClient:
    """A bare DEALER robot sending the project robot's own request to the project's server."""

    def __init__(self, endpoint: str, header: dict, frame: torch.Tensor):
        import zmq
        self.header, self.frame = dict(header), frame
        self._ids = itertools.count(1 << 40)     # clear of the robot's own ids
        self.sock = zmq.Context.instance().socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(endpoint)

    def round_trip(self) -> tuple[float, float, list]:
        """Return (wall ms, the reply's server_ms, its tensor frames) of one request."""
        header = dict(self.header, id=next(self._ids))
        frames = protocol.encode(header, [self.frame])
        start = time.perf_counter()
        self.sock.send_multipart(frames, copy=False)
        if not self.sock.poll(30000):
            raise RuntimeError('the server did not answer the bare client')
        reply = self.sock.recv_multipart(copy=False)
        wall = (time.perf_counter() - start) * 1e3
        answer = json.loads(reply[0].bytes)
        if answer.get('kind') != 'ok' or answer.get('id') != header['id']:
            raise RuntimeError(f'the server answered the bare client with {answer}')
        return wall, answer['server_ms'], reply[1:]

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.sock.close(0)
