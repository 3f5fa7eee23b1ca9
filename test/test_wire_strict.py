"""
Strict header decoding, bounded frame decoding, and a property-based fuzz of both.

The fuzz tests run a fixed, derandomised budget in CI.  A longer run:

    RRTO_FUZZ_EXAMPLES=20000 python -m pytest -q test/test_wire_strict.py -k fuzz
"""

import json
import os
import tracemalloc

import hypothesis.strategies as st
import msgspec
import pytest
import torch
import zstandard
from hypothesis import HealthCheck, given, settings

from rrto_wire import codecs, messages, replies
from rrto_wire import protocol as wire
from rrto_wire.errors import MAX_ECHO_CHARS, ErrorCode, ProtocolError, clip
from rrto_wire.limits import PROTOCOL_VERSION
from rrto_wire.tensors import TensorSpec

DIGEST = 'ab' * 32
FUZZ = settings(max_examples=int(os.environ.get('RRTO_FUZZ_EXAMPLES', 150)), deadline=None,
                derandomize=True, suppress_health_check=[HealthCheck.too_slow])
CLIENT_CODES = {ErrorCode.BAD_REQUEST, ErrorCode.VERSION, ErrorCode.TOO_LARGE}


def _frame(obj) -> bytes:
    return json.dumps(obj).encode()


def _put(**fields):
    header = {'v': PROTOCOL_VERSION, 'kind': 'put', 'id': 1, 'digest': DIGEST,
              'blob_kind': 'program', 'upload': 'u1', 'offset': 0, 'total': 4}
    header.update(fields)
    return _frame(header)


# the issue 9 list, and friends: each is refused with a client error code, never accepted
STRICT_CASES = [
    ('offset 0.0', _put(offset=0.0), ErrorCode.BAD_REQUEST, '$.offset'),
    ('v true', _frame({'v': True, 'kind': 'hello'}), ErrorCode.VERSION, 'version'),
    ('v 2.0', _frame({'v': 2.0, 'kind': 'hello'}), ErrorCode.VERSION, 'version'),
    ('v 1', _frame({'v': 1, 'kind': 'hello'}), ErrorCode.VERSION, 'version'),
    ('deep json', b'{"v":2,"kind":"hello","x":' + b'[' * 50000 + b']' * 50000 + b'}',
     ErrorCode.BAD_REQUEST, ''),
    ('deep op args', _frame({'v': 2, 'kind': 'op', 'model': DIGEST, 'session': 's',
                             'args': json.loads('[' * 40 + ']' * 40)}),
     ErrorCode.BAD_REQUEST, 'deeper'),
    ('shape 2**63', _frame({'v': 2, 'kind': 'infer', 'replay': 'r',
                            'tensors': [{'dtype': 'uint8', 'shape': [2 ** 63]}]}),
     ErrorCode.BAD_REQUEST, 'shape'),
    ('shape 2**64 * 2', _frame({'v': 2, 'kind': 'infer', 'replay': 'r',
                                'tensors': [{'dtype': 'uint8', 'shape': [2 ** 65]}]}),
     ErrorCode.BAD_REQUEST, 'shape'),
    ('list as replay', _frame({'v': 2, 'kind': 'infer', 'replay': ['a']}),
     ErrorCode.BAD_REQUEST, '$.replay'),
    ('unknown field', _frame({'v': 2, 'kind': 'hello', 'please': 1}),
     ErrorCode.BAD_REQUEST, 'unknown field'),
    ('huge priority', _frame({'v': 2, 'kind': 'infer', 'replay': 'r', 'priority': 10 ** 12}),
     ErrorCode.BAD_REQUEST, '$.priority'),
    ('huge id', _frame({'v': 2, 'kind': 'hello', 'id': 10 ** 30}), ErrorCode.BAD_REQUEST, '$.id'),
    ('long task', _frame({'v': 2, 'kind': 'infer', 'replay': 'r', 'task': 'x' * 100_000}),
     ErrorCode.BAD_REQUEST, '$.task'),
    ('long kind', _frame({'v': 2, 'kind': 'k' * 100_000}), ErrorCode.BAD_REQUEST, 'unknown'),
    ('object as signature', _frame({'v': 2, 'kind': 'record', 'model': DIGEST,
                                    'signature': {'dtype': 'uint8'}}),
     ErrorCode.BAD_REQUEST, '$.signature'),
    ('negative deadline', _frame({'v': 2, 'kind': 'infer', 'replay': 'r', 'deadline_ms': -1}),
     ErrorCode.BAD_REQUEST, '$.deadline_ms'),
    ('bool as repeats', _frame({'v': 2, 'kind': 'profile', 'model': DIGEST, 'repeats': True}),
     ErrorCode.BAD_REQUEST, '$.repeats'),
    ('bad digest', _frame({'v': 2, 'kind': 'missing', 'digests': ['../../etc/passwd']}),
     ErrorCode.BAD_REQUEST, '$.digests'),
    ('string as evict store', _frame({'v': 2, 'kind': 'evict', 'model': DIGEST,
                                      'store': 'yes'}), ErrorCode.BAD_REQUEST, '$.store'),
    ('evict without model', _frame({'v': 2, 'kind': 'evict'}), ErrorCode.BAD_REQUEST, 'model'),
]


@pytest.mark.parametrize('frame, code, words', [c[1:] for c in STRICT_CASES],
                         ids=[c[0] for c in STRICT_CASES])
def test_headers_are_decoded_strictly(frame, code, words):
    with pytest.raises(ProtocolError) as err:
        messages.decode_request(frame)
    assert err.value.code == code and words in err.value.message, err.value.message
    assert len(err.value.message) < 4 * MAX_ECHO_CHARS + 60


def test_a_valid_header_decodes_to_its_typed_struct():
    frame = wire.encode({'kind': 'infer', 'id': 'a-1', 'replay': 'r', 'priority': 3,
                         'deadline_ms': 8, 'late': 'run'}, [torch.zeros(2, dtype=torch.uint8)])[0]
    header = messages.decode_request(frame)
    assert isinstance(header, messages.Infer) and header.id == 'a-1' and header.priority == 3
    assert header.deadline_ms == 8.0 and header.tensors == [messages.Frame('uint8', (2,))]


def test_an_undecodable_header_still_names_its_request_id():
    with pytest.raises(ProtocolError) as err:
        messages.decode_request(_frame({'v': 2, 'kind': 'infer', 'id': 77, 'replay': 5}))
    assert err.value.request_id == 77


def test_replies_are_decoded_against_the_request_kind():
    ok = wire.encode({'kind': 'ok', 'id': 1, 'complete': True})[0]
    assert replies.decode_reply(ok, messages.Kind.PUT).complete is True
    with pytest.raises(ProtocolError):
        replies.decode_reply(ok, messages.Kind.HELLO)        # a hello reply has other fields
    error = wire.encode({'kind': 'error', 'id': 1, 'code': 'bad_request', 'message': 'm'})[0]
    assert isinstance(replies.decode_reply(error, messages.Kind.INFER), replies.Error)
    assert isinstance(replies.decode_reply(error, None), replies.Error)


def test_network_strings_are_clipped():
    assert clip('x' * 900_000) .startswith('x' * MAX_ECHO_CHARS)
    assert len(clip('x' * 900_000)) < MAX_ECHO_CHARS + 40
    assert len(ProtocolError(ErrorCode.BAD_REQUEST, 'y' * 900_000).message) < 600


# ----------------------------------------------------------------------------- bombs

def _zstd_zeros(nbytes: int) -> bytes:
    """Return a zstd frame of ``nbytes`` zeros (size in its header), built without them."""
    compressor = zstandard.ZstdCompressor(level=1).compressobj(size=nbytes)
    chunk = bytes(1 << 20)
    parts = [compressor.compress(chunk) for _ in range(nbytes // len(chunk))]
    return b''.join(parts) + compressor.flush()


@pytest.fixture(scope='module')
def bomb() -> bytes:
    frame = _zstd_zeros(200 << 20)
    assert len(frame) < 16 << 10       # ~6 KB on the wire, 200 MiB once decoded
    return frame


def _peak_bytes(fn) -> tuple[int, ProtocolError]:
    tracemalloc.start()
    try:
        with pytest.raises(ProtocolError) as err:
            fn()
        return tracemalloc.get_traced_memory()[1], err.value
    finally:
        tracemalloc.stop()


def test_a_declared_size_over_the_budget_is_refused_before_decoding(bomb):
    header = messages.decode_request(_frame({
        'v': 2, 'kind': 'infer', 'replay': 'r',
        'tensors': [{'dtype': 'uint8', 'shape': [200 << 20], 'codec': 'zstd'}]}))
    peak, err = _peak_bytes(lambda: wire.decode_tensors(header.tensors, [bomb], 64 << 20))
    assert err.code == ErrorCode.TOO_LARGE and peak < 1 << 20


def test_a_frame_that_decodes_to_more_than_declared_stops_at_the_declared_size(bomb):
    spec = TensorSpec('uint8', (4096,))
    peak, err = _peak_bytes(lambda: codecs.decode('zstd', memoryview(bomb), spec, 0))
    assert err.code == ErrorCode.BAD_REQUEST and 'more than' in err.message
    assert peak < 4 << 20, f'decoding held {peak} bytes'


def test_the_whole_message_budget_counts_every_tensor():
    frames = wire.encode({'kind': 'infer', 'id': 1, 'replay': 'r'},
                         [torch.zeros(1000, dtype=torch.uint8)] * 3, 'lz4')
    header = messages.decode_request(frames[0])
    assert all(d.codec == 'lz4' for d in header.tensors)
    assert len(wire.decode_tensors(header.tensors, frames[1:], 3000)) == 3
    with pytest.raises(ProtocolError) as err:
        wire.decode_tensors(header.tensors, frames[1:], 2999)
    assert err.value.code == ErrorCode.TOO_LARGE


def test_a_lying_lz4_frame_never_decodes_past_its_declared_size():
    import lz4.block
    frame = lz4.block.compress(bytes(8 << 20), store_size=False)
    with pytest.raises(ProtocolError) as err:
        codecs.decode('lz4', memoryview(frame), TensorSpec('uint8', (4096,)), 0)
    assert err.value.code == ErrorCode.BAD_REQUEST


# ----------------------------------------------------------------------------- fuzz

JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-2 ** 70, 2 ** 70) | st.floats(allow_nan=False)
    | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                max_size=4),
    max_leaves=20)
FIELDS = ['v', 'kind', 'id', 'tensors', 'replay', 'priority', 'deadline_ms', 'task', 'late',
          'model', 'signature', 'options', 'digests', 'digest', 'blob_kind', 'upload', 'offset',
          'total', 'session', 'op', 'args', 'kwargs', 'inputs', 'fetch', 'end', 'repeats',
          'reply_bytes', 'store']
KINDS = [k.value for k in messages.Kind] + ['', 'nope']
DESCRIPTOR = st.fixed_dictionaries(
    {'dtype': st.sampled_from(['uint8', 'float32', 'bfloat16', 'bool', 'int64', 'complex64']),
     'shape': st.lists(st.integers(-1, 2 ** 64) | st.integers(0, 64), max_size=9)},
    optional={'codec': st.sampled_from(['raw', 'lz4', 'zstd', 'jpeg', 'gzip'])})
HEADER = st.fixed_dictionaries(
    {'v': st.sampled_from([PROTOCOL_VERSION, 1, True, 2.0]) | JSON,
     'kind': st.sampled_from(KINDS)},
    optional={'tensors': st.lists(DESCRIPTOR, max_size=3), **{f: JSON for f in FIELDS[3:]},
              'id': st.integers(-2 ** 64, 2 ** 64) | st.text(max_size=30)})


@FUZZ
@given(header=HEADER | JSON, payloads=st.lists(st.binary(max_size=64), max_size=3))
def test_fuzz_header_and_frame_decoding_only_ever_refuses_with_a_client_code(header, payloads):
    try:
        decoded = messages.decode_request(msgspec.json.encode(header))
    except ProtocolError as exc:
        assert exc.code in CLIENT_CODES, exc.code
        return
    assert decoded.v == PROTOCOL_VERSION
    try:
        tensors = wire.decode_tensors(decoded.tensors, payloads, 1 << 16)
    except ProtocolError as exc:
        assert exc.code in CLIENT_CODES, exc.code
        return
    assert [t.numel() * t.element_size() for t in tensors] == \
        [d.nbytes for d in decoded.tensors]


@FUZZ
@given(data=st.binary(max_size=256))
def test_fuzz_arbitrary_bytes_are_refused_cleanly(data):
    try:
        messages.decode_request(data)
    except ProtocolError as exc:
        assert exc.code in CLIENT_CODES


def _imported(relative: str) -> set[str]:
    import ast
    from pathlib import Path
    tree = ast.parse((Path(__file__).resolve().parents[1] / relative).read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            names.update([node.module] + [f'{node.module}.{a.name}' for a in node.names])
        elif isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
    return names


def test_codecs_depend_on_tensors_only_never_on_framing():
    assert not {'rrto_wire.protocol', 'rrto_wire.messages'} & _imported('rrto_wire/codecs.py')
    assert 'rrto_wire.codecs' in _imported('rrto_wire/protocol.py')


def test_jobs_and_the_server_do_not_import_each_other():
    assert not {m for m in _imported('rrto_server/jobs.py') if 'rrto_server.server' in m}
    assert 'rrto_server.jobs' in _imported('rrto_server/server.py')
