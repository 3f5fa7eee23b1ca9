"""Only safe programs run: operator allowlist, no writes into shared state, sandboxed trials."""

import json

import exploits
import pytest
import torch

from rrto_server.models import ModelRegistry
from rrto_server.sandbox import FREE, Sandbox, refusal
from rrto_server.store import BlobStore
from rrto_wire import ops
from rrto_wire.program import Program, sha256
from rrto_wire.weights import unpack_weights
from rrto_wire.errors import ErrorCode, ProtocolError


def _refused(blob: bytes) -> ProtocolError:
    with pytest.raises(ProtocolError) as err:
        Program.parse(blob)
    return err.value


def test_the_sparse_segfault_program_is_refused_before_it_runs():
    err = _refused(exploits.sparse_segfault())
    assert err.code == ErrorCode.BAD_REQUEST and 'not allowed' in err.message


@pytest.mark.parametrize('op', [
    'aten._sparse_coo_tensor_with_dims_and_tensors.default', 'aten.sparse_coo_tensor.size',
    'aten.to_dense.default', 'aten.index_select.default', 'aten.scatter.value',
    'aten.embedding.default', 'aten.index_put_.default', 'aten.as_strided.default',
    'aten.set_.source_Tensor', 'aten.empty_like.default', 'aten.empty_strided.default',
    'aten.from_file.default', 'aten.add.out', 'aten.relu.out', 'aten.nonzero.default',
    'aten._local_scalar_dense.default', 'aten.scatter.src'])
def test_operators_that_trust_their_arguments_are_not_allowed(op):
    with pytest.raises(ProtocolError, match='not allowed'):
        ops.resolve(op)


def _on_python_values(schema) -> bool:
    """Overloads on lists, dicts, numbers or strings rather than tensors (``add.t``)."""
    return (any(str(r.type) not in ('Tensor', 'List[Tensor]') for r in schema.returns)
            or any(t in str(a.type) for a in schema.arguments
                   for t in ('List[t]', 'List[str]', 'Dict', 'complex', 'Enum'))
            or any(str(a.type) == 't' for a in schema.arguments))


def test_every_allowed_operator_exists_and_only_out_and_scalar_overloads_are_refused():
    resolved = 0
    for name in ops.ALLOWED_ATEN:
        packet = getattr(torch.ops.aten, name)
        for overload in packet.overloads():
            schema = getattr(packet, overload)._schema
            writes_out = any(a.kwarg_only and a.alias_info is not None and a.alias_info.is_write
                             for a in schema.arguments)
            refused = (writes_out or _on_python_values(schema)
                       or f'{name}.{overload}' == 'where.default')
            try:
                ops.resolve(f'aten.{name}.{overload}')
                resolved += 1
                assert not refused, overload
            except ProtocolError:
                assert refused, f'aten.{name}.{overload}'
    assert resolved > 200


def test_sparse_layouts_cannot_be_named():
    doc = json.loads(exploits.program(
        [exploits.node('z', 'aten.zeros.default', [4], layout={'layout': 'sparse_coo'}),
         exploits.node('y', 'aten.add.Tensor', {'n': 'x'}, {'n': 'z'},
                       out=('float32', (4,)))], ['y']))
    program = Program.parse(json.dumps(doc).encode())      # the layout is checked when built
    with pytest.raises(ProtocolError, match="unknown layout 'sparse_coo'"):
        program.module({}, torch.device('cpu'))


def test_getitem_only_indexes_tuples():
    blob = exploits.program([exploits.node('y', 'operator.getitem', {'n': 'x'}, [0, 1])], ['y'])
    module = Program.parse(blob).module({}, torch.device('cpu'))
    with pytest.raises(ProtocolError, match='only indexes tuples'):
        module(torch.zeros(4))


@pytest.mark.parametrize('through_view', [False, True])
def test_inplace_operators_on_weights_are_refused(through_view):
    blob, _ = exploits.tamper_weights(through_view)
    err = _refused(blob)
    assert err.code == ErrorCode.UNSAFE_PROGRAM and 'writes into' in err.message


def test_inplace_operators_on_an_input_are_refused():
    blob = exploits.program([exploits.node('y', 'aten.relu_.default', {'n': 'x'},
                                           out=('float32', (4,)))], ['y'])
    assert _refused(blob).code == ErrorCode.UNSAFE_PROGRAM


def test_inplace_operators_on_intermediates_still_run():
    module = Program.parse(exploits.inplace_on_intermediate()).module({}, torch.device('cpu'))
    x = torch.tensor([-1.0, 0.5, 2.0, -3.0])
    (y,) = module(x)
    assert torch.equal(y, torch.relu(x * -2.0) + 1.0)


# ------------------------------------------------------------------ sandbox

def _stored(tmp_path, *blobs):
    store = BlobStore(tmp_path / 'store')
    for kind, blob in blobs:
        store.put(sha256(blob), kind, blob)
    return store


def test_a_model_that_allocates_2_gib_is_refused_by_the_sandbox(tmp_path):
    blob = exploits.allocates(2 << 30)
    store = _stored(tmp_path, ('program', blob))
    registry = ModelRegistry(store, sandbox=Sandbox(store.root))
    with pytest.raises(ProtocolError) as err:
        registry.get(sha256(blob), FREE)
    assert err.value.code == ErrorCode.UNSAFE_PROGRAM and 'memory' in err.value.message


def test_a_model_over_the_measured_memory_budget_is_refused(tmp_path):
    blob = exploits.allocates(192 << 20)
    store = _stored(tmp_path, ('program', blob))
    registry = ModelRegistry(store, sandbox=Sandbox(store.root, max_bytes=64 << 20))
    with pytest.raises(ProtocolError, match='MiB') as err:
        registry.get(sha256(blob), FREE)
    assert err.value.code == ErrorCode.UNSAFE_PROGRAM


def test_a_model_that_burns_cpu_is_killed_and_refused(tmp_path):
    blob = exploits.burns_cpu()
    store = _stored(tmp_path, ('program', blob))
    registry = ModelRegistry(store, sandbox=Sandbox(store.root, max_s=1.0))
    with pytest.raises(ProtocolError, match='CPU time budget') as err:
        registry.get(sha256(blob), FREE)
    assert err.value.code == ErrorCode.UNSAFE_PROGRAM


def test_a_cuda_fault_refuses_the_model_where_an_ordinary_error_fails_it():
    assert refusal('RuntimeError: CUDA error: device-side assert triggered').startswith(
        'CUDA fault')
    assert refusal('AcceleratorError: CUDA error: an illegal memory access was encountered')
    assert refusal('OutOfMemoryError: CUDA out of memory.') == 'ran out of its memory budget'
    assert refusal('RuntimeError: The size of tensor a (4) must match') is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason='a trial on CUDA needs a GPU')
def test_on_a_cuda_server_the_trial_runs_on_cuda_with_a_device_memory_budget(tmp_path):
    program, weights = exploits.scale_by_weights()
    hog, big = exploits.allocates(8 << 30), exploits.allocates(192 << 20)
    store = _stored(tmp_path, ('weights', weights), ('program', program), ('program', hog),
                    ('program', big))
    torch.zeros(1, device='cuda')      # CUDA is live in the server: the child must not fork it
    sandbox = Sandbox(store.root, max_bytes=64 << 20, device='cuda')
    verdict = sandbox.check(sha256(program), 'program', pay=FREE)
    assert verdict.outcome == 'safe' and verdict.device == 'cuda'
    for blob, words in ((hog, 'memory budget'), (big, 'needs 192 MiB')):
        with pytest.raises(ProtocolError, match=words) as err:
            sandbox.check(sha256(blob), 'program', pay=FREE)
        assert err.value.code == ErrorCode.UNSAFE_PROGRAM
    # a verdict on one device is not reused on another
    assert Sandbox(store.root, max_bytes=64 << 20).check(
        sha256(program), 'program', pay=FREE).device == 'cpu'


def test_verdicts_are_remembered_per_digest_and_across_restarts(tmp_path):
    program, weights = exploits.scale_by_weights()
    store = _stored(tmp_path, ('weights', weights), ('program', program))
    sandbox = Sandbox(store.root)
    registry = ModelRegistry(store, sandbox=sandbox)
    model = registry.get(sha256(program), FREE)
    assert sandbox.trials == 1 and model.verdict.outcome == 'safe'
    assert 0 <= model.verdict.call_s < sandbox.max_s
    (y,) = model.program.module(model.weights(torch.device('cpu')),
                                torch.device('cpu'))(torch.ones(4))
    assert torch.equal(y, unpack_weights(bytearray(weights))['w'])
    again = Sandbox(store.root)                   # a restarted server
    assert again.check(sha256(program), 'program', pay=FREE).outcome == 'safe'
    assert again.trials == 0
    stricter = Sandbox(store.root, max_s=5.0)     # other limits: tried again
    stricter.check(sha256(program), 'program', pay=FREE)
    assert stricter.trials == 1


def test_keyword_names_cannot_inject_code_into_the_generated_module(tmp_path):
    marker = tmp_path / 'pwned'
    key = f"alpha=1); __import__('os').system('touch {marker}'); print(end"
    blob = exploits.program([exploits.node('y', 'aten.add.Tensor', {'n': 'x'}, 1.0,
                                           out=('float32', (4,)), **{key: ''})], ['y'])
    err = _refused(blob)
    assert err.code == ErrorCode.BAD_REQUEST and 'not a keyword argument' in err.message
    assert not marker.exists()
    ok = exploits.program([exploits.node('y', 'aten.add.Tensor', {'n': 'x'}, 1.0, alpha=2,
                                         out=('float32', (4,)))], ['y'])
    (y,) = Program.parse(ok).module({}, torch.device('cpu'))(torch.ones(4))
    assert torch.equal(y, torch.full((4,), 3.0))


def test_data_dependent_indexing_never_reaches_a_kernel_out_of_range():
    blob = exploits.program([
        exploits.node('i', 'aten.full.default', [3], 1 << 40, dtype={'dtype': 'int64'}),
        exploits.node('y', 'aten.index.Tensor', {'n': 'x'}, [{'n': 'i'}],
                      out=('float32', (3,)))], ['y'])
    module = Program.parse(blob).module({}, torch.device('cpu'))
    x = torch.arange(4.0)
    (y,) = module(x)
    assert torch.equal(y, torch.full((3,), 3.0))          # clamped, never out of bounds
    ok = exploits.program([
        exploits.node('i', 'aten.full.default', [2], 2, dtype={'dtype': 'int64'}),
        exploits.node('y', 'aten.index.Tensor', {'n': 'x'}, [None, {'n': 'i'}],
                      out=('float32', (2, 2)))], ['y'], inputs=(('x', 'float32', (2, 4)),))
    x = torch.arange(8.0).reshape(2, 4)
    (y,) = Program.parse(ok).module({}, torch.device('cpu'))(x)
    assert torch.equal(y, x[:, torch.tensor([2, 2])])     # in range: exactly as locally
    g = exploits.program([
        exploits.node('i', 'aten.full.default', [4], -7, dtype={'dtype': 'int64'}),
        exploits.node('y', 'aten.gather.default', {'n': 'x'}, 0, {'n': 'i'},
                      out=('float32', (4,)))], ['y'])
    (y,) = Program.parse(g).module({}, torch.device('cpu'))(torch.arange(4.0) + 1)
    assert torch.equal(y, torch.ones(4))
