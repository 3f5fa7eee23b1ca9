"""
Server compute on a GPU: eager vs CUDA-graph replay, and the server's own overhead.

For each zoo architecture at batch 1 on a 224x224x3 uint8 camera frame (with
on-server normalisation), fp32 (strict, TF32 off) and fp16 autocast:

* ``eager_ms``: one inference run op by op (the "offload without replay" server),
  copy-in and copy-out included;
* ``replay_ms``: the same inference as a recorded CUDA graph (the bare replay:
  copy into the static input, ``graph.replay()``, copy the outputs out);
* ``server_ms``: a real server process on loopback, request receipt to reply, median;
* ``server_overhead_ms``: ``server_ms - replay_ms``, what the server adds beyond
  the bare replay (target <= 0.1 ms);
* ``client_overhead_ms``: the robot's call time beyond ``server_ms`` (loopback
  transfers and the client's own work).

Usage: ``python -m bench.gpu_replay --out docs/results/gpu_h100.json``
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch

from bench.machine import write_results
from bench.measure import offloaded_calls, timed_ms
from rrto_server.process import ServerProcess
from rrto_ros.local_model import TorchModule
from rrto_ros.preprocess import WithImageInput
from rrto_ros.zoo import ARCHITECTURES
from rrto_wire import treespec
from rrto_server.models import ModelRegistry
from rrto_server.sandbox import FREE
from rrto_wire.tensors import signature_of
from rrto_server.replay import Replay
from rrto_wire.messages import RecordOptions
from rrto_server.store import BlobStore


def _median_ms(fn, iters: int, warmup: int = 20) -> float:
    return statistics.median(timed_ms(fn, iters, warmup))


def _replay(loaded, frame, precision: str, mode: str, device: torch.device) -> Replay:
    options = RecordOptions(precision=precision, mode=mode)
    return Replay(loaded, signature_of([frame]), options, device)


def measure(arch: str, precision: str, store: str, iters: int) -> dict:
    device = torch.device('cuda')
    model = WithImageInput(ARCHITECTURES[arch]()).eval()
    frame = torch.randint(0, 256, (1, 224, 224, 3), dtype=torch.uint8)
    flat, spec = treespec.flatten(((frame,), {}))
    artifact = TorchModule(model).artifact(flat, spec)
    blobs = BlobStore(store)
    for digest, (kind, data) in artifact.blobs.items():
        blobs.put(digest, kind, data)
    loaded = ModelRegistry(blobs).get(artifact.model, FREE)
    eager = _replay(loaded, frame, precision, 'eager', device)
    replay = _replay(loaded, frame, precision, 'replay', device)
    row = {'arch': arch, 'precision': precision, 'batch': 1, 'input': 'uint8[1,224,224,3]',
           'eager_ms': _median_ms(lambda: eager.start([frame]).run(), iters),
           'replay_ms': _median_ms(lambda: replay.start([frame]).run(), iters),
           'record_ms': replay.record_ms}
    server = ServerProcess(store, None, device='cuda').start()   # no shared GIL, as deployed
    try:
        records = offloaded_calls(model, frame, server.endpoint, iters, precision=precision)
        server_ms = statistics.median(r.server_ms for r in records)
        row.update(server_ms=server_ms,
                   # what the server adds to the bare replay (copy in, replay, copy out)
                   server_overhead_ms=server_ms - row['replay_ms'],
                   server_lane_ms=statistics.median(r.server_compute_ms for r in records),
                   client_total_ms=statistics.median(r.total_ms for r in records),
                   client_overhead_ms=statistics.median(r.total_ms - r.server_ms
                                                        for r in records))
    finally:
        server.stop()
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--out', default='docs/results/gpu_h100.json')
    parser.add_argument('--iters', type=int, default=200)
    parser.add_argument('--store', default='/tmp/rrto-gpu-bench-store')
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        parser.error('needs a CUDA device')
    rows = []
    for arch in sorted(ARCHITECTURES):
        for precision in ('fp32', 'fp16'):
            row = measure(arch, precision, args.store, args.iters)
            print(json.dumps(row), flush=True)
            rows.append(row)
    write_results(args.out, 'python -m bench.gpu_replay', argv, rows)
    return 0


if __name__ == '__main__':
    raise SystemExit(main())
