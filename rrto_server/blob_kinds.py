"""
What each kind of stored blob must parse as, checked before the store accepts it.

A blob is accepted only under the kind its contents parse as: a ``program``
is an rrto-program whose operators pass :mod:`rrto_wire.ops` (and the
no-writes-into-weights rule), ``weights`` is an RRTOWTS1 blob whose index fits
its bytes, and ``onnx`` is an ONNX model that reads no file: every tensor's data
is inside the upload (``external_data`` entries are refused before onnxruntime
ever sees the model, since onnxruntime resolves them against the server's
working directory), whose sizes follow from its input shapes and constants
alone (:func:`check_onnx_sizes`), and that has no control flow.
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
    check_onnx_sizes(model.graph)


# operator -> indices of the inputs that set its output's size (not bounded by an input's size)
SIZE_INPUTS = {'ConstantOfShape': (0,), 'Expand': (1,), 'Tile': (1,), 'Range': (0, 1, 2),
               'Resize': (2, 3), 'Upsample': (1,), 'Pad': (1,), 'OneHot': (1,),
               'CenterCropPad': (1,), 'Col2Im': (1, 2), 'MaxUnpool': (2,), 'DFT': (1,),
               'STFT': (1, 3), 'MelWeightMatrix': (0, 1), 'BlackmanWindow': (0,),
               'HannWindow': (0,), 'HammingWindow': (0,)}
# operators whose work or size a value can drive beyond any limit checked at recording
CONTROL_FLOW = frozenset({'Loop', 'Scan', 'If', 'SequenceMap'})
# operators whose outputs are fixed once the input shapes are (a recorded signature)
SHAPE_ONLY = frozenset({'Shape', 'Size'})


def check_onnx_sizes(graph) -> None:
    """
    Raise ProtocolError unless every size in ``graph`` follows from input shapes and constants.

    The sandbox tries a model once per recorded signature with zero-filled inputs, so
    its memory budget holds for every call only if no input *value* can change a
    size: a tensor is static if it is an initializer, a ``Constant``, a ``Shape`` or
    ``Size`` of anything, or computed from static tensors only; every input that sets
    an operator's output size (``SIZE_INPUTS``) must be static.  Control flow
    (``Loop``, ``If``...) is refused outright: its trip count or branch can follow a value.
    """
    static = {init.name for init in graph.initializer} | {''}   # '' = an omitted input
    for node in graph.node:
        if node.op_type in CONTROL_FLOW:
            raise ProtocolError(ErrorCode.UNSAFE_PROGRAM,
                                f'ONNX operator {node.op_type} (control flow) is not served')
        for index in SIZE_INPUTS.get(node.op_type, ()):
            if index < len(node.input) and node.input[index] not in static:
                raise ProtocolError(
                    ErrorCode.UNSAFE_PROGRAM,
                    f'ONNX {node.op_type} {node.name[:80]!r} takes its size from input '
                    f'{node.input[index][:80]!r}, which depends on the values of the '
                    'model\'s inputs; sizes must follow from input shapes and constants')
        if node.op_type in SHAPE_ONLY or node.op_type == 'Constant' or all(
                name in static for name in node.input):
            static.update(node.output)


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
