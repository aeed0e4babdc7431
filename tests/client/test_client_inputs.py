"""What a pipeline holds goes straight to `check`: numpy arrays, PIL images and torch
tensors, checked on the client, sent as raw tensors where they fit the model and encoded
where not, and answered exactly as the same pixels in a file; the response helpers."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from axguard_client import (
    AxguardClient,
    ImageError,
    ModelInput,
    build_check_request,
    heatmap_array,
    split_batch,
    tensor_array,
    to_dict,
)
from axguard_client.v1 import confidence_pb2 as pb
from conftest import EXAMPLES, png_bytes

DIGIT = EXAMPLES / "digit_5.png"
GREY = Image.open(DIGIT).convert("L")  # 8x8, the model takes 3x32x32
GREY.load()
RGB32 = GREY.convert("RGB").resize((32, 32), Image.Resampling.NEAREST)
DEMO = ModelInput(3, 32, 32)


def logits(response: pb.CheckResponse) -> np.ndarray:
    assert not response.HasField("error"), response.error
    return np.array(response.prediction.logits)


def source(image: object, model: ModelInput | None = DEMO) -> str:
    return build_check_request(image, model=model).image.WhichOneof("source")


def test_arrays_at_the_model_input_go_as_raw_tensors_and_answer_as_the_file(client):
    hwc = np.asarray(RGB32)  # 32x32x3 uint8
    assert source(hwc) == "tensor"
    from_file = logits(client.check(png_bytes(RGB32)))
    np.testing.assert_allclose(logits(client.check(hwc)), from_file, rtol=0, atol=1e-6)
    chw_float = torch.from_numpy(hwc.copy()).permute(2, 0, 1).float() / 255  # torch: C×H×W
    assert source(chw_float) == "tensor"
    np.testing.assert_allclose(logits(client.check(chw_float)), from_file, atol=1e-6)
    np.testing.assert_allclose(logits(client.check(RGB32)), from_file, atol=1e-6)  # PIL
    assert source(RGB32) == "tensor"
    # One grey channel for a three-channel model: widened as the server widens a grey file.
    grey32 = np.asarray(RGB32.convert("L"))
    assert source(grey32) == "tensor"
    np.testing.assert_allclose(logits(client.check(grey32)),
                               logits(client.check(png_bytes(RGB32.convert("L")))),
                               atol=1e-6)


def test_other_sizes_are_encoded_and_resized_by_the_server_as_a_file_is(client):
    from_file = logits(client.check(DIGIT))
    grey = np.asarray(GREY)  # 8x8 uint8: PNG, exact
    assert source(grey) == "encoded"
    np.testing.assert_allclose(logits(client.check(grey)), from_file, atol=1e-6)
    np.testing.assert_allclose(logits(client.check(GREY)), from_file, atol=1e-6)  # PIL
    unit = grey.astype(np.float64) / 255  # one float channel: a float TIFF, exact
    np.testing.assert_allclose(logits(client.check(unit)), from_file, atol=1e-4)
    hwc = np.repeat(grey[:, :, None], 3, axis=2).astype(np.float32) / 255  # RGB floats:
    np.testing.assert_allclose(logits(client.check(hwc)), from_file, atol=1e-4)  # 8-bit PNG
    rgba = Image.fromarray(np.dstack([grey] * 3 + [np.full_like(grey, 255)]))
    np.testing.assert_allclose(logits(client.check(rgba)), from_file, atol=1e-6)
    # Without the model's input (a bare build_check_request) every array is encoded.
    assert source(np.asarray(RGB32), model=None) == "encoded"


def test_the_client_fetches_the_model_input_once(demo_server):
    with AxguardClient(demo_server.target, timeout=60) as client:
        client.check(DIGIT)
        assert client._info is None  # a file needs no model input
        client.check(np.asarray(RGB32))
        info = client._info
        assert ModelInput.of(info) == DEMO
        client.check(np.asarray(GREY))
        assert client._info is info


@pytest.mark.parametrize(("image", "message"), [
    (np.full((32, 32), 2.0), r"image: float pixels must be in \[0, 1\]; found \[2, 2\]"),
    (np.full((32, 32), np.nan, dtype=np.float32), "image: holds NaN or infinite values"),
    (np.zeros((32, 32), dtype=np.int64), "image: has dtype int64"),
    (np.zeros((32, 32), dtype=bool), "image: has dtype bool"),
    (np.zeros((2, 3, 32, 32), dtype=np.uint8), r"image: has shape \(2, 3, 32, 32\); one image"),
    (np.zeros((5, 6, 7), dtype=np.uint8), r"image: has shape \(5, 6, 7\); a 3-d image needs"),
    (np.zeros((0, 32), dtype=np.uint8), "image: has no pixels"),
    (np.zeros(32, dtype=np.uint8), r"image: has shape \(32,\)"),
    (b"", "image: is empty"),
    ([[0, 1], [1, 0]], "image: expected encoded bytes, a file path, .* not list"),
    ("/no/such/file.png", "image: cannot read '/no/such/file.png'"),
])
def test_bad_inputs_are_refused_on_the_client_naming_the_argument(client, image, message):
    with pytest.raises(ImageError, match=message):
        client.check(image)


def test_a_bad_item_of_a_batch_is_named_by_its_index(client):
    with pytest.raises(ImageError, match=r"images\[1\]: float pixels must be in"):
        client.check_batch([DIGIT, np.full((8, 8), -1.0)])


def test_check_batch_takes_mixed_inputs_and_a_4d_array(client):
    hwc = np.asarray(RGB32)
    mixed = [DIGIT, DIGIT.read_bytes(), GREY, hwc, torch.from_numpy(hwc.copy()).permute(2, 0, 1)]
    answers = client.check_batch(mixed)
    assert [a.prediction.class_name for a in answers] == ["5"] * 5
    stack = np.stack([hwc] * 3)  # N×H×W×C
    assert [a.prediction.class_name for a in client.check_batch(stack)] == ["5"] * 3


def test_split_batch_keeps_order_within_item_and_byte_limits():
    requests = [pb.CheckRequest(request_id=str(i), image=pb.Image(encoded=b"x" * 1000))
                for i in range(10)]
    by_items = split_batch(requests, 4, 0)
    assert [len(c) for c in by_items] == [4, 4, 2]
    by_bytes = split_batch(requests, 0, 16 * 1024 + 3 * 1020)
    assert [len(c) for c in by_bytes] == [3, 3, 3, 1]
    assert [r.request_id for c in by_bytes for r in c] == [str(i) for i in range(10)]
    assert split_batch(requests[:1], 1, 10) == [requests[:1]]  # too large alone: alone


def test_response_helpers(client):
    response = client.check(DIGIT, return_heatmaps=True)
    saliency = heatmap_array(response, "saliency")
    assert saliency.shape == (3, 32, 32) and saliency.dtype == np.float32
    assert np.abs(saliency).max() <= 1.0 and np.abs(saliency).max() > 0
    np.testing.assert_array_equal(heatmap_array(response, pb.ATTRIBUTION_METHOD_SALIENCY),
                                  saliency)
    np.testing.assert_array_equal(heatmap_array(response, "DECONVOLUTION"),
                                  tensor_array(response.heatmaps["deconvolution"]))
    with pytest.raises(KeyError, match="no 'deep_lift' heatmap .* return_heatmaps=True"):
        heatmap_array(response, "deep_lift")
    as_dict = to_dict(client.check(DIGIT))
    assert as_dict["prediction"]["class_name"] == "5"
    assert as_dict["verdict"]["likely_wrong"] in (True, False)  # present even when false
    assert {"co_scores", "timing", "receipt"} <= as_dict.keys()
    with pytest.raises(ValueError, match="bytes for shape"):
        tensor_array(pb.Tensor(shape=[2, 2], data=b"\0" * 12))


def test_a_jpeg_of_the_array_is_not_what_is_sent(client):
    """The raw-tensor path sends the exact pixels: a lossy JPEG of the same array answers
    differently, the array as the lossless PNG does not."""
    noisy = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    jpeg = io.BytesIO()
    Image.fromarray(noisy).save(jpeg, format="JPEG", quality=50)
    exact = logits(client.check(noisy))
    np.testing.assert_allclose(exact, logits(client.check(png_bytes(Image.fromarray(noisy)))),
                               atol=1e-6)
    assert np.abs(exact - logits(client.check(jpeg.getvalue()))).max() > 1e-3
