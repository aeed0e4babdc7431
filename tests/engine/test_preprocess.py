"""Images of every mode and size become the model's input the same way everywhere."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from axguard.demo.data import digit_image, load_split
from axguard.engine.model import InputSpec
from axguard.engine.preprocess import (
    decode_image,
    image_to_tensor,
    tensor_from_bytes,
    tensor_to_bytes,
)
from axguard.errors import InputTooLarge, InvalidInput

SPEC3 = InputSpec(3, 32, 32, (0.5,) * 3, (0.5,) * 3)
SPEC1 = InputSpec(1, 32, 32, (0.5,), (0.5,))
BIG = 10_000_000


def encode(image: Image.Image, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def gray_gradient(size=(20, 12)) -> Image.Image:
    w, h = size
    return Image.fromarray((np.arange(w * h).reshape(h, w) % 256).astype(np.uint8), mode="L")


def test_grayscale_is_stacked_to_three_channels():
    x = image_to_tensor(gray_gradient(), SPEC3)
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32
    assert torch.equal(x[0], x[1]) and torch.equal(x[1], x[2])


@pytest.mark.parametrize("fmt", ["PNG", "BMP", "TIFF"])
def test_lossless_formats_decode_to_the_same_tensor(fmt):
    image = gray_gradient()
    expected = image_to_tensor(image, SPEC3)
    torch.testing.assert_close(decode_image(encode(image, fmt), SPEC3, max_pixels=BIG), expected)


def test_jpeg_decodes_close_to_the_original():
    image = gray_gradient().convert("RGB")
    decoded = decode_image(encode(image, "JPEG"), SPEC3, max_pixels=BIG)
    assert (decoded - image_to_tensor(image, SPEC3)).abs().mean() < 0.05


def test_rgba_is_composited_onto_black_and_palette_is_expanded():
    rgb = Image.new("RGB", (8, 8), (200, 100, 50))
    rgba = rgb.convert("RGBA")
    rgba.putalpha(Image.new("L", (8, 8), 255))
    torch.testing.assert_close(image_to_tensor(rgba, SPEC3), image_to_tensor(rgb, SPEC3))
    transparent = rgb.convert("RGBA")
    transparent.putalpha(Image.new("L", (8, 8), 0))
    assert image_to_tensor(transparent, SPEC3).abs().sum() == 0
    palette = rgb.convert("P", palette=Image.Palette.ADAPTIVE)
    assert palette.mode == "P"
    torch.testing.assert_close(image_to_tensor(palette, SPEC3), image_to_tensor(rgb, SPEC3))


def test_sixteen_bit_grayscale_is_scaled_to_unit_range():
    arr = np.full((4, 4), 65535, dtype=np.uint16)
    image = Image.fromarray(arr)
    assert image.mode.startswith("I;16")
    x = decode_image(encode(image), SPEC1, max_pixels=BIG)
    assert x.shape == (1, 32, 32)
    torch.testing.assert_close(x, torch.ones_like(x))


def test_colour_becomes_luminance_for_one_channel_models():
    x = image_to_tensor(Image.new("RGB", (5, 5), (255, 0, 0)), SPEC1)
    assert x.shape == (1, 32, 32)
    torch.testing.assert_close(x, torch.full_like(x, 0.299))


@pytest.mark.parametrize("size", [(1, 1), (8, 8), (31, 77), (640, 480)])
def test_any_size_is_resized_to_the_input_size(size):
    assert decode_image(encode(gray_gradient(size)), SPEC3, max_pixels=BIG).shape == (3, 32, 32)


def test_training_and_serving_paths_agree_on_a_digit_png():
    split = load_split("test")
    expected, _ = split.tensors(SPEC3)
    served = decode_image(encode(split.images[0]), SPEC3, max_pixels=BIG)
    torch.testing.assert_close(served, expected[0])


def test_digit_image_maps_ink_to_white():
    assert np.asarray(digit_image(np.full((8, 8), 16.0))).min() == 255


@pytest.mark.parametrize("data", [b"", b"not an image", encode(gray_gradient())[:40]])
def test_corrupt_bytes_are_invalid_input_naming_the_field(data):
    with pytest.raises(InvalidInput) as info:
        decode_image(data, SPEC3, max_pixels=BIG)
    assert info.value.field == "image.encoded"


def test_too_many_pixels_is_input_too_large():
    with pytest.raises(InputTooLarge):
        decode_image(encode(gray_gradient((100, 100))), SPEC3, max_pixels=5000)


def test_tensor_round_trip():
    x = torch.rand(3, 32, 32)
    shape, data = tensor_to_bytes(x)
    torch.testing.assert_close(tensor_from_bytes(shape, data, SPEC3), x)


@pytest.mark.parametrize(
    ("shape", "values", "field", "match"),
    [
        ([3, 16, 16], np.zeros((3, 16, 16)), "image.tensor.shape", "must be"),
        ([3, 32, 32], np.zeros(10), "image.tensor.data", "bytes"),
        ([3, 32, 32], np.full((3, 32, 32), np.nan), "image.tensor.data", "NaN"),
        ([3, 32, 32], np.full((3, 32, 32), np.inf), "image.tensor.data", "NaN or Inf"),
        ([3, 32, 32], np.full((3, 32, 32), 2.0), "image.tensor.data", r"\[0, 1\]"),
    ],
)
def test_bad_tensors_are_refused_naming_the_field(shape, values, field, match):
    with pytest.raises(InvalidInput, match=match) as info:
        tensor_from_bytes(shape, values.astype("<f4").tobytes(), SPEC3)
    assert info.value.field == field


def test_decode_plan_by_hand():
    from axguard.engine.preprocess import decode_plan

    mib = 2**20
    # 1 GiB, 8 workers × 3 copies × 16 MiB = 384 MiB in flight; 640 MiB left: 2 decodes of
    # 320 MiB, at 10 bytes a pixel
    assert decode_plan(1024 * mib, 8, 16 * mib) == (2, 640 * mib // 20)
    assert decode_plan(1024 * mib, 2, 16 * mib) == (2, 928 * mib // 20)  # one per worker
    assert decode_plan(100 * mib, 8, mib) == (1, 76 * mib // 10)  # at least one
    with pytest.raises(ValueError, match="at least 32 MiB"):
        decode_plan(400 * mib, 8, 16 * mib)


def _gradient_image(size: int) -> Image.Image:
    ramp = np.linspace(0, 255, size, dtype=np.float32)
    rgb = np.stack([np.add.outer(ramp, ramp) / 2, np.tile(ramp, (size, 1)),
                    np.tile(ramp[:, None], (1, size))], axis=-1)
    return Image.fromarray(rgb.astype(np.uint8), "RGB")


def test_large_images_are_shrunk_in_pixel_space_with_the_same_result():
    from axguard.engine.preprocess import _shrink, _to_unit_array

    spec = InputSpec(3, 32, 32, (0.5,) * 3, (0.5,) * 3)
    image = _gradient_image(1024)
    assert _shrink(image, spec).size == (64, 64)  # 16× reduction keeps ≥ 2× the input
    direct = torch.nn.functional.interpolate(
        torch.from_numpy(_to_unit_array(image)).permute(2, 0, 1)[None], size=(32, 32),
        mode="bilinear", align_corners=False, antialias=True)[0]
    assert (image_to_tensor(image, spec) - direct).abs().max() < 0.02
    for mode in ("P", "1", "I;16", "LA"):
        assert image_to_tensor(image.convert(mode) if mode != "I;16" else
                               image.convert("L").convert("I;16"), spec).shape == (3, 32, 32)


def test_jpeg_is_decoded_at_reduced_size_with_the_same_result():
    spec = InputSpec(3, 32, 32, (0.5,) * 3, (0.5,) * 3)
    image = _gradient_image(2048)
    jpeg, png = io.BytesIO(), io.BytesIO()
    image.save(jpeg, "JPEG", quality=95)
    image.save(png, "PNG")
    from_jpeg = decode_image(jpeg.getvalue(), spec, max_pixels=10**8)
    from_png = decode_image(png.getvalue(), spec, max_pixels=10**8)
    assert (from_jpeg - from_png).abs().max() < 0.03
