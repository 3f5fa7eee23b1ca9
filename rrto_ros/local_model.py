"""
The model as the robot holds it: run it locally, or describe it for the server.

``load_local_model`` accepts an ``nn.Module``, a ``torch.export`` file
(``.pt2``), a TorchScript file (``.pt``/``.ts``/``.jit``), an ONNX file
(``.onnx``) or ``python:package.module:factory`` (a callable returning an
``nn.Module``).  The robot trusts its own files and loads them with their
native loaders; what goes to the server is always a safe format
(:mod:`rrto_wire.program` or ONNX bytes), built per input signature.
"""

from __future__ import annotations

import copy
import importlib
import json
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch

from rrto_wire import program as program_format
from rrto_wire import treespec
from rrto_wire.program_writer import from_exported
from rrto_wire.tensors import Signature, signature_of
from rrto_wire.weights import unpack_weights


@dataclass
class Artifact:
    """What the server needs to run one input signature of a model."""

    model: str                                  # digest of the program (or ONNX) blob
    signature: Signature
    out_spec: Any
    blobs: dict[str, tuple[str, bytes]] = field(default_factory=dict)
    program: dict | None = None                 # the parsed program JSON (naive mode walks it)

    def weights(self) -> dict[str, torch.Tensor]:
        """Return the program's parameters by name, unpacked from the weights blob."""
        for kind, data in self.blobs.values():
            if kind == 'weights':
                return unpack_weights(bytearray(data))
        return {}


class LocalModel:
    """Base class: a model the robot can run itself and export for the server."""

    label = 'model'

    def run(self, args: tuple, kwargs: dict) -> Any:
        raise NotImplementedError

    def artifact(self, flat: Sequence[torch.Tensor], in_spec: Any) -> Artifact:
        raise NotImplementedError


class FlatModule(torch.nn.Module):
    """Adapt a model to flat tensor inputs and outputs (the form a program takes)."""

    def __init__(self, model: torch.nn.Module, in_spec: Any):
        super().__init__()
        self.model = model
        self.in_spec = in_spec

    def forward(self, *flat: torch.Tensor):
        args, kwargs = treespec.unflatten(list(flat), self.in_spec)
        leaves, _ = treespec.flatten(self.model(*args, **kwargs))
        return tuple(leaves)


class _ExportGuard:
    """
    Readers-writer lock: exports exclusive, local inference shared.

    ``torch.export`` switches mkldnn and cudnn off process-wide while it traces,
    which silently changes the numerics (and speed) of any inference running in
    another thread.  Every local run takes the shared side, every export the
    exclusive side, so no local result is ever computed under an export.
    """

    def __init__(self):
        self._cond = threading.Condition()
        self._readers = 0
        self._writing = False

    def shared(self):
        return _Side(self, exclusive=False)

    def exclusive(self):
        return _Side(self, exclusive=True)


class _Side:
    def __init__(self, guard: _ExportGuard, exclusive: bool):
        self.guard, self.exclusive = guard, exclusive

    def __enter__(self):
        g = self.guard
        with g._cond:
            if self.exclusive:
                g._cond.wait_for(lambda: not g._writing and g._readers == 0)
                g._writing = True
            else:
                g._cond.wait_for(lambda: not g._writing)
                g._readers += 1

    def __exit__(self, *exc):
        g = self.guard
        with g._cond:
            if self.exclusive:
                g._writing = False
            else:
                g._readers -= 1
            g._cond.notify_all()


EXPORT_GUARD = _ExportGuard()


def _program_artifact(ep, in_spec, out_spec, label: str) -> Artifact:
    # _Flat holds the user's model as attribute 'model': module paths start with 'model.'
    program_json, weights = from_exported(ep, in_spec, out_spec, label, scope_prefix='model.')
    digest = program_format.sha256(program_json)
    blobs = {digest: ('program', program_json)}
    if weights:
        blobs[program_format.sha256(weights)] = ('weights', weights)
    doc = json.loads(program_json)
    signature = tuple(program_format.TensorSpec.from_json(i) for i in doc['inputs'])
    return Artifact(digest, signature, out_spec, blobs, doc)


class TorchModule(LocalModel):
    """An ``nn.Module`` in eval mode, exported with ``torch.export`` per signature."""

    def __init__(self, module: torch.nn.Module, label: str | None = None):
        if module.training:
            module = module.eval()
        self.module = module
        self.label = label or type(module).__name__

    def run(self, args: tuple, kwargs: dict) -> Any:
        with EXPORT_GUARD.shared(), torch.inference_mode():
            return self.module(*args, **kwargs)

    def export(self, flat: Sequence[torch.Tensor], in_spec: Any) -> tuple[Any, Any]:
        """Export for one input signature; return the ExportedProgram and the output spec."""
        example = tuple(t.detach() for t in flat)
        args, kwargs = treespec.unflatten(list(example), in_spec)
        _, out_spec = treespec.flatten(self.run(args, kwargs))
        with EXPORT_GUARD.exclusive(), torch.no_grad():
            # export swaps a module's tensors for fake ones while tracing: trace a copy
            module = copy.deepcopy(self.module)
            ep = torch.export.export(FlatModule(module, in_spec).eval(), example, strict=False)
        return ep, out_spec

    def artifact(self, flat: Sequence[torch.Tensor], in_spec: Any) -> Artifact:
        ep, out_spec = self.export(flat, in_spec)
        return _program_artifact(ep, in_spec, out_spec, self.label)


class ExportedFile(TorchModule):
    """A ``torch.export`` archive saved by the user; its signature is fixed."""

    def __init__(self, path: Path):
        self.ep = torch.export.load(str(path))
        super().__init__(self.ep.module(), label=path.stem)


class TorchScriptFile(TorchModule):
    """A TorchScript file; converted to an ATen graph with torch's TorchScript converter."""

    def __init__(self, path: Path):
        super().__init__(torch.jit.load(str(path), map_location='cpu').eval(), label=path.stem)

    def artifact(self, flat: Sequence[torch.Tensor], in_spec: Any) -> Artifact:
        from torch._export.converter import TS2EPConverter
        args, kwargs = treespec.unflatten(list(flat), in_spec)
        if kwargs:
            raise ValueError('TorchScript models are offloaded with positional tensor inputs only')
        with EXPORT_GUARD.exclusive(), torch.no_grad():
            ep = TS2EPConverter(self.module, tuple(args)).convert()
            flat_ep = torch.export.export(FlatModule(ep.module(), in_spec), tuple(flat),
                                          strict=False)
        local = self.run(tuple(args), {})
        _, out_spec = treespec.flatten(local)
        return _program_artifact(flat_ep, in_spec, out_spec, self.label)


class OnnxFile(LocalModel):
    """An ONNX file: onnxruntime on the robot's CPU, the same bytes on the server."""

    def __init__(self, path: Path):
        import onnxruntime as ort
        self.data = path.read_bytes()
        self.label = path.stem
        self.session = ort.InferenceSession(self.data, providers=['CPUExecutionProvider'])
        self.names = [i.name for i in self.session.get_inputs()]
        self.digest = program_format.sha256(self.data)

    def run(self, args: tuple, kwargs: dict) -> Any:
        feeds = dict(zip(self.names, (a.numpy() for a in args)))
        feeds.update({k: v.numpy() for k, v in kwargs.items()})
        outputs = [torch.from_numpy(o) for o in self.session.run(None, feeds)]
        return outputs[0] if len(outputs) == 1 else tuple(outputs)

    def artifact(self, flat: Sequence[torch.Tensor], in_spec: Any) -> Artifact:
        args, kwargs = treespec.unflatten(list(flat), in_spec)
        if kwargs:
            raise ValueError('ONNX models are offloaded with positional tensor inputs only')
        n_out = len(self.session.get_outputs())
        out_spec = 'T' if n_out == 1 else {'tuple': ['T'] * n_out}
        return Artifact(
            self.digest, signature_of(flat), out_spec, {
                self.digest: (
                    'onnx', self.data)})


def load_local_model(spec: Any) -> LocalModel:
    """Return a :class:`LocalModel` for a module, a model file, or ``python:module:factory``."""
    if isinstance(spec, LocalModel):
        return spec
    if isinstance(spec, torch.nn.Module):
        return TorchModule(spec)
    text = str(spec)
    if text.startswith('python:'):
        module_name, _, factory = text[len('python:'):].partition(':')
        if not module_name or not factory:
            raise ValueError(f"model {text!r} must look like 'python:package.module:factory'")
        built = getattr(importlib.import_module(module_name), factory)()
        if not isinstance(built, torch.nn.Module):
            raise TypeError(f'{text} returned {type(built).__name__}, not an nn.Module')
        return TorchModule(built, label=factory)
    path = Path(text)
    if not path.is_file():
        raise FileNotFoundError(f'model file {path} does not exist')
    suffix = path.suffix.lower()
    if suffix == '.onnx':
        return OnnxFile(path)
    if suffix == '.pt2':
        return ExportedFile(path)
    if suffix in ('.pt', '.ts', '.jit', '.torchscript'):
        return TorchScriptFile(path)
    raise ValueError(f'unknown model file type {suffix!r} (expected .pt2, .pt/.ts, .onnx)')
