"""a15 #1 (as a class), #7 (label), #8 (device): no allowed operator reads past an argument.

Every allowed overload that takes more than one tensor (or trusts an index, a
code or a scale) is called through :func:`rrto_wire.ops.resolve`, as the
server calls it: first with consistent arguments (the case is valid), then
with one argument too short or out of range, which must raise, never run.
"""

import json

import pytest
import torch

import exploits
from rrto_ros.client import RemoteError, RrtoClient
from rrto_wire import ops, ops_checked
from rrto_wire.errors import ErrorCode, ProtocolError
from rrto_wire.program import MAX_LABEL_CHARS, Program, sha256
from rrto_wire.tensors import TensorSpec

C = 4                                   # channels of every per-channel case


class _Resolved:
    """``R.packet.overload``: the callable the server runs for ``aten.packet.overload``."""

    calls = None                        # a list: each call is recorded there, not made

    def __init__(self, packet: str = ''):
        self.packet = packet

    def __getattr__(self, name: str):
        if not self.packet:
            return _Resolved(name)
        fn = ops.resolve(f'aten.{self.packet}.{name}')
        if _Resolved.calls is None:
            return fn
        return lambda *args, **kwargs: _Resolved.calls.append((fn, list(args), kwargs))


A = R = _Resolved()


def _op(name: str):
    """Return ``R``'s callable for a full operator name (``aten.packet.overload``)."""
    _, packet, overload = name.split('.')
    return getattr(getattr(R, packet), overload)


def _t(*shape, value=1.0, dtype=torch.float32):
    return torch.full(shape, value, dtype=dtype)


def _conv(dims, transposed=False):
    """Return (input, weight, bias) builders for a 1/2/3-d convolution with C channels."""
    space = (5,) * dims
    return _t(1, C, *space), _t(C, C, *(3,) * dims, value=0.1), _t(C)


def _conv_cases(name, dims, call, transposed=False):
    x, w, b = _conv(dims, transposed)
    return {name: (lambda: call(x, w, b),
                   [lambda: call(x, w, _t(2)),                          # bias of 2 for C
                    lambda: call(x, _t(C, 2, *(3,) * dims), b) if not transposed
                    else call(x, _t(2, C, *(3,) * dims), b)])}          # weight's channels


def _norm_cases():
    x, v = _t(2, C, 3), _t(C)
    cases = {}

    def four(name, call):
        cases[name] = (lambda: call(x, v, v, v, v),
                       [lambda i=i: call(x, *[_t(1) if j == i else v for j in range(4)])
                        for i in range(4)] +
                       [lambda: call(x, v, v, v.double(), v)])          # a dtype it reinterprets
    four('aten.batch_norm.default',
         lambda x, w, b, m, s: A.batch_norm.default(x, w, b, m, s, False, 0.1, 1e-5, False))
    four('aten._native_batch_norm_legit_no_training.default',
         lambda *a: _op('aten._native_batch_norm_legit_no_training.default')(
             *a, 0.1, 1e-5))
    four('aten.native_batch_norm.default',
         lambda *a: _op('aten.native_batch_norm.default')(*a, False, 0.1, 1e-5))
    four('aten.instance_norm.default',
         lambda x, w, b, m, s: A.instance_norm.default(x, w, b, m, s, True, 0.1, 1e-5, False))
    for name, call in (
            ('aten.group_norm.default', lambda x, w, b: A.group_norm.default(x, 2, w, b, 1e-5)),
            ('aten.native_group_norm.default',
             lambda x, w, b: A.native_group_norm.default(x, w, b, 2, C, 3, 2, 1e-5)),
            ('aten.layer_norm.default',
             lambda x, w, b: A.layer_norm.default(x, [3], w[:3], b[:3])),
            ('aten.native_layer_norm.default',
             lambda x, w, b: A.native_layer_norm.default(x, [3], w[:3], b[:3], 1e-5))):
        cases[name] = (lambda call=call: call(x, v, v),
                       [lambda call=call: call(x, _t(1), v), lambda call=call: call(x, v, _t(1))])
    return cases


def _binary(name, call, a=None, b=None):
    """A two-tensor operator: ``b`` of 3 elements against ``a`` of 4 in its last dim."""
    a = _t(2, 4) if a is None else a
    b = _t(2, 4) if b is None else b
    return {name: (lambda: call(a.clone(), b), [lambda: call(a.clone(), b[..., :3])])}


def _pointwise():
    cases = {}
    for packet, overloads in (('add', ('Tensor',)), ('add_', ('Tensor',)), ('sub', ('Tensor',)),
                              ('sub_', ('Tensor',)), ('mul', ('Tensor',)), ('mul_', ('Tensor',)),
                              ('div', ('Tensor',)), ('div_', ('Tensor',)), ('rsub', ('Tensor',)),
                              ('eq', ('Tensor',)), ('ne', ('Tensor',)), ('lt', ('Tensor',)),
                              ('le', ('Tensor',)), ('gt', ('Tensor',)), ('ge', ('Tensor',)),
                              ('logical_and', ('default',)), ('logical_or', ('default',)),
                              ('maximum', ('default',)), ('minimum', ('default',)),
                              ('max', ('other',)), ('min', ('other',)),
                              ('pow', ('Tensor_Tensor',)),
                              ('pow_', ('Tensor',)), ('clamp_min', ('Tensor',)),
                              ('clamp_min_', ('Tensor',)), ('clamp_max', ('Tensor',)),
                              ('clamp_max_', ('Tensor',)), ('copy', ('default',)),
                              ('copy_', ('default', 'Tensor')), ('expand_as', ('default',))):
        for overload in overloads:
            name = f'aten.{packet}.{overload}'
            cases.update(_binary(name, lambda a, b, name=name: _op(name)(a, b)))
    for overload in ('Tensor_mode',):
        for packet in ('div', 'div_'):
            name = f'aten.{packet}.{overload}'
            cases.update(_binary(name, lambda a, b, name=name: _op(name)(
                a, b, rounding_mode='floor')))
    for packet in ('clamp', 'clamp_'):
        name = f'aten.{packet}.Tensor'
        cases.update(_binary(name, lambda a, b, name=name: _op(name)(a, b, b)))
    mask = torch.ones(2, 4, dtype=torch.bool)
    for packet in ('masked_fill', 'masked_fill_'):
        cases.update(_binary(f'aten.{packet}.Scalar', lambda a, m, p=packet: _op(
            f'aten.{p}.Scalar')(a, m, 0.0), b=mask))
        cases.update(_binary(f'aten.{packet}.Tensor', lambda a, m, p=packet: _op(
            f'aten.{p}.Tensor')(a, m, torch.tensor(0.0)), b=mask))
    cases.update(_binary('aten.where.self', lambda m, a: A.where.self(m, a, a), a=mask))
    cases.update(_binary('aten.where.ScalarOther',
                         lambda m, a: A.where.ScalarOther(m, a, 0.0), a=mask))
    cases.update(_binary('aten.where.ScalarSelf',
                         lambda m, a: A.where.ScalarSelf(m, 0.0, a), a=mask))
    for packet in ('fill', 'fill_'):
        name = f'aten.{packet}.Tensor'
        cases[name] = (lambda n=name: _op(n)(_t(2, 4), torch.tensor(1.0)),
                       [lambda n=name: _op(n)(_t(2, 4), _t(3))])   # value: 0-d
    return cases


def _linear_algebra():
    m23, m34, v4 = _t(2, 3), _t(3, 4), _t(4)
    cases = {}
    for overload, extra in (('default', ()), ('dtype', (torch.float32,))):
        cases[f'aten.addmm.{overload}'] = (
            lambda e=extra: A.addmm.default(v4, m23, m34) if not e else
            _op('aten.addmm.dtype')(v4, m23, m34, *e),
            [lambda e=extra: _op(f'aten.addmm.{"dtype" if e else "default"}')(
                _t(3), m23, m34, *e),
             lambda e=extra: _op(f'aten.addmm.{"dtype" if e else "default"}')(
                v4, m23, _t(2, 4), *e)])
        cases[f'aten.mm.{overload}'] = (
            lambda e=extra: _op(f'aten.mm.{"dtype" if e else "default"}')(m23, m34, *e),
            [lambda e=extra: _op(f'aten.mm.{"dtype" if e else "default"}')(
                m23, _t(2, 4), *e)])
        cases[f'aten.bmm.{overload}'] = (
            lambda e=extra: _op(f'aten.bmm.{"dtype" if e else "default"}')(
                m23[None], m34[None], *e),
            [lambda e=extra: _op(f'aten.bmm.{"dtype" if e else "default"}')(
                m23[None], _t(1, 2, 4), *e)])
        cases[f'aten.baddbmm.{overload}'] = (
            lambda e=extra: _op(f'aten.baddbmm.{"dtype" if e else "default"}')(
                v4, m23[None], m34[None], *e),
            [lambda e=extra: _op(f'aten.baddbmm.{"dtype" if e else "default"}')(
                _t(3), m23[None], m34[None], *e)])
    cases['aten.matmul.default'] = (lambda: A.matmul.default(m23, m34),
                                    [lambda: A.matmul.default(m23, _t(2, 4))])
    cases['aten.linear.default'] = (lambda: A.linear.default(m23, m34.t(), v4),
                                    [lambda: A.linear.default(m23, m34.t(), _t(2)),
                                     lambda: A.linear.default(m23, _t(4, 2), v4)])
    q = _t(1, 2, 5, 8)
    cases['aten.scaled_dot_product_attention.default'] = (
        lambda: (A.scaled_dot_product_attention.default(q, q, q),
                 A.scaled_dot_product_attention.default(q, q, q, _t(5, 5))),
        [lambda: A.scaled_dot_product_attention.default(q, q[..., :3, :], q),
         lambda: A.scaled_dot_product_attention.default(q, q, q[..., :3, :]),
         lambda: A.scaled_dot_product_attention.default(q, q, _t(1, 1, 5, 8)),
         lambda: A.scaled_dot_product_attention.default(q, q[..., :4], q),
         lambda: A.scaled_dot_product_attention.default(q, q, q, _t(5, 3))])
    for name, call in (('aten.einsum.default', lambda a, b: A.einsum.default('ij,jk->ik', [a, b])),
                       ('aten.cat.default', lambda a, b: A.cat.default([a, b.t()])),
                       ('aten.concat.default', lambda a, b: A.concat.default([a, b.t()])),
                       ('aten.stack.default', lambda a, b: A.stack.default([a, b[:, :2].t()]))):
        cases[name] = (lambda call=call: call(m23, m34),
                       [lambda call=call: call(m23, _t(2, 4))])
    for overload, kw in (('default', {}), ('indexing', {'indexing': 'ij'})):
        cases[f'aten.meshgrid.{overload}'] = (
            lambda o=overload, kw=kw: _op(f'aten.meshgrid.{o}')([v4, v4[:2]], **kw),
            [lambda o=overload, kw=kw: _op(f'aten.meshgrid.{o}')([m23, v4], **kw)])
    return cases


def _others():
    x = _t(1, C, 6, 6)
    grid = torch.zeros(1, 3, 3, 2)
    cases = {}
    for name in ('aten.grid_sampler.default', 'aten.grid_sampler_2d.default'):
        cases[name] = (lambda n=name: _op(n)(x, grid, 0, 0, False),
                       [lambda n=name: _op(n)(x, grid[..., :1], 0, 0, False),
                        lambda n=name: _op(n)(x, grid, 9, 0, False),    # unwritten
                        lambda n=name: _op(n)(x, grid, 0, 3, False),
                        lambda n=name: _op(n)(x, grid, -1, 0, False)])
    cases['aten._prelu_kernel.default'] = (
        lambda: _op('aten._prelu_kernel.default')(x, _t(C, 1, 1)),
        [lambda: _op('aten._prelu_kernel.default')(x, _t(2, 1, 1))])
    cases['aten.prelu.default'] = (lambda: A.prelu.default(x, _t(C)),
                                   [lambda: A.prelu.default(x, _t(2))])
    cases['aten.narrow.Tensor'] = (lambda: A.narrow.Tensor(x, 2, torch.tensor(1), 2),
                                   [lambda: A.narrow.Tensor(x, 2, torch.tensor(5), 2)])
    cases['aten.linspace.Tensor_Tensor'] = (
        lambda: A.linspace.Tensor_Tensor(torch.tensor(0.0), torch.tensor(1.0), 5),
        [lambda: A.linspace.Tensor_Tensor(_t(2), torch.tensor(1.0), 5)])
    cases['aten.sort.Tensor'] = (lambda: A.sort.Tensor([torch.tensor(2.0), torch.tensor(1.0)]),
                                 [lambda: A.sort.Tensor([_t(2), torch.tensor(1.0)])])
    # these read only the other tensor's dtype: no size of it is used
    cases['aten.type_as.default'] = (lambda: A.type_as.default(x, _t(1)), [])
    cases['aten.to.other'] = (lambda: A.to.other(x, _t(1)), [])
    # upsampling with a scale that does not give its output size (the aa kernel: SIGSEGV)
    x3 = _t(1, C, 8)
    for name, call in (
            ('aten.upsample_nearest1d.default', lambda s: (x3, [16], s)),
            ('aten.upsample_linear1d.default', lambda s: (x3, [16], False, s)),
            ('aten.upsample_nearest2d.default', lambda s: (x, [12, 12], s, s)),
            ('aten._upsample_nearest_exact2d.default', lambda s: (x, [12, 12], s, s)),
            ('aten.upsample_bilinear2d.default', lambda s: (x, [12, 12], False, s, s)),
            ('aten.upsample_bicubic2d.default', lambda s: (x, [12, 12], False, s, s)),
            ('aten._upsample_bilinear2d_aa.default', lambda s: (x, [12, 12], False, s, s))):
        cases[name] = (lambda n=name, c=call: _op(n)(*c(2.0)),
                       [lambda n=name, c=call, s=s: _op(n)(*c(s))
                        for s in (1e-6, 0.5, -1.0, float('nan'), float('inf'))])
        vec = name.replace('.default', '.vec')   # torch sizes the output from the scales
        input, sizes, *middle = [a for a in call(None) if a is not None]
        scales = [2.0] * len(sizes)
        cases[vec] = (lambda n=vec, a=(input, None, *middle, scales): _op(n)(*a),
                      [lambda n=vec, a=(input, sizes, *middle, scales): _op(n)(*a)])
    return cases


def _convolutions():
    cases = {}
    for dims in (1, 2, 3):
        cases.update(_conv_cases(f'aten.conv{dims}d.default', dims,
                                 lambda x, w, b, d=dims: getattr(A, f'conv{d}d').default(x, w, b)))
        cases.update(_conv_cases(f'aten.conv{dims}d.padding', dims,
                                 lambda x, w, b, d=dims: getattr(A, f'conv{d}d').padding(
                                     x, w, b, [1] * d, 'same')))
    for dims, name in ((1, 'aten.conv_transpose1d.default'), (2, 'aten.conv_transpose2d.input')):
        cases.update(_conv_cases(name, dims, lambda x, w, b, n=name: _op(n)(x, w, b),
                                 transposed=True))
    cases.update(_conv_cases('aten.convolution.default', 2, lambda x, w, b: A.convolution.default(
        x, w, b, [1, 1], [0, 0], [1, 1], False, [0, 0], 1)))
    for overload, flags in (('default', (False, False, True, True)),
                            ('deprecated', (False, False, True))):
        cases.update(_conv_cases(
            f'aten._convolution.{overload}', 2,
            lambda x, w, b, o=overload, f=flags: _op(f'aten._convolution.{o}')(
                x, w, b, [1, 1], [0, 0], [1, 1], False, [0, 0], 1, *f)))
    return cases


CASES = {**_convolutions(), **_norm_cases(), **_pointwise(), **_linear_algebra(), **_others()}


def _allowed_overloads():
    """Yield (name, callable) for every overload the allowlist resolves."""
    for packet in sorted(ops.ALLOWED_ATEN):
        for overload in getattr(torch.ops.aten, packet).overloads():
            name = f'aten.{packet}.{overload}'
            try:
                yield name, ops.resolve(name)
            except ProtocolError:
                continue


def _needs_case(fn) -> bool:
    tensors = [arg for arg in fn._schema.arguments if str(arg.type) in
               ('Tensor', 'Optional[Tensor]', 'List[Tensor]', 'List[Optional[Tensor]]')]
    return len(tensors) > 1 or any('List' in str(arg.type) for arg in tensors) or \
        ops_checked.has_check(fn)


def test_every_allowed_overload_taking_several_tensors_has_a_short_argument_case():
    """A new operator on the allowlist fails here until its kernel's checks are shown."""
    missing = sorted(name for name, fn in _allowed_overloads()
                     if _needs_case(fn) and name not in CASES)
    assert not missing, missing


# torch 2.11's CUDA wheel has these overloads of allowed packets; 2.13's CPU wheel has none
_NAMED_211 = ('names', 'names_out', 'Dimname', 'dimname', 'dimname_out', 'names_dim',
              'names_dim_max', 'dim_DimnameList', 'DimnameList', 'using_names', 'named_out_dim',
              'dim_Dimname', 'correction_names', 'names_ScalarOpt_dim_dtype')


def test_named_tensor_overloads_are_refused_whatever_the_build():
    """The allowlist's packets have other overloads per build: named-tensor ones never pass."""
    assert all(ops.named_tensor(name) for name in _NAMED_211)
    assert not any(ops.named_tensor(name) for name in (
        'default', 'int', 'Tensor', 'dim_IntList', 'using_ints', 'Tensor_mode', 'correction',
        'ScalarOpt_dim', 'self_int', 'dims'))
    for name, _ in _allowed_overloads():
        assert not ops.named_tensor(name.split('.')[2]), name


@pytest.mark.parametrize('name', sorted(CASES))
def test_an_argument_too_short_for_the_others_is_an_error(name):
    good, bad = CASES[name]
    try:
        good()                              # the case itself is a valid call
    except NotImplementedError:             # addmm.dtype...: a CUDA kernel only
        pytest.skip(f'{name} has no kernel on this machine')
    for call in bad:
        with pytest.raises((ProtocolError, RuntimeError, IndexError, ValueError)):
            call()


@pytest.mark.parametrize('name', ['aten._native_batch_norm_legit_no_training.default',
                                  'aten.native_batch_norm.default'])
@pytest.mark.parametrize('short', ['weight', 'bias', 'running_mean', 'running_var'])
def test_batch_norm_refuses_a_short_vector_before_its_kernel_reads_past_it(name, short):
    """a15 #1: the kernels never check; the wrapper refuses, also on meta tensors."""
    fn = ops.resolve(name)
    extra = (False,) if name == 'aten.native_batch_norm.default' else ()
    for device in ('cpu', 'meta'):
        x = torch.zeros(1, 64, 1, device=device)
        vectors = {k: torch.ones(1 if k == short else 64, device=device)
                   for k in ('weight', 'bias', 'running_mean', 'running_var')}
        with pytest.raises(ProtocolError) as info:
            fn(x, *vectors.values(), *extra, 0.1, 0.0)
        assert info.value.code == ErrorCode.UNSAFE_PROGRAM and short in info.value.message


def _bordered(value):
    """Return ``value`` with each float tensor copied into the middle of NaN-filled storage."""
    if isinstance(value, (list, tuple)):
        return type(value)(_bordered(item) for item in value)
    if not isinstance(value, torch.Tensor) or not value.is_floating_point():
        return value
    storage = torch.full((value.numel() + 2048,), float('nan'), dtype=value.dtype)
    inside = storage[1024:1024 + value.numel()].view(value.shape)
    return inside.copy_(torch.rand(value.shape, dtype=value.dtype) * 0.5 + 0.5)


def _leaves(value):
    """Return the tensors in a result (a tensor, or nested tuples and lists of them)."""
    if isinstance(value, (list, tuple)):
        return [t for item in value for t in _leaves(item)]
    return [value] if isinstance(value, torch.Tensor) else []


def _one_shorter(value, path=()):
    """Yield (where, value) with one tensor in ``value`` one element shorter along one dim."""
    if isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            for where, shorter in _one_shorter(item, path + (index,)):
                yield where, [*value[:index], shorter, *value[index + 1:]]
    elif isinstance(value, torch.Tensor):
        for dim, size in enumerate(value.shape):
            if size > 1:
                shape = [*value.shape[:dim], size - 1, *value.shape[dim + 1:]]
                yield f'argument {path} {list(value.shape)} -> {shape}', torch.zeros(
                    shape, dtype=value.dtype)


@pytest.mark.parametrize('name', sorted(CASES))
def test_no_allowed_operator_reads_past_an_argument_one_element_shorter(name):
    """The audit as a fuzz: every argument of every case, one shorter along every dim.

    Each tensor lies in NaN-filled storage with values in [0.5, 1]: a call that does not
    raise must not return a NaN, which only a read outside its arguments can find (on
    869c097: both batch norms, _upsample_bilinear2d_aa; SDPA without a mask).
    """
    _Resolved.calls = []
    try:
        CASES[name][0]()
    finally:
        calls, _Resolved.calls = _Resolved.calls, None
    assert calls, f'{name}: its case calls no operator through the allowlist'
    for fn, args, kwargs in calls:
        for where, shorter in _one_shorter(args):
            try:
                out = fn(*_bordered(shorter), **_bordered(kwargs))
            except (ProtocolError, RuntimeError, IndexError, ValueError, TypeError):
                continue
            found = [t for t in _leaves(out) if t.is_floating_point() and t.isnan().any()]
            assert not found, f'{name} with {where} read outside its arguments'


def _leak(mean_len=1, channels=4096):
    n = exploits.node
    nodes = [n('m', 'aten.zeros.default', [mean_len], out=('float32', (mean_len,))),
             n('v', 'aten.ones.default', [channels], out=('float32', (channels,))),
             n('bn', 'aten._native_batch_norm_legit_no_training.default', {'n': 'x'}, None, None,
               {'n': 'm'}, {'n': 'v'}, 0.1, 0.0),
             n('y', 'operator.getitem', {'n': 'bn'}, 0, out=('float32', (1, channels, 1)))]
    return exploits.program(nodes, ['y'], inputs=(('x', 'float32', (1, channels, 1)),))


def test_a15_x10_batch_norm_over_read_is_refused_by_the_server(server):
    """a15 x10: on main the program was recorded and its reply carried heap bytes."""
    client = RrtoClient(server.endpoint, call_timeout_ms=60000)
    try:
        x = torch.zeros(1, 4096, 1)
        fine = _leak(mean_len=4096)             # the same program, consistent: runs
        client.upload({sha256(fine): ('program', fine)})
        replay = client.record(sha256(fine), [TensorSpec.of(x)], {})['replay']
        assert torch.equal(client.infer(replay, [x])[0][0], x)
        blob = _leak()
        client.upload({sha256(blob): ('program', blob)})
        with pytest.raises(RemoteError) as info:
            client.record(sha256(blob), [TensorSpec.of(x)], {})
        assert info.value.code == 'unsafe_program', info.value     # the sandbox's verdict
        assert 'running_mean has shape [1]' in str(info.value)
    finally:
        client.close()


def test_a_short_running_mean_from_the_weights_is_refused_too():
    """The check is on the tensors the kernel gets, wherever they come from."""
    n = exploits.node
    blob = exploits.program(
        [n('bn', 'aten._native_batch_norm_legit_no_training.default', {'n': 'x'}, None, None,
           {'n': 'm'}, {'n': 'v'}, 0.1, 0.0),
         n('y', 'operator.getitem', {'n': 'bn'}, 0, out=('float32', (1, 64, 1)))], ['y'],
        inputs=(('x', 'float32', (1, 64, 1)),), params={'m': 'm', 'v': 'v'})
    program = Program.parse(blob)
    with pytest.raises(ProtocolError, match='running_mean') as info:   # on meta, at build
        program.module({'m': torch.zeros(1), 'v': torch.ones(64)}, torch.device('cpu'))
    assert info.value.code == ErrorCode.UNSAFE_PROGRAM


@pytest.mark.parametrize('device', ['meta', 'cpu', 'cuda:1', 'cuda'])
def test_a_device_argument_is_only_the_servers_tag(device):
    """a15 #8: a plain string reached ``aten.to.device``; the tag means the server's device."""
    n = exploits.node
    nodes = [n('m', 'aten.to.device', {'n': 'x'}, device, 6, out=('float32', (4,))),
             n('y', 'aten.add.Tensor', {'n': 'm'}, 1.0, out=('float32', (4,)))]
    with pytest.raises(ProtocolError) as info:
        Program.parse(exploits.program(nodes, ['y']))
    assert info.value.code == ErrorCode.BAD_REQUEST and 'device' in info.value.message
    nodes[0]['kwargs'] = {}
    for value in ({'device': device}, None):
        nodes[0]['args'] = [{'n': 'x'}, value, 6] if value else [{'n': 'x'}]
        nodes[0]['op'] = 'aten.to.device' if value else 'aten.clone.default'
        program = Program.parse(exploits.program(nodes, ['y']))
        (y,) = program.module({}, torch.device('cpu'))(torch.zeros(4))
        assert y.device.type == 'cpu' and torch.equal(y, torch.ones(4))
    nodes[0] = n('m', 'aten.zeros.default', [4], device=device, out=('float32', (4,)))
    with pytest.raises(ProtocolError, match='device'):
        Program.parse(exploits.program(nodes, ['y']))


def test_a_label_is_bounded_at_parse():
    """a15 #7: a 600,000-character label made every stats reply listing it undecodable."""
    doc = json.loads(exploits.program(
        [exploits.node('y', 'aten.add.Tensor', {'n': 'x'}, 1.0, out=('float32', (4,)))], ['y']))
    for label, ok in (('L' * MAX_LABEL_CHARS, True), ('L' * (MAX_LABEL_CHARS + 1), False),
                      ('L' * 600_000, False), (['list'], False), (7, False)):
        doc['label'] = label
        blob = json.dumps(doc).encode()
        if ok:
            assert Program.parse(blob).label == label
        else:
            with pytest.raises(ProtocolError) as info:
                Program.parse(blob)
            assert info.value.code == ErrorCode.BAD_REQUEST and 'label' in info.value.message


def _static(nodes, outputs, inputs):
    return Program.parse(exploits.program(nodes, outputs, inputs=inputs))


def test_a_static_programs_shapes_are_checked_on_meta_before_any_kernel_runs():
    """The meta pass: SDPA's key shorter than its value (the CPU kernel reads past it)."""
    n = exploits.node
    spec = ('float32', (1, 2, 5, 8))
    nodes = [n('k', 'aten.zeros.default', [1, 2, 3, 8], out=('float32', (1, 2, 3, 8))),
             n('y', 'aten.scaled_dot_product_attention.default', {'n': 'q'}, {'n': 'k'},
               {'n': 'q'}, out=spec)]
    with pytest.raises(ProtocolError) as info:
        _static(nodes, ['y'], (('q', *spec),)).module({}, torch.device('cpu'))
    assert info.value.code == ErrorCode.UNSAFE_PROGRAM and 'key' in info.value.message
    nodes[0] = n('k', 'aten.zeros.default', [1, 2, 5, 8], out=spec)
    module = _static(nodes, ['y'], (('q', *spec),)).module({}, torch.device('cpu'))
    assert module(torch.zeros(1, 2, 5, 8))[0].shape == (1, 2, 5, 8)


def test_a_node_whose_declared_shape_is_not_its_own_is_refused():
    """A program that lies about a shape is refused at build, whatever the node."""
    n = exploits.node
    nodes = [n('y', 'aten.mm.default', {'n': 'x'}, {'n': 'x'}, out=('float32', (4, 4)))]
    assert _static(nodes, ['y'], (('x', 'float32', (4, 4)),)).module({}, torch.device('cpu'))
    nodes[0]['out']['shape'] = [4, 5]
    with pytest.raises(ProtocolError, match='declares') as info:
        _static(nodes, ['y'], (('x', 'float32', (4, 4)),)).module({}, torch.device('cpu'))
    assert info.value.code == ErrorCode.UNSAFE_PROGRAM
    nodes[0]['args'][1] = {'n': 'w'}                   # a meta kernel refusing: 4x4 @ 3x4
    blob = exploits.program(nodes, ['y'], inputs=(('x', 'float32', (4, 4)),),
                            params={'w': 'w'})
    with pytest.raises(ProtocolError, match='do not fit') as info:
        Program.parse(blob).module({'w': torch.zeros(3, 4)}, torch.device('cpu'))
    assert info.value.code == ErrorCode.UNSAFE_PROGRAM


def test_a_view_that_fits_the_devices_strides_but_not_metas_is_not_refused():
    """
    Meta and the device differ in layout, not shape: SDPA of transposed heads, then view.

    CPU and CUDA keep the heads' layout in SDPA's output, meta returns it
    contiguous, so ``.transpose(1, 2).view(...)`` fits the device and not meta
    (torchvision's vit_b_16 was refused for it on the H200); the shapes are
    still checked, on contiguous arguments.
    """
    n = exploits.node
    x, heads = ('float32', (1, 7, 2, 4)), ('float32', (1, 2, 7, 4))
    nodes = [n('q', 'aten.transpose.int', {'n': 'x'}, 1, 2, out=heads),
             n('a', 'aten.scaled_dot_product_attention.default', {'n': 'q'}, {'n': 'q'},
               {'n': 'q'}, out=heads),
             n('t', 'aten.transpose.int', {'n': 'a'}, 1, 2, out=x),
             n('y', 'aten.view.default', {'n': 't'}, [1, 7, 8], out=('float32', (1, 7, 8)))]
    module = _static(nodes, ['y'], (('x', *x),)).module({}, torch.device('cpu'))
    value = torch.rand(1, 7, 2, 4)
    q = value.transpose(1, 2)
    expected = torch.nn.functional.scaled_dot_product_attention(q, q, q).transpose(1, 2)
    assert torch.equal(module(value)[0], expected.reshape(1, 7, 8))
    nodes[3] = n('y', 'aten.view.default', {'n': 't'}, [1, 7, 9], out=('float32', (1, 7, 9)))
    with pytest.raises(ProtocolError, match='do not fit') as info:   # the shape still checked
        _static(nodes, ['y'], (('x', *x),)).module({}, torch.device('cpu'))
    assert info.value.code == ErrorCode.UNSAFE_PROGRAM


def test_the_robot_writes_a_long_label_within_the_servers_bound():
    """A robot's own long label is clipped when written, so its upload is not refused."""
    from rrto_wire import program_writer, treespec
    x = torch.ones(4)
    ep = torch.export.export(torch.nn.ReLU(), (x,))
    _, in_spec = treespec.flatten(((x,), {}))
    _, out_spec = treespec.flatten(ep.module()(x))
    data, _ = program_writer.from_exported(ep, in_spec, out_spec, label='N' * 1000)
    assert Program.parse(data).label == 'N' * MAX_LABEL_CHARS
