"""
What each kind of stored blob must parse as, checked before the store accepts it.

A blob is accepted only under the kind its contents parse as: a ``program``
is an rrto-program whose operators pass :mod:`rrto_wire.ops` (and the
no-writes-into-weights rule), ``weights`` is an RRTOWTS1 blob whose index fits
its bytes, and ``onnx`` is an ONNX model that reads no file: every tensor's data
is inside the upload (``external_data`` entries are refused before onnxruntime
ever sees the model, since onnxruntime resolves them against the server's
working directory).
"""

from __future__ import annotations

from typing import Iterator

from rrto_wire.program import Program
from rrto_wire.weights import unpack_weights
from rrto_wire.errors import ErrorCode, ProtocolError

KINDS = ('program', 'weights', 'onnx')


def check_kind(kind: str, data: bytes | bytearray | memoryview) -> None:
    """Raise ProtocolError unless ``data`` parses as a blob of ``kind``."""
    if kind == 'program':
        Program.parse(data)
    elif kind == 'weights':
        unpack_weights(data)
    elif kind == 'onnx':
        check_onnx(data)
    else:
        raise ProtocolError(ErrorCode.BAD_REQUEST, f'blob kind must be one of {KINDS}')


def check_onnx(data: bytes | bytearray | memoryview) -> None:
    """Raise ProtocolError unless ``data`` is an ONNX model with all its data inside it."""
    import onnx
    from google.protobuf.message import DecodeError
    try:
        model = onnx.load_model_from_string(bytes(data))
    except (DecodeError, ValueError, RuntimeError) as exc:
        raise ProtocolError(ErrorCode.BAD_REQUEST,
                            f'not an ONNX model: {str(exc)[:200]}') from None
    if not model.HasField('graph'):
        raise ProtocolError(ErrorCode.BAD_REQUEST, 'not an ONNX model: no graph')
    for tensor in _tensors(model):
        if tensor.data_location == onnx.TensorProto.EXTERNAL or len(tensor.external_data):
            raise ProtocolError(
                ErrorCode.UNSAFE_PROGRAM,
                f'ONNX tensor {tensor.name[:80]!r} keeps its data in an external file; '
                'upload a model with every tensor inside it')


def _tensors(model) -> Iterator:
    """Yield every TensorProto of a model: initializers, attributes, subgraphs, functions."""
    graphs = [model.graph]
    nodes = [node for function in model.functions for node in function.node]
    while graphs or nodes:
        if graphs:
            graph = graphs.pop()
            yield from graph.initializer
            yield from (sparse.values for sparse in graph.sparse_initializer)
            yield from (sparse.indices for sparse in graph.sparse_initializer)
            nodes.extend(graph.node)
            continue
        for attr in nodes.pop().attribute:
            if attr.HasField('t'):
                yield attr.t
            yield from attr.tensors
            if attr.HasField('sparse_tensor'):
                yield attr.sparse_tensor.values
                yield attr.sparse_tensor.indices
            if attr.HasField('g'):
                graphs.append(attr.g)
            graphs.extend(attr.graphs)
