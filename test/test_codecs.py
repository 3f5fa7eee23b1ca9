"""JPEG and lossless codecs: round trips, bounded decoding, the per-call codec choice."""

import struct

import msgspec
import numpy as np
import pytest
import torch
import zmq
from rrto_testing import assert_same_as_local, exchange, raw_socket

from rrto_ros import OffloadResult
from rrto_ros.codec_choice import CodecChooser, CodecCost, check_codec
from rrto_ros.preprocess import WithImageInput
from rrto_ros.zoo import keypoint_net
from rrto_wire import codecs, messages
from rrto_wire import protocol as wire
from rrto_wire.errors import ErrorCode, ProtocolError
from rrto_wire.tensors import TensorSpec


def smooth_image(batch=1, height=48, width=64, channels=3, seed=0, noise=1.0) -> torch.Tensor:
    """Return a camera-like uint8 NHWC batch: gradients plus mild noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    frames = []
    for b in range(batch):
        base = np.stack([(x * 3 + b * 20) % 256, (y * 4) % 256, (x + y) % 256], -1)
        frames.append(base[..., :channels] + rng.normal(0, noise, (height, width, channels)))
    return torch.from_numpy(np.clip(np.stack(frames), 0, 255).astype(np.uint8))


def _roundtrip(tensors, codec):
    frames = wire.encode({'kind': 'infer', 'id': 1, 'replay': 'r'}, tensors, codec)
    header = messages.decode_request(frames[0])
    tensors = wire.decode_tensors(header.tensors, frames[1:], 1 << 30)
    return msgspec.to_builtins(header), frames, tensors


@pytest.mark.parametrize('shape', [(1, 48, 64, 3), (2, 48, 64, 3), (48, 64, 1), (3, 2, 40, 48, 3)])
def test_jpeg_round_trips_images_closely_and_smaller(shape):
    image = smooth_image(int(np.prod(shape[:-3])), *shape[-3:]).reshape(shape)
    header, frames, (decoded,) = _roundtrip([image], 'jpeg:95')
    assert header['tensors'][0]['codec'] == 'jpeg'
    assert decoded.shape == image.shape and decoded.dtype == torch.uint8
    assert len(frames[1]) < image.numel() / 2
    assert (decoded.float() - image.float()).abs().mean() < 4.0


def test_non_images_and_incompressible_tensors_travel_raw():
    noise = torch.randint(0, 256, (1, 64, 64, 3), dtype=torch.uint8)
    floats = torch.randn(1, 8, 8, 3)
    header, _, (a, b, c) = _roundtrip([floats, noise, noise], 'jpeg')
    assert header['tensors'][0]['codec'] == 'raw' and torch.equal(a, floats)
    for codec in ('lz4', 'zstd'):
        used, frame = codecs.encode(codec, noise)
        assert used == 'raw' and frame is None  # never more bytes than raw


def test_unknown_codecs_and_qualities_are_rejected():
    for codec in ('png', 'jpeg:0', 'jpeg:101', 'jpeg:hi', 'lz4:3'):
        with pytest.raises(ValueError):
            codecs.parse(codec)
    assert codecs.parse('jpeg:75') == ('jpeg', 75)
    assert check_codec('auto') == 'auto' and check_codec('jpeg:80') == 'jpeg:80'


def _jpeg_frame(image):
    used, frame = codecs.encode('jpeg', image)
    assert used == 'jpeg'
    return frame


def _claim_size(frame: bytes, height: int, width: int) -> bytes:
    """Rewrite the SOF0 marker of the first JPEG in a frame to claim another size."""
    data = bytearray(frame)
    sof = data.index(b'\xff\xc0')
    struct.pack_into('>HH', data, sof + 5, height, width)
    return bytes(data)


def test_malformed_jpeg_frames_raise_protocol_errors_before_decoding():
    image = smooth_image()
    frame = _jpeg_frame(image)
    spec = ('uint8', tuple(image.shape))
    cases = [
        (b'garbage', 'table'),
        (frame[:-40], 'lengths add up'),
        (frame[:4] + frame[4:8] + b'\0' * (len(frame) - 8), 'does not decode'),
        (_claim_size(frame, 3000, 3000), 'expected RGB 64x48'),
        (_claim_size(frame, 20000, 20000), 'decompression bomb'),
        (struct.pack('<2I', 2, 5) + b'\0' * 5, 'announce 1'),
    ]
    for payload, words in cases:
        with pytest.raises(ProtocolError) as err:
            codecs.decode('jpeg', memoryview(payload), TensorSpec(*spec), 0)
        assert err.value.code == ErrorCode.BAD_REQUEST and words in err.value.message, payload[:8]
    with pytest.raises(ProtocolError, match='uint8 only'):
        codecs.decode('jpeg', memoryview(frame), TensorSpec('float32', (1, 48, 64, 3)), 0)
    with pytest.raises(ProtocolError, match='not \\[..., H, W'):
        codecs.decode('jpeg', memoryview(frame), TensorSpec('uint8', (1, 48, 64, 4)), 0)
    with pytest.raises(ProtocolError) as err:
        codecs.decode('jpeg', memoryview(frame),
                      TensorSpec('uint8', (1 << 20, 1 << 10, 1 << 10, 3)), 0)
    assert err.value.code == ErrorCode.TOO_LARGE


def test_server_rejects_a_bad_jpeg_and_serves_jpeg_inputs(server, offloaded, zmq_ctx):
    model = WithImageInput(keypoint_net()).eval()
    image = smooth_image(1, 64, 64)
    om = offloaded(model, server.endpoint, timeout_ms=30000, codec='jpeg')
    assert om.warmup(image)
    out = om(image)
    assert om.last.result == OffloadResult.OFFLOADED and om.last.codec == 'jpeg'
    assert om.last.bytes_sent < image.numel() / 2
    with torch.inference_mode():
        expected = model(image)
    assert torch.allclose(out['heatmaps'], expected['heatmaps'], atol=0.1)
    replay = om.prepared()[0].replay
    frames = wire.encode({'kind': 'infer', 'id': 9, 'replay': replay}, [image], 'jpeg')
    sock = raw_socket(zmq_ctx, server.endpoint, zmq.DEALER)
    reply = exchange(sock, frames[:1] + [_claim_size(bytes(frames[1]), 9000, 9000)])
    assert reply['kind'] == 'error' and reply['code'] == 'bad_request'
    assert 'expected RGB 64x64' in reply['message']
    sock.close(linger=0)
    om(image)
    assert om.last.result == OffloadResult.OFFLOADED


def test_auto_codec_picks_by_bandwidth():
    image = smooth_image(1, 96, 128, noise=0.0)
    chooser = CodecChooser('auto_lossy')
    chooser.set_bandwidth(1.0)
    assert chooser.choose([image]) == 'jpeg'
    costs = chooser.costs[next(iter(chooser.costs))]
    assert costs['jpeg'].nbytes < costs['raw'].nbytes == image.numel()
    lossless = CodecChooser('auto')
    lossless.set_bandwidth(1e6)  # a link so fast that any encoding costs more than it saves
    assert lossless.choose([image]) == 'raw'
    lossless.set_bandwidth(0.5)
    smallest = min(('raw', 'lz4', 'zstd'), key=lambda c: lossless.costs[next(iter(
        lossless.costs))][c].nbytes)
    assert lossless.choose([image]) == smallest != 'raw'


def test_auto_codec_rule_and_goodput_estimate():
    cost = CodecCost(nbytes=125_000, encode_ms=1.0, decode_ms=2.0)
    assert cost.total_ms(10.0) == pytest.approx(3.0 + 100.0)
    chooser = CodecChooser('auto')
    assert chooser.bandwidth_mbps is None
    chooser.observe(125_000, 100.0)
    assert chooser.bandwidth_mbps == pytest.approx(10.0)
    chooser.observe(125_000, 50.0)
    assert chooser.bandwidth_mbps == pytest.approx(10.0 + 0.3 * 10.0)
    chooser.set_bandwidth(300.0)
    assert chooser.bandwidth_mbps == 300.0
    with pytest.raises(ValueError):
        chooser.set_bandwidth(0)


def test_engine_auto_codec_is_lossless_and_follows_the_link(server, offloaded):
    model = WithImageInput(keypoint_net()).eval()
    image = smooth_image(1, 64, 64, noise=0.0)
    om = offloaded(model, server.endpoint, timeout_ms=30000, codec='auto')
    assert om.warmup(image)
    om.set_link(1e6, 1.0)
    out = om(image)
    assert om.last.codec == 'raw'
    with torch.inference_mode():
        expected = model(image)
    assert_same_as_local(out, expected)
    om.set_link(0.1, 1.0)
    out = om(image)
    assert om.last.codec in ('lz4', 'zstd') and om.last.bytes_sent < image.numel()
    assert_same_as_local(out, expected)
    with pytest.raises(ValueError):
        om.set_codec('gzip')
