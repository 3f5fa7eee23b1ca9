"""
What each kind of stored blob must parse as, checked before the store accepts it.

A blob is accepted only under the kind its contents parse as: a ``program``
is an rrto-program whose operators pass :mod:`rrto_wire.ops` (and the
no-writes-into-weights rule), ``weights`` is an RRTOWTS1 blob whose index fits
its bytes, and ``onnx`` is an ONNX model that reads no file: every tensor's data
is inside the upload (``external_data`` entries are refused before onnxruntime
ever sees the model, since onnxruntime resolves them against the server's
working directory), made of listed default-domain operators whose sizes follow
from its input shapes and constants alone (:func:`check_onnx_sizes`).
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
    check_onnx_sizes(model)


# The ONNX operators served: default domain only, each one's output *shapes* a function of
# its input shapes, its attributes and the values of the inputs listed below.  Left out on
# purpose: operators whose output shape follows input values (NonZero, Unique, Compress,
# NonMaxSuppression, the Sequence* family), control flow (Loop, If, Scan), random numbers,
# strings, and everything outside the default domain (contrib ops, model-local functions).
ONNX_OPS = frozenset("""
    Abs Acos Acosh Asin Asinh Atan Atanh Ceil Cos Cosh Erf Exp Floor Identity IsInf IsNaN Log
    Neg Not Reciprocal Round Sign Sin Sinh Sqrt Tan Tanh Sigmoid HardSigmoid HardSwish Relu
    LeakyRelu PRelu Elu Selu Celu Gelu Mish Softplus Softsign ThresholdedRelu Shrink Clip Cast
    Add Sub Mul Div Pow Mod Max Min Mean Sum And Or Xor Equal Greater GreaterOrEqual Less
    LessOrEqual Where BitShift BitwiseAnd BitwiseOr BitwiseXor BitwiseNot
    MatMul Gemm Einsum Conv ConvTranspose MatMulInteger ConvInteger QLinearConv QLinearMatMul
    QuantizeLinear DequantizeLinear DynamicQuantizeLinear
    AveragePool MaxPool GlobalAveragePool GlobalMaxPool LpPool GlobalLpPool
    BatchNormalization InstanceNormalization LayerNormalization GroupNormalization
    LpNormalization MeanVarianceNormalization LRN Softmax LogSoftmax Hardmax
    ReduceSum ReduceMean ReduceMax ReduceMin ReduceProd ReduceL1 ReduceL2 ReduceLogSum
    ReduceLogSumExp ReduceSumSquare ArgMax ArgMin CumSum Trilu TopK
    Shape Size Reshape Flatten Squeeze Unsqueeze Transpose Concat Split Slice Gather
    GatherElements GatherND ScatterElements ScatterND DepthToSpace SpaceToDepth EyeLike
    Expand Tile Pad Resize Upsample ConstantOfShape Range Constant OneHot Dropout
    GridSample RoiAlign
""".split())
# operator -> indices of its inputs whose *values* set an output's shape; each must be static
# (follow from input shapes and constants), so that every shape in the graph is fixed by the
# recorded signature and the sandbox's trial at that signature bounds every call
SHAPE_INPUTS = {'ConstantOfShape': (0,), 'Expand': (1,), 'Tile': (1,), 'Range': (0, 1, 2),
                'Resize': (2, 3), 'Upsample': (1,), 'Pad': (1, 3), 'OneHot': (1,),
                'Reshape': (1,), 'Squeeze': (1,), 'Unsqueeze': (1,), 'Split': (1,),
                'Slice': (1, 2, 3, 4), 'TopK': (1,), 'ReduceSum': (1,), 'ReduceMean': (1,),
                'ReduceMax': (1,), 'ReduceMin': (1,), 'ReduceProd': (1,), 'ReduceL1': (1,),
                'ReduceL2': (1,), 'ReduceLogSum': (1,), 'ReduceLogSumExp': (1,),
                'ReduceSumSquare': (1,)}
# operators whose output values are fixed once the input *shapes* are
SHAPE_ONLY = frozenset({'Shape', 'Size'})
DEFAULT_DOMAINS = ('', 'ai.onnx')


def check_onnx_sizes(model) -> None:
    """
    Raise ProtocolError unless every shape in ``model`` follows from input shapes and constants.

    The sandbox tries a model once per recorded signature with zero-filled inputs, so
    its memory budget holds for every call only if no input *value* can change a
    shape.  Every node must be a listed default-domain operator (:data:`ONNX_OPS`; no
    model-local functions, no other domain, no control flow), so each output's shape
    follows from its inputs' shapes, attributes and the inputs in :data:`SHAPE_INPUTS`;
    those must be static: an initializer, a ``Constant``, a ``Shape`` or ``Size`` of a
    tensor whose own shape is static, or computed from static tensors only.  By
    induction every tensor's shape is then fixed by the signature.
    """
    if len(model.functions):
        raise ProtocolError(ErrorCode.UNSAFE_PROGRAM,
                            'ONNX model-local functions are not served; inline them')
    graph = model.graph
    inputs = {value.name for value in graph.input}       # shapes fixed by the signature
    # an initializer also listed as an input may be fed a value: not static
    static = {init.name for init in graph.initializer} - inputs | {''}   # '' = omitted input
    shaped = static | inputs
    for node in graph.node:
        if node.domain not in DEFAULT_DOMAINS or node.op_type not in ONNX_OPS:
            where = f'{node.domain}.' if node.domain not in DEFAULT_DOMAINS else ''
            raise ProtocolError(
                ErrorCode.UNSAFE_PROGRAM,
                f'ONNX operator {where[:80]}{node.op_type[:80]} is not served (its output '
                'sizes may follow input values, or it runs control flow or another domain)')
        for index in SHAPE_INPUTS.get(node.op_type, ()):
            if index < len(node.input) and node.input[index] not in static:
                raise ProtocolError(
                    ErrorCode.UNSAFE_PROGRAM,
                    f'ONNX {node.op_type} {node.name[:80]!r} takes its size from input '
                    f'{node.input[index][:80]!r}, which depends on the values of the '
                    'model\'s inputs; sizes must follow from input shapes and constants')
        if any(name not in shaped for name in node.input):
            raise ProtocolError(ErrorCode.UNSAFE_PROGRAM,
                                f'ONNX {node.op_type} {node.name[:80]!r} reads a tensor '
                                'no earlier node or graph input defines')
        shaped.update(node.output)
        if node.op_type == 'Constant' or all(name in static for name in node.input) or (
                node.op_type in SHAPE_ONLY and node.input[0] in shaped):
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
