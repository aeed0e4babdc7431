"""Receipts, keys, the duplicate filter and the drift window, against hand computations."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import math
import random

import numpy as np
import pytest

from axguard.errors import ConfigError
from axguard.flag.drift import (
    MAX_CLASS_BINS,
    DriftReference,
    DriftWindow,
    bin_counts,
    class_bins,
    decile_edges,
    psi,
)
from axguard.serving.feedback import (
    DuplicateFilter,
    FeedbackBook,
    LabelOutOfRange,
    Receipt,
    ReceiptError,
    ReceiptKeys,
    open_receipt,
    sign_receipt,
)

SECRET = b"s" * 32
RECEIPT = Receipt("req-1", "a55f1dda1bed3998", "cal-x", 3, 0.25, True, 1_700_000_000_000)


def test_a_receipt_is_hmac_sha256_over_prefix_key_id_and_json_payload():
    text = sign_receipt(RECEIPT, "k1", SECRET)
    prefix, key_id, payload, signature = text.split(".")
    assert (prefix, key_id) == ("axr1", "k1")
    body = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    assert body == {"i": "req-1", "m": "a55f1dda1bed3998", "c": "cal-x", "k": 3, "r": 0.25,
                    "f": True, "t": 1_700_000_000_000}
    expected = hmac.new(SECRET, f"axr1.k1.{payload}".encode(), hashlib.sha256).digest()
    assert base64.urlsafe_b64decode(signature + "=") == expected
    assert open_receipt(text, {"k1": SECRET}) == (RECEIPT, expected)


def test_a_receipt_without_verdict_round_trips_its_nones():
    bare = Receipt("r", "m", "", 0, None, None, 5)
    assert open_receipt(sign_receipt(bare, "k", SECRET), {"k": SECRET})[0] == bare


def test_a_long_request_id_is_carried_as_its_hash():
    long = Receipt("x" * 500, "m", "", 0, None, None, 5)
    opened, _ = open_receipt(sign_receipt(long, "k", SECRET), {"k": SECRET})
    assert opened.request_id == "sha256:" + hashlib.sha256(b"x" * 500).hexdigest()[:32]


@pytest.mark.parametrize("mangle,reason", [
    (lambda t: "", "malformed"),
    (lambda t: "x" * 5000, "malformed"),
    (lambda t: t.replace("axr1", "axr2", 1), "malformed"),
    (lambda t: t + ".extra", "malformed"),
    (lambda t: t.replace(".k1.", ".k9.", 1), "unknown_key"),
    (lambda t: t[:-2] + ("AA" if not t.endswith("AA") else "BB"), "bad_signature"),
    (lambda t: t[:-1] + "!", "bad_signature"),
])
def test_every_broken_receipt_is_refused_with_its_reason(mangle, reason):
    text = sign_receipt(RECEIPT, "k1", SECRET)
    with pytest.raises(ReceiptError) as err:
        open_receipt(mangle(text), {"k1": SECRET})
    assert err.value.reason == reason


def test_a_changed_payload_does_not_verify():
    text = sign_receipt(RECEIPT, "k1", SECRET)
    prefix, kid, payload, sig = text.split(".")
    forged = sign_receipt(Receipt("req-1", "a55f1dda1bed3998", "cal-x", 3, 0.25, False,
                                  RECEIPT.issued_ms), "k1", b"another secret of 32 bytes....")
    forged_payload = forged.split(".")[2]
    with pytest.raises(ReceiptError) as err:
        open_receipt(".".join((prefix, kid, forged_payload, sig)), {"k1": SECRET})
    assert err.value.reason == "bad_signature"


def test_key_file_errors_name_the_line(tmp_path):
    for text, words in [("", "holds no key"), ("k1 short\n", "fewer than 32 bytes"),
                        ("bad.id " + "s" * 32, "key id"),
                        (f"k1 {'a' * 32}\nk1 {'b' * 32}\n", "appears twice")]:
        path = tmp_path / "keys"
        path.write_text(text)
        with pytest.raises(ConfigError) as err:
            ReceiptKeys(path)
        assert words in err.value.message and err.value.field == "feedback.key_file"
    with pytest.raises(ConfigError, match="cannot read"):
        ReceiptKeys(tmp_path / "missing")


def test_key_rotation_signs_with_the_new_first_key_and_verifies_old_receipts(tmp_path):
    path = tmp_path / "keys"
    path.write_text(f"# receipt keys\nold {'o' * 32}\n")
    keys = ReceiptKeys(path)
    keys.RECHECK_SECONDS = 0.0
    book = FeedbackBook(keys, fingerprint="f" * 64, num_classes=10, max_age_seconds=3600,
                        max_clock_skew_seconds=60, duplicate_capacity=100)
    old = book.issue("a", "cal", 1, 0.1, False)
    path.write_text(f"new {'n' * 32}\nold {'o' * 32}\n")
    new = book.issue("b", "cal", 1, 0.1, False)
    assert old.split(".")[1] == "old" and new.split(".")[1] == "new"
    assert book.count(old, 1).correct and book.count(new, 2).correct is False
    path.write_text(f"new {'n' * 32}\n")  # the old key retired
    with pytest.raises(ReceiptError) as err:
        book.count(book.issue("c", "cal", 1, 0.1, False).replace(".new.", ".old.", 1), 1)
    assert err.value.reason == "unknown_key"
    path.write_text("broken\n")  # a bad rewrite keeps the last good keys
    assert book.count(new, 2).duplicate


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def _book(tmp_path, clock: Clock, capacity: int = 1000) -> FeedbackBook:
    path = tmp_path / "keys"
    path.write_text(f"k1 {'s' * 32}\n")
    return FeedbackBook(ReceiptKeys(path), fingerprint="ab" * 32, num_classes=10,
                        max_age_seconds=100, max_clock_skew_seconds=5,
                        duplicate_capacity=capacity, clock=clock)


def test_age_model_skew_and_label_are_checked(tmp_path):
    clock = Clock(1000.0)
    book = _book(tmp_path, clock)
    receipt = book.issue("r", "cal", 4, 0.9, True)
    clock.now = 1101.0
    with pytest.raises(ReceiptError) as err:
        book.count(receipt, 4)
    assert err.value.reason == "expired" and "limit is 100 s" in err.value.message
    clock.now = 990.0  # the issuing replica's clock ran 10 s ahead of this one
    with pytest.raises(ReceiptError) as err:
        book.count(receipt, 4)
    assert err.value.reason == "from_future"
    clock.now = 1000.0
    with pytest.raises(LabelOutOfRange):
        book.count(receipt, 10)
    with pytest.raises(LabelOutOfRange):
        book.count(receipt, -1)
    other = FeedbackBook(book.keys, fingerprint="cd" * 32, num_classes=10,
                         max_age_seconds=100, max_clock_skew_seconds=5,
                         duplicate_capacity=10, clock=clock)
    with pytest.raises(ReceiptError) as err:
        other.count(receipt, 4)
    assert err.value.reason == "other_model"
    counted = book.count(receipt, 4)
    assert counted.correct and not counted.duplicate and counted.receipt.flagged
    assert book.count(receipt, 2).duplicate  # the first label wins


def test_the_duplicate_filter_forgets_expired_receipts_first():
    dup = DuplicateFilter(capacity=3)
    assert [dup.add(k, t, oldest_valid_ms=0) for k, t in [(b"a", 1), (b"b", 2), (b"c", 3)]] \
        == ["new"] * 3
    assert dup.add(b"a", 1, oldest_valid_ms=0) == "duplicate"
    # a and b expired: room without moving the horizon.
    assert dup.add(b"d", 4, oldest_valid_ms=3) == "new"
    assert len(dup) == 2 and dup.horizon_ms == -1 and dup.forgotten_early == 0


def test_a_full_duplicate_filter_refuses_rather_than_count_twice():
    dup = DuplicateFilter(capacity=2)
    assert dup.add(b"a", 10, 0) == "new"
    assert dup.add(b"b", 20, 0) == "new"
    assert dup.add(b"c", 30, 0) == "new"  # forgets a (issued 10): horizon 10
    assert dup.horizon_ms == 10 and dup.forgotten_early == 1
    assert dup.add(b"a", 10, 0) == "beyond_horizon"  # could be a repeat: refused
    assert dup.add(b"e", 5, 0) == "beyond_horizon"
    assert dup.add(b"b", 20, 0) == "duplicate"


def test_no_receipt_is_ever_counted_twice_under_random_traffic():
    rng = random.Random(0)
    dup = DuplicateFilter(capacity=50)
    counted: set[bytes] = set()
    for step in range(20_000):
        now = step
        issued = max(0, now - rng.randrange(400))
        key = f"{issued}:{rng.randrange(3)}".encode()
        outcome = dup.add(key, issued, oldest_valid_ms=now - 300)
        if outcome == "new":
            assert key not in counted
            counted.add(key)
        assert len(dup) <= 50


def test_psi_against_a_hand_computation():
    # r = (50.5, 50.5)/101, w = (80.5, 20.5)/101
    r = np.array([0.5, 0.5])
    w = np.array([80.5, 20.5]) / 101
    expected = float(np.sum((w - r) * np.log(w / r)))
    assert math.isclose(expected, 0.40629, abs_tol=1e-4)
    assert psi([50, 50], [80, 20]) == pytest.approx(expected)
    assert psi([10, 0, 10], [10, 0, 10]) == 0.0


def test_decile_edges_merge_ties_and_bins_cover_everything():
    values = np.array([0.0] * 80 + list(np.linspace(1, 2, 20)))
    edges = decile_edges(values)
    assert edges[0] == 0.0 and len(edges) < 9
    counts = bin_counts(np.array([-1.0, 0.0, 1.5, 99.0]), edges)
    assert counts.sum() == 4 and len(counts) == len(edges) + 1


def test_many_classes_share_one_rest_bin():
    predictions = np.repeat(np.arange(100), np.arange(100, 0, -1))
    mapping = class_bins(predictions, 100)
    assert mapping.max() == MAX_CLASS_BINS - 1
    assert list(mapping[: MAX_CLASS_BINS - 1]) == list(range(MAX_CLASS_BINS - 1))
    assert set(mapping[MAX_CLASS_BINS - 1:]) == {MAX_CLASS_BINS - 1}


def _reference() -> DriftReference:
    rng = np.random.default_rng(0)
    risk = rng.uniform(0, 1, 400)
    return DriftReference.from_samples("cal-x", risk, rng.exponential(5, 400),
                                       rng.integers(0, 10, 400), 10, flagged_share=0.05)


def test_the_drift_window_is_quiet_on_reference_like_data_and_loud_on_shifted_data():
    ref = _reference()
    rng = np.random.default_rng(1)
    window = DriftWindow(ref, size=1000, min_items=200)
    for _ in range(150):
        window.add(0.5, 1.0, 0, False)
    assert window.state().psi == {}  # below min_items
    for _ in range(1000):  # replaces every earlier item
        window.add(float(rng.uniform()), float(rng.exponential(5)), int(rng.integers(0, 10)),
                   bool(rng.uniform() < 0.05))
    quiet = window.state()
    assert quiet.items == 1000 and max(quiet.psi.values()) < 0.1
    assert 0.02 < quiet.flagged_share < 0.08
    for _ in range(1000):
        window.add(float(rng.uniform(0.8, 1.0)), float(rng.exponential(0.5)), 3, True)
    loud = window.state()
    assert all(v > 0.25 for v in loud.psi.values()) and loud.flagged_share == 1.0


def test_feedback_and_drift_settings_are_validated(tmp_path, demo_engine):
    from pydantic import ValidationError

    from axguard.config import load_settings
    from axguard.transport.server import build_server

    with pytest.raises(ValidationError, match="max_age"):
        load_settings(feedback={"max_age": -5})
    with pytest.raises(ValidationError, match="min_items must not exceed"):
        load_settings(drift={"window": 100, "min_items": 500})
    assert load_settings(feedback={"max_age": "P2D"}).feedback.max_age.days == 2
    weak = tmp_path / "weak"
    weak.write_text("k1 short\n")
    settings = load_settings(server={"port": 0}, feedback={"key_file": weak})
    with pytest.raises(ConfigError) as err:
        build_server(settings, demo_engine)
    assert err.value.field == "feedback.key_file" and str(weak) in err.value.message
