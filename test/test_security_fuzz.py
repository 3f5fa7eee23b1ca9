"""Property-based fuzzing of the program loader: any bytes give a Program or a ProtocolError.

CI runs a fixed budget (``FUZZ_EXAMPLES``); a longer run is::

    RRTO_FUZZ_EXAMPLES=20000 python -m pytest -q test/test_security_fuzz.py
"""

import json
import os

import exploits
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rrto_wire.program import Program
from rrto_wire.errors import ProtocolError

FUZZ_EXAMPLES = int(os.environ.get('RRTO_FUZZ_EXAMPLES', 150))
FUZZ = settings(max_examples=FUZZ_EXAMPLES, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow])

_OPS = ['aten.add.Tensor', 'aten.add_.Tensor', 'aten.view.default', 'aten.relu_.default',
        'aten.full.default', 'aten.index.Tensor', 'aten.set_.source_Tensor', 'aten.mul.out',
        'aten._to_dense.default', 'operator.getitem', 'operator.pow', 'builtins.eval',
        'aten.cat.default', 'aten.zeros.default', 'aten', '', 'aten.add.NoSuchOverload']
_JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-2 ** 70, 2 ** 70) | st.floats()
    | st.text(max_size=8) | st.sampled_from([{'n': 'x'}, {'n': 'p_w'}, {'n': 'a'},
                                             {'dtype': 'float32'}, {'layout': 'sparse_coo'},
                                             {'device': 'cuda'}, {'f': 'nan'}]),
    lambda inner: (st.lists(inner, max_size=4)
                   | st.dictionaries(st.text(max_size=6), inner, max_size=3)),
    max_leaves=12)
_NODE = st.fixed_dictionaries({
    'name': st.sampled_from(['a', 'b', 'c', 'x', 'p_w']) | st.text(max_size=4),
    'op': st.sampled_from(_OPS) | st.text(max_size=12),
    'args': st.lists(_JSON, max_size=4), 'kwargs': st.dictionaries(st.text(max_size=6), _JSON,
                                                                   max_size=2),
    'out': st.none() | st.just({'dtype': 'float32', 'shape': [4]})})


def _loads_or_refuses(blob: bytes) -> None:
    try:
        program = Program.parse(blob)
    except ProtocolError:
        return
    try:
        program.module({'w': torch.zeros(4)}, torch.device('cpu'))
    except ProtocolError:
        pass


@FUZZ
@given(nodes=st.lists(_NODE, max_size=5), outputs=st.lists(st.sampled_from('abcx'), max_size=2))
def test_any_program_document_loads_or_is_refused_cleanly(nodes, outputs):
    _, weights = exploits.scale_by_weights()
    doc = json.loads(exploits.program([], [], params={'p_w': 'w'}, weights=weights))
    doc.update(nodes=nodes, outputs=[{'n': o} for o in outputs])
    doc['out_spec'] = {'tuple': ['T'] * len(outputs)}
    _loads_or_refuses(json.dumps(doc).encode())


@FUZZ
@given(data=st.binary(max_size=300) | _JSON.map(lambda v: json.dumps(v).encode()))
def test_any_bytes_load_or_are_refused_cleanly(data):
    _loads_or_refuses(data)
