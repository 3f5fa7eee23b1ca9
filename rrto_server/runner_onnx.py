"""
ONNX models through an onnxruntime session, one segment.

The session runs on host numpy arrays (``session.run``), with the CUDA
execution provider when the server has a GPU and onnxruntime offers it, else
on the CPU.  No IOBinding and no CUDA graphs: inputs and outputs cross the
host boundary on every call.
"""

from __future__ import annotations

from typing import Sequence

import torch

from rrto_server.models import LoadedModel
from rrto_server.runner import Execution
from rrto_wire.dtypes import from_onnx
from rrto_wire.errors import ErrorCode, ProtocolError
from rrto_wire.tensors import Signature


class OnnxRunner:
    """ONNX model through onnxruntime; a single segment."""

    num_segments = 1
    backend = 'onnxruntime'
    can_express = False     # always the general path (see rrto_server.express)
    fixed_cost = False      # a Loop's trip count, a NonZero's rows may follow the data

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

    def to_host(self, ex: Execution) -> list[torch.Tensor]:
        return list(ex.outputs)

    def release(self, ex: Execution) -> None:
        ex.env = {}


def _check_onnx_signature(session, signature: Signature) -> None:
    declared = session.get_inputs()
    if len(declared) != len(signature):
        raise ProtocolError(ErrorCode.SIGNATURE,
                            f'model takes {len(declared)} inputs, request has {len(signature)}')
    for arg, spec in zip(declared, signature):
        want = from_onnx(arg.type)
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
