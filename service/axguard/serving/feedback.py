"""Receipts and label feedback: signed, stateless receipts any replica can verify, and a
bounded duplicate filter so that a label is counted once.

A receipt is `axr1.<key id>.<payload>.<signature>`: the payload is base64url of compact
JSON (request id, model fingerprint prefix, calibration id, predicted class, risk, flag,
issue time in ms), the signature base64url of HMAC-SHA256(key, "axr1.<key id>.<payload>").
Nothing about a receipt is stored when it is issued, so feedback may reach any replica that
holds the same key file. Nothing here knows gRPC.
"""

from __future__ import annotations

import base64
import hashlib
import heapq
import hmac
import json
import logging
import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from ..errors import ConfigError, StoreUnavailable

log = logging.getLogger(__name__)

PREFIX = "axr1"
MAX_RECEIPT_CHARS = 1024
"""Longer strings are refused before any work (a real receipt is about 250 characters)."""
MAX_REQUEST_ID_CHARS = 128
"""Longer request ids are carried as "sha256:" + 32 hex digits of their hash."""
MIN_SECRET_BYTES = 32
FINGERPRINT_CHARS = 16
"""The receipt names the model by the first 16 hex digits (64 bits) of its fingerprint."""
_KEY_ID = re.compile(r"^[A-Za-z0-9_-]{1,32}$")


@dataclass(frozen=True)
class Receipt:
    """What a receipt binds."""

    request_id: str
    model: str
    """First FINGERPRINT_CHARS hex digits of the model's sha256 fingerprint."""
    calibration_id: str
    """Empty when the check had no calibrated verdict."""
    predicted_class: int
    risk: float | None
    """None when the check had no calibrated verdict (prediction_only, no calibration)."""
    flagged: bool | None
    """None when the check had no calibrated verdict."""
    issued_ms: int
    """Unix time in milliseconds."""


class ReceiptError(Exception):
    """A receipt that cannot be counted; `reason` is a bounded metric label."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def receipt_request_id(request_id: str) -> str:
    """Return the request id as a receipt carries it (long ids by their hash)."""
    if len(request_id) <= MAX_REQUEST_ID_CHARS:
        return request_id
    return "sha256:" + hashlib.sha256(request_id.encode()).hexdigest()[:32]


def sign_receipt(receipt: Receipt, key_id: str, secret: bytes) -> str:
    """Return the receipt string for `receipt`, signed with one key."""
    body = {"i": receipt_request_id(receipt.request_id), "m": receipt.model,
            "c": receipt.calibration_id, "k": receipt.predicted_class,
            "r": None if receipt.risk is None else round(float(receipt.risk), 6),
            "f": receipt.flagged, "t": receipt.issued_ms}
    payload = _b64(json.dumps(body, separators=(",", ":")).encode())
    signed = f"{PREFIX}.{key_id}.{payload}"
    signature = hmac.new(secret, signed.encode("ascii"), hashlib.sha256).digest()
    return f"{signed}.{_b64(signature)}"


def open_receipt(text: str, keys: dict[str, bytes]) -> tuple[Receipt, bytes]:
    """Verify a receipt string and return (receipt, signature); ReceiptError otherwise.

    Reasons: "malformed", "unknown_key", "bad_signature". Age and model are the caller's
    checks (they need the clock and the served model).
    """
    if not text:
        raise ReceiptError("malformed", "is empty: send the receipt of the CheckResponse")
    if len(text) > MAX_RECEIPT_CHARS:
        raise ReceiptError("malformed", f"has {len(text)} characters; a receipt has at most "
                                        f"{MAX_RECEIPT_CHARS}")
    parts = text.split(".")
    if len(parts) != 4 or parts[0] != PREFIX:
        raise ReceiptError("malformed", f"is not an axguard receipt ({PREFIX}.<key id>."
                                        "<payload>.<signature>)")
    _, key_id, payload, signature_text = parts
    secret = keys.get(key_id)
    if secret is None:
        raise ReceiptError("unknown_key", f"was signed with key id {key_id[:32]!r}, which "
                                          "this server does not hold (rotated out?)")
    try:
        signature = _unb64(signature_text)
    except ValueError:
        raise ReceiptError("bad_signature", "has a signature that does not verify") from None
    expected = hmac.new(secret, f"{PREFIX}.{key_id}.{payload}".encode("ascii"),
                        hashlib.sha256).digest()
    if not hmac.compare_digest(signature, expected):
        raise ReceiptError("bad_signature", "has a signature that does not verify")
    try:  # signed by us: only a leaked key could make this fail
        body = json.loads(_unb64(payload))
        flagged = body["f"]
        receipt = Receipt(
            request_id=str(body["i"]), model=str(body["m"]), calibration_id=str(body["c"]),
            predicted_class=int(body["k"]), risk=None if body["r"] is None else float(body["r"]),
            flagged=None if flagged is None else bool(flagged), issued_ms=int(body["t"]))
    except (ValueError, KeyError, TypeError):
        raise ReceiptError("malformed", "has a payload this server cannot read") from None
    return receipt, signature


class ReceiptKeys:
    """The receipt keys of `feedback.key_file`, reread when the file changes.

    One key per line, `<key id> <secret>` (blank lines and # comments ignored); the first
    line's key signs new receipts, every key verifies. Rotation: add the new key as the
    first line, keep the old one below it until its receipts are older than max_age.
    """

    RECHECK_SECONDS = 1.0

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self._stamp: tuple = ()
        self._checked = 0.0
        self.keys: dict[str, bytes] = {}
        self.signing_key_id = ""
        self._reload(initial=True)

    @staticmethod
    def parse(text: str) -> tuple[str, dict[str, bytes]]:
        """Return (signing key id, keys by id) of a key file's text; ConfigError if bad."""
        keys: dict[str, bytes] = {}
        first = ""
        for number, line in enumerate(text.splitlines(), start=1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            key_id, _, secret = line.partition(" ")
            secret = secret.strip()
            where = f"line {number}"
            if not _KEY_ID.match(key_id):
                raise ConfigError(f"{where}: key id must be 1-32 of A-Z a-z 0-9 _ -",
                                  field="feedback.key_file")
            if len(secret.encode()) < MIN_SECRET_BYTES:
                raise ConfigError(f"{where}: the secret of key {key_id!r} has fewer than "
                                  f"{MIN_SECRET_BYTES} bytes (make one with `openssl rand "
                                  "-base64 32`)", field="feedback.key_file")
            if key_id in keys:
                raise ConfigError(f"{where}: key id {key_id!r} appears twice",
                                  field="feedback.key_file")
            keys[key_id] = secret.encode()
            first = first or key_id
        if not keys:
            raise ConfigError("holds no key: write `<key id> <secret>` lines",
                              field="feedback.key_file")
        return first, keys

    def _reload(self, initial: bool = False) -> None:
        try:
            stat = self.path.stat()
            stamp = (stat.st_mtime_ns, stat.st_size)
            if stamp == self._stamp:
                return
            signing, keys = self.parse(self.path.read_text())
        except (OSError, ConfigError) as err:
            if initial:
                if isinstance(err, ConfigError):
                    raise ConfigError(f"{self.path}: {err}", field=err.field) from None
                raise ConfigError(f"cannot read {self.path}: {err.strerror}",
                                  field="feedback.key_file") from err
            log.warning("receipt_keys_reload_failed", extra={"error": str(err)})
            return
        self.keys, self.signing_key_id, self._stamp = keys, signing, stamp
        if not initial:
            log.info("receipt_keys_reloaded", extra={"key_ids": sorted(keys)})

    def current(self) -> tuple[str, dict[str, bytes]]:
        """Return (signing key id, keys), rereading the file at most once a second."""
        now = time.monotonic()
        if now - self._checked >= self.RECHECK_SECONDS:
            with self._lock:
                if now - self._checked >= self.RECHECK_SECONDS:
                    self._checked = now
                    self._reload()
        return self.signing_key_id, self.keys


class DuplicateFilter:
    """Remembers counted receipts until they expire, in at most `capacity` entries.

    When full, the entry issued earliest is forgotten and the filter's horizon moves to its
    issue time: receipts issued at or before the horizon are then refused ("beyond_horizon")
    rather than risk counting one twice. So "counted once" always holds; a full filter
    shortens how late feedback may come, and says so.
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._seen: dict[bytes, int] = {}
        self._by_time: list[tuple[int, bytes]] = []
        self.horizon_ms = -1
        self.forgotten_early = 0
        """Entries dropped before they expired (the filter was full)."""
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._seen)

    def add(self, key: bytes, issued_ms: int, oldest_valid_ms: int) -> str:
        """Record `key`; return "new", "duplicate" or "beyond_horizon".

        Entries issued before `oldest_valid_ms` (expired receipts, refused anyway) are
        dropped first.
        """
        with self._lock:
            heap, seen = self._by_time, self._seen
            while heap and heap[0][0] < oldest_valid_ms:
                _, old = heapq.heappop(heap)
                del seen[old]
            if key in seen:
                return "duplicate"
            if issued_ms <= self.horizon_ms:
                return "beyond_horizon"
            if len(seen) >= self.capacity:
                issued, old = heapq.heappop(heap)
                del seen[old]
                self.horizon_ms = max(self.horizon_ms, issued)
                self.forgotten_early += 1
                if issued_ms <= self.horizon_ms:
                    return "beyond_horizon"
            seen[key] = issued_ms
            heapq.heappush(heap, (issued_ms, key))
            return "new"


class RedisDuplicates:
    """Counted receipts in Redis, shared by every replica and kept across restarts: one key
    per receipt signature, set with SET NX and an expiry of the receipt's remaining life,
    so a label counts once wherever and whenever it arrives. A store that cannot be reached
    raises StoreUnavailable (nothing is counted)."""

    def __init__(self, url: str, namespace: str, max_age_ms: int, max_skew_ms: int) -> None:
        import redis

        self._redis = redis.Redis.from_url(url, socket_timeout=2, socket_connect_timeout=2)
        self._errors = (redis.RedisError, OSError)
        self.namespace = namespace
        self.max_age_ms, self.max_skew_ms = max_age_ms, max_skew_ms
        self.url = url.split("@")[-1]  # never log a password

    def add(self, key: bytes, issued_ms: int, oldest_valid_ms: int) -> str:
        """Record `key` until its receipt expires; return "new" or "duplicate"."""
        now = oldest_valid_ms + self.max_age_ms
        remaining = max(1, issued_ms + self.max_age_ms + self.max_skew_ms - now)
        try:
            created = self._redis.set(f"{self.namespace}:{key.hex()}", issued_ms, nx=True,
                                      px=remaining)
        except self._errors as err:
            raise StoreUnavailable(f"the feedback store {self.url} cannot be reached "
                                   f"({type(err).__name__}); retry the request: nothing "
                                   "is counted twice", field="feedback.store") from err
        return "new" if created else "duplicate"


@dataclass(frozen=True)
class Counted:
    """A label that was verified: what it says about the check."""

    receipt: Receipt
    correct: bool
    duplicate: bool


class FeedbackBook:
    """Issues receipts for answers and verifies and de-duplicates labels for them."""

    def __init__(self, keys: ReceiptKeys, *, fingerprint: str, num_classes: int,
                 max_age_seconds: float, max_clock_skew_seconds: float,
                 duplicate_capacity: int, store: str = "memory",
                 clock=time.time) -> None:  # noqa: ANN001
        self.keys = keys
        self.model = fingerprint[:FINGERPRINT_CHARS]
        self.num_classes = num_classes
        self.max_age_ms = int(max_age_seconds * 1e3)
        self.max_skew_ms = int(max_clock_skew_seconds * 1e3)
        self.duplicates: DuplicateFilter | RedisDuplicates = (
            DuplicateFilter(duplicate_capacity) if store == "memory" else
            RedisDuplicates(store, f"axguard:feedback:{self.model}", self.max_age_ms,
                            self.max_skew_ms))
        self.clock = clock

    def issue(self, request_id: str, calibration_id: str, predicted_class: int,
              risk: float | None, flagged: bool | None) -> str:
        """Return a signed receipt for one answer."""
        return self.issue_many([(request_id, calibration_id, predicted_class, risk,
                                 flagged)])[0]

    def issue_many(self, answers: list[tuple[str, str, int, float | None, bool | None]]
                   ) -> list[str]:
        """Return signed receipts for the answers of one request, each (request id,
        calibration id, predicted class, risk, flagged): one key look-up and one clock
        reading for all of them."""
        key_id, keys = self.keys.current()
        secret, issued = keys[key_id], int(self.clock() * 1e3)
        return [sign_receipt(Receipt(request_id, self.model, calibration_id, predicted,
                                     risk, flagged, issued), key_id, secret)
                for request_id, calibration_id, predicted, risk, flagged in answers]

    def count(self, text: str, label: int) -> Counted:
        """Verify one label's receipt; ReceiptError (with field "receipt" or "label") if it
        cannot be counted. A receipt seen before comes back with duplicate=True."""
        _, keys = self.keys.current()
        receipt, signature = open_receipt(text, keys)
        now = int(self.clock() * 1e3)
        if receipt.model != self.model:
            raise ReceiptError("other_model", f"belongs to model {receipt.model}…, this server "
                                              f"serves {self.model}…")
        if now - receipt.issued_ms > self.max_age_ms:
            raise ReceiptError("expired", f"was issued {(now - receipt.issued_ms) / 1e3:.0f} s "
                                          f"ago; the limit is {self.max_age_ms / 1e3:.0f} s "
                                          "(feedback.max_age)")
        if receipt.issued_ms - now > self.max_skew_ms:
            raise ReceiptError("from_future", "was issued in the future (clocks of the "
                                              "replicas differ by more than "
                                              "feedback.max_clock_skew)")
        if not 0 <= label < self.num_classes:
            raise LabelOutOfRange(f"{label} is out of range: the model has "
                                  f"{self.num_classes} classes (0..{self.num_classes - 1})")
        seen = self.duplicates.add(signature[:16], receipt.issued_ms, now - self.max_age_ms)
        if seen == "beyond_horizon":
            raise ReceiptError(
                "beyond_horizon", "is older than what the duplicate filter still remembers "
                f"(it was full; receipts issued before {self.duplicates.horizon_ms} ms are "
                "refused so that none is counted twice); raise "
                "feedback.duplicate_filter_size or send labels sooner")
        return Counted(receipt, label == receipt.predicted_class, seen == "duplicate")


class LabelOutOfRange(ReceiptError):
    """The label, not the receipt, is wrong."""

    def __init__(self, message: str) -> None:
        super().__init__("label_out_of_range", message)
