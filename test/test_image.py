"""Image fields to NHWC tensors: encodings, row padding, byte order, channel order, resize."""

import array

import numpy as np
import pytest
import torch

from rrto_ros.image import ENCODINGS, ImageConverter, array_to_image, image_to_array

RNG = np.random.default_rng(0)
RGB = RNG.integers(0, 256, (5, 7, 3), dtype=np.uint8)


def _fields(pixels, encoding, **kw):
    fields = array_to_image(pixels, encoding, **kw)
    fields['data'] = array.array('B', fields['data'])   # what rclpy hands a callback
    return fields


def _convert(converter, fields):
    return converter(fields['height'], fields['width'], fields['encoding'], fields['step'],
                     fields['data'], fields['is_bigendian'])


@pytest.mark.parametrize('encoding, pixels', [
    ('rgb8', RGB),
    ('bgr8', RGB[..., ::-1]),
    ('rgba8', np.concatenate([RGB, np.full((5, 7, 1), 7, np.uint8)], axis=2)),
    ('bgra8', np.concatenate([RGB[..., ::-1], np.full((5, 7, 1), 7, np.uint8)], axis=2)),
])
@pytest.mark.parametrize('padding', [0, 3])
def test_colour_encodings_arrive_in_the_networks_channel_order(encoding, pixels, padding):
    fields = _fields(pixels, encoding, padding=padding)
    rgb = _convert(ImageConverter('rgb'), fields)
    assert rgb.dtype == torch.uint8 and rgb.shape == (1, 5, 7, 3) and rgb.is_contiguous()
    np.testing.assert_array_equal(rgb[0].numpy(), RGB)
    bgr = _convert(ImageConverter('bgr'), fields)
    np.testing.assert_array_equal(bgr[0].numpy(), RGB[..., ::-1])


def test_mono8_is_replicated_for_colour_networks_and_kept_for_mono_ones():
    gray = RGB[..., 0]
    fields = _fields(gray, 'mono8', padding=1)
    rgb = _convert(ImageConverter('rgb'), fields)
    assert rgb.shape == (1, 5, 7, 3)
    for c in range(3):
        np.testing.assert_array_equal(rgb[0, ..., c].numpy(), gray)
    mono = _convert(ImageConverter('mono'), fields)
    assert mono.shape == (1, 5, 7, 1)
    np.testing.assert_array_equal(mono[0, ..., 0].numpy(), gray)


def test_colour_to_mono_uses_bt601_luma():
    mono = _convert(ImageConverter('mono'), _fields(RGB[..., ::-1], 'bgr8'))
    expected = np.rint(RGB.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32))
    np.testing.assert_array_equal(mono[0, ..., 0].numpy(), expected.astype(np.uint8))


@pytest.mark.parametrize('big_endian', [False, True])
@pytest.mark.parametrize('padding', [0, 4, 2])
def test_32fc1_honours_byte_order_and_padding(big_endian, padding):
    depth = RNG.random((4, 6), dtype=np.float32) * 10
    fields = _fields(depth, '32FC1', padding=padding, big_endian=big_endian)
    assert fields['is_bigendian'] is big_endian
    assert fields['step'] == 6 * 4 + padding
    out = _convert(ImageConverter('mono'), fields)
    assert out.dtype == torch.float32 and out.shape == (1, 4, 6, 1)
    np.testing.assert_array_equal(out[0, ..., 0].numpy(), depth)


def test_resize_runs_on_the_robot_and_keeps_the_dtype():
    frame = RNG.integers(0, 256, (48, 64, 3), dtype=np.uint8)
    out = _convert(ImageConverter('rgb', resize=(24, 32)), _fields(frame, 'rgb8'))
    assert out.dtype == torch.uint8 and out.shape == (1, 24, 32, 3) and out.is_contiguous()
    # antialiased 2x downscale of a constant image is the same constant
    flat = np.full((48, 64, 3), 77, np.uint8)
    out = _convert(ImageConverter('rgb', resize=(24, 32)), _fields(flat, 'rgb8'))
    assert torch.all(out == 77)
    depth = _convert(ImageConverter('mono', resize=(2, 3)),
                     _fields(np.ones((4, 6), np.float32), '32FC1'))
    assert depth.shape == (1, 2, 3, 1) and torch.allclose(depth, torch.ones(1))


def test_bytes_data_is_accepted_without_warnings(recwarn):
    fields = array_to_image(RGB, 'rgb8')
    out = ImageConverter('rgb')(5, 7, 'rgb8', fields['step'], fields['data'])
    np.testing.assert_array_equal(out[0].numpy(), RGB)
    assert not [w for w in recwarn if 'writable' in str(w.message)]


@pytest.mark.parametrize('encoding', ['yuv422', 'bayer_rggb8', '16UC1', '', None])
def test_unknown_encodings_raise_value_error_naming_the_encoding(encoding):
    with pytest.raises(ValueError, match=repr(encoding).replace('(', r'\(')):
        ImageConverter('rgb')(2, 2, encoding, 6, bytes(12))


def test_inconsistent_sizes_are_rejected_with_a_clear_error():
    with pytest.raises(ValueError, match='needs 60 bytes, got 59'):
        image_to_array(4, 5, 'rgb8', 15, bytes(59))
    with pytest.raises(ValueError, match='step 14 is shorter'):
        image_to_array(4, 5, 'rgb8', 14, bytes(100))
    with pytest.raises(ValueError, match='channel order'):
        ImageConverter('rgba')
    with pytest.raises(ValueError, match='resize'):
        ImageConverter('rgb', resize=(0, 10))


def test_every_encoding_round_trips_through_array_to_image():
    for name, enc in ENCODINGS.items():
        shape = (3, 4, enc.channels)
        pixels = (RNG.random(shape) * 200).astype(enc.dtype)
        fields = _fields(pixels, name, padding=2)
        back = image_to_array(fields['height'], fields['width'], name, fields['step'],
                              fields['data'], fields['is_bigendian'])
        np.testing.assert_array_equal(back, pixels)
