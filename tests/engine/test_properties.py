"""Property-based tests (hypothesis) of image and tensor validation: whatever the bytes,
the result is a valid model input or a typed error naming the field."""

from __future__ import annotations

import io

import numpy as np
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from axguard.engine.model import InputSpec
from axguard.engine.preprocess import decode_image, tensor_from_bytes
from axguard.errors import InputTooLarge, InvalidInput

SPEC = InputSpec(3, 32, 32, (0.5,) * 3, (0.5,) * 3)
GRAY = InputSpec(1, 16, 16, (0.5,), (0.5,))
TINY = InputSpec(3, 4, 4, (0.5,) * 3, (0.5,) * 3)
FAST = settings(max_examples=150, deadline=None,
                suppress_health_check=[HealthCheck.too_slow])


def assert_valid_input(x: torch.Tensor, spec: InputSpec) -> None:
    assert tuple(x.shape) == spec.shape and x.dtype == torch.float32
    assert torch.isfinite(x).all() and x.min() >= 0 and x.max() <= 1


def _sample_images() -> list[bytes]:
    out = []
    rng = np.random.default_rng(0)
    for fmt, mode in (("PNG", "RGBA"), ("PNG", "P"), ("JPEG", "RGB"), ("BMP", "RGB"),
                      ("TIFF", "RGB"), ("PNG", "I;16"), ("TIFF", "F")):
        array = rng.integers(0, 255, (12, 9, 4 if mode == "RGBA" else 3), dtype=np.uint8)
        image = Image.fromarray(array[..., :4] if mode == "RGBA" else array[..., :3])
        if mode in ("P",):
            image = image.convert("P")
        elif mode == "I;16":
            image = image.convert("L").convert("I;16")
        elif mode == "F":
            image = image.convert("F")
        buffer = io.BytesIO()
        image.save(buffer, fmt)
        out.append(buffer.getvalue())
    return out


SAMPLES = _sample_images()


@FAST
@given(data=st.binary(max_size=3000), spec=st.sampled_from([SPEC, GRAY]))
def test_any_bytes_decode_to_a_valid_input_or_a_named_error(data, spec):
    try:
        x = decode_image(data, spec, max_pixels=10**6, field="image.encoded")
    except (InvalidInput, InputTooLarge) as err:
        assert err.field == "image.encoded"
    else:
        assert_valid_input(x, spec)


@FAST
@given(index=st.integers(0, len(SAMPLES) - 1),
       flips=st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 7)), max_size=12),
       cut=st.one_of(st.none(), st.integers(0, 10**6)), spec=st.sampled_from([SPEC, GRAY]))
def test_damaged_real_images_decode_or_fail_naming_the_field(index, flips, cut, spec):
    data = bytearray(SAMPLES[index])
    for pos, bit in flips:
        data[pos % len(data)] ^= 1 << bit
    if cut is not None:
        data = data[: cut % (len(data) + 1)]
    try:
        x = decode_image(bytes(data), spec, max_pixels=10**6, field="requests[2].image.encoded")
    except (InvalidInput, InputTooLarge) as err:
        assert err.field == "requests[2].image.encoded"
    else:
        assert_valid_input(x, spec)


@FAST
@given(shape=st.one_of(st.just([3, 4, 4]), st.lists(st.integers(-2, 8), max_size=5)),
       values=st.one_of(
           st.binary(max_size=256),
           st.lists(st.floats(width=32, allow_nan=True, allow_infinity=True),
                    min_size=48, max_size=48).map(lambda v: np.asarray(v, "<f4").tobytes())))
def test_any_tensor_is_a_valid_input_or_a_named_error(shape, values):
    try:
        x = tensor_from_bytes(shape, values, TINY, field="image.tensor")
    except InvalidInput as err:
        assert err.field in ("image.tensor.shape", "image.tensor.data")
    else:
        assert_valid_input(x, TINY)


@FAST
@given(values=st.lists(st.floats(0, 1, width=32), min_size=48, max_size=48))
def test_every_valid_tensor_round_trips(values):
    data = np.asarray(values, "<f4").tobytes()
    x = tensor_from_bytes([3, 4, 4], data, TINY)
    assert x.numpy().astype("<f4").tobytes() == data
