"""The wire contract: framing round trips and every malformed-message error."""

import gc
import json
import struct
import weakref

import msgspec
import pytest
import torch
import zmq

from rrto_wire import codecs, messages, treespec
from rrto_wire import protocol as wire
from rrto_wire.errors import ErrorCode, ProtocolError
from rrto_wire.limits import MAX_HEADER_BYTES
from rrto_wire.tensors import TensorSpec, signature_key, signature_of, tensor_frame

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.uint8, torch.int8,
          torch.int16, torch.int32, torch.int64, torch.bool]


def _roundtrip(tensors, codec=codecs.RAW):
    frames = wire.encode({'kind': 'infer', 'id': 7, 'replay': 'r'}, tensors, codec)
    header = messages.decode_request(frames[0])
    return msgspec.to_builtins(header), wire.decode_tensors(header.tensors, frames[1:], 1 << 30)


@pytest.mark.parametrize('dtype', DTYPES)
def test_every_dtype_round_trips_bit_exactly(dtype):
    source = (torch.randn(2, 3, 5) * 100).to(dtype)
    header, (decoded,) = _roundtrip([source])
    assert header['kind'] == messages.Kind.INFER and header['id'] == 7
    assert decoded.dtype == dtype and decoded.shape == source.shape
    assert torch.equal(decoded, source)


def test_non_contiguous_and_empty_tensors_round_trip():
    source = torch.arange(24, dtype=torch.float32).reshape(4, 6).t()
    empty = torch.zeros(0, 3)
    _, (a, b) = _roundtrip([source, empty])
    assert torch.equal(a, source) and b.shape == (0, 3)


def test_raw_frames_are_not_copied():
    tensor = torch.arange(1000, dtype=torch.float32)
    frame = tensor_frame(tensor)
    assert frame.obj is not None and len(frame) == 4000
    tensor[0] = 42.0
    assert torch.frombuffer(frame, dtype=torch.float32)[0] == 42.0


def test_a_contiguous_tensors_frame_is_its_memory_not_a_numpy_view(monkeypatch):
    # after the robot's wait, tensor.numpy() cost ~30 us of each request's encoding (issue 11)
    def no_numpy(self, *args, **kwargs):
        raise AssertionError('the frame went through numpy')
    monkeypatch.setattr(torch.Tensor, 'numpy', no_numpy)
    whole = torch.arange(10, dtype=torch.float32)
    part = whole[3:7]                   # a contiguous view that starts inside its storage
    frame = tensor_frame(part)
    assert bytes(frame) == struct.pack('<4f', 3, 4, 5, 6)
    whole[3] = 42.0
    assert struct.unpack_from('<f', frame)[0] == 42.0      # its memory, not a copy
    image = torch.randint(0, 256, (1, 8, 8, 3), dtype=torch.uint8)
    assert bytes(tensor_frame(image)) == bytes(image.flatten().tolist())
    owner = weakref.ref(whole)
    del whole, part
    gc.collect()
    assert owner() is not None          # the frame keeps the memory's owner alive
    assert struct.unpack_from('<f', frame, 4)[0] == 4.0
    del frame
    gc.collect()
    assert owner() is None


@pytest.mark.parametrize('codec', [codecs.LZ4, codecs.ZSTD])
def test_lossless_codecs_round_trip(codec):
    image = torch.randint(0, 8, (1, 120, 160, 3), dtype=torch.uint8)
    header, (decoded,) = _roundtrip([image], codec)
    assert header['tensors'][0]['codec'] == codec
    assert torch.equal(decoded, image)


def _header_frame(obj) -> bytes:
    return json.dumps(obj).encode()


@pytest.mark.parametrize('frame, code, words', [
    (b'\xff\xfe not json', ErrorCode.BAD_REQUEST, 'not JSON'),
    (_header_frame([1, 2]), ErrorCode.BAD_REQUEST, 'JSON object'),
    (_header_frame({'v': 99, 'kind': 'hello'}), ErrorCode.VERSION, 'version'),
    (_header_frame({'v': 2, 'kind': 'launch_missiles'}), ErrorCode.BAD_REQUEST, 'unknown message'),
    (_header_frame({'v': 2, 'kind': 'ok'}), ErrorCode.BAD_REQUEST, 'reply kind'),
    (_header_frame({'v': 2, 'kind': 'hello', 'tensors': 'x'}), ErrorCode.BAD_REQUEST, 'tensors'),
    (b'{' + b' ' * MAX_HEADER_BYTES + b'}', ErrorCode.TOO_LARGE, 'header'),
])
def test_bad_headers_name_the_problem(frame, code, words):
    with pytest.raises(ProtocolError) as err:
        messages.decode_request(frame)
    assert err.value.code == code and words in err.value.message


def _infer_header(descriptor) -> bytes:
    return _header_frame({'v': 2, 'kind': 'infer', 'replay': 'r', 'tensors': [descriptor]})


@pytest.mark.parametrize('descriptor, payload, words', [
    ({'dtype': 'float32', 'shape': [4]}, b'\0' * 15, 'needs 16 bytes'),
    ({'dtype': 'complex64', 'shape': [1]}, b'\0' * 8, '$.tensors[0].dtype'),
    ({'dtype': 'float32', 'shape': [-1]}, b'', '>= 0'),
    ({'dtype': 'float32', 'shape': 'big'}, b'', 'shape'),
    ({'dtype': 'uint8', 'shape': [1] * 9}, b'\0', 'length <= 8'),
    ({'dtype': 'uint8', 'shape': [4], 'codec': 'lz4'}, b'garbage', 'does not decode'),
    ({'dtype': 'uint8', 'shape': [4], 'codec': 'rot13'}, b'abcd', '$.tensors[0].codec'),
    ({'dtype': 'uint8', 'shape': [4], 'stride': [1]}, b'abcd', 'unknown field'),
])
def test_bad_tensor_frames_name_the_problem(descriptor, payload, words):
    with pytest.raises(ProtocolError) as err:
        header = messages.decode_request(_infer_header(descriptor))
        wire.decode_tensors(header.tensors, [payload], 1 << 20)
    assert err.value.code == ErrorCode.BAD_REQUEST
    assert words in err.value.message, err.value.message


def test_frame_count_must_match_descriptors():
    header = messages.decode_request(_infer_header({'dtype': 'uint8', 'shape': [1]}))
    with pytest.raises(ProtocolError, match='2 frames follow'):
        wire.decode_tensors(header.tensors, [b'a', b'b'], 1 << 20)


def test_treespec_round_trips_nested_structures():
    a, b, c = torch.zeros(1), torch.ones(2), torch.full((3,), 2.0)
    obj = {'boxes': (a, [b, None]), 'score': c, 'n': 3}
    leaves, spec = treespec.flatten(obj)
    assert leaves == [a, b, c]
    rebuilt = treespec.unflatten(leaves, json.loads(json.dumps(spec)))
    assert rebuilt['boxes'][0] is a and rebuilt['boxes'][1][1] is None and rebuilt['n'] == 3
    assert treespec.count_leaves(spec) == 3
    with pytest.raises(ValueError):
        treespec.unflatten([a], spec)


def test_message_size_counts_the_bytes_of_any_buffer():
    rows = memoryview(torch.zeros(3, 5).numpy())        # len() would count 3 rows
    assert wire.message_size([b'abc', rows, zmq.Frame(b'xy'), memoryview(b'')]) == 3 + 60 + 2


def test_signature_key_names_dtypes_and_shapes():
    sig = signature_of([torch.zeros(1, 224, 224, 3, dtype=torch.uint8), torch.zeros(2)])
    assert signature_key(sig) == 'uint8[1,224,224,3];float32[2]'
    assert tuple(TensorSpec.from_json(s.to_json()) for s in sig) == sig
