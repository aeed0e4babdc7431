"""Settings: one pydantic-settings object, from defaults < YAML file < AXGUARD_* env < CLI.

Nested sections map to environment variables with a double underscore, e.g.
`AXGUARD_MODEL__SOURCE=torchvision:resnet34`, `AXGUARD_SERVER__PORT=50052`.
"""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    YamlConfigSettingsSource,
)

from .engine.attribution import DEFAULT_METHODS, require
from .errors import UnknownMethod


class ModelSettings(BaseModel):
    """Which model to serve and how its input looks."""

    model_config = ConfigDict(extra="forbid")

    source: str = "demo"
    """"demo", "torchvision:NAME", "timm:NAME" (timm.create_model, nothing downloaded; its
    pretrained configuration gives the input size, mean and std when not set),
    "package.module:factory", "torchscript:PATH" or a TorchScript file path, or a .pt2 file
    (a torch.export ExportedProgram: gradient methods only)."""
    weights: Path | None = None
    """State dict file: .safetensors (no pickle), else loaded with weights_only=True; not
    used for demo, TorchScript or .pt2."""
    classes: Path | None = None
    """Text file with one class name per line, in class-index order."""
    num_classes: int | None = Field(default=None, ge=2)
    """Number of classes; taken from the classes file when omitted."""
    input_size: list[int] | None = None
    """Input height and width in pixels: one value (square) or two (H W)."""
    channels: int = 3
    """Input channels the network takes (1 or 3)."""
    mean: list[float] | None = None
    """Per-channel mean of the normalisation placed before the network (pixel space [0, 1])."""
    std: list[float] | None = None
    """Per-channel standard deviation of that normalisation."""
    name: str | None = None
    """Model name reported by GetModelInfo; defaults to the source's name."""
    version: str = "1"
    """Model version reported by GetModelInfo."""
    device: str = "cpu"
    """Torch device: "cpu", "cuda" or "cuda:N"."""
    torch_threads: int | None = Field(default=None, ge=1)
    """Intra-op threads of torch; default: the usable CPU cores minus one (at least 1)."""
    memory_format: Literal["auto", "contiguous", "channels_last"] = "auto"
    """Layout of the network's convolution weights: "auto" times a check batch in both
    layouts at start-up and keeps channels_last only where it is at least 5% faster
    (torch's NCHW max-pooling on the CPU is several times slower); models without 4-D
    weights, TorchScript and exported programs stay as loaded."""
    views: list[str] = Field(default_factory=list)
    """Test-time views the model is invariant to, offered to calibration as the "views"
    evidence family: "hflip", "vflip", "shift:DX:DY", "rotate:DEGREES", "scale:FACTOR".
    Empty (the default) turns the family off: a view the model was not trained for hurts."""

    @field_validator("views")
    @classmethod
    def _known_views(cls, value: list[str]) -> list[str]:
        from .engine.evidence import parse_view
        from .errors import ConfigError

        for text in value:
            try:
                parse_view(text)
            except ConfigError as err:
                raise ValueError(str(err)) from None
        return value


class AttributionSettings(BaseModel):
    """Heatmap methods."""

    model_config = ConfigDict(extra="forbid")

    default_methods: list[str] = Field(default_factory=lambda: list(DEFAULT_METHODS))
    """Methods used when a request names none."""
    grad_cam_layer: str | None = None
    """Layer for LayerGradCam (qualified module name); default: the first Conv2d."""

    @field_validator("default_methods")
    @classmethod
    def _known(cls, value: list[str]) -> list[str]:
        for name in value:
            try:
                require(name)
            except UnknownMethod as err:
                raise ValueError(str(err)) from None
        return value


class TlsSettings(BaseModel):
    """TLS on the gRPC port: off unless cert_file and key_file are set."""

    model_config = ConfigDict(extra="forbid")

    cert_file: Path | None = None
    """PEM certificate chain of the server; reloaded when the file changes."""
    key_file: Path | None = None
    """PEM private key of the server; reloaded when the file changes."""
    client_ca_file: Path | None = None
    """PEM CA bundle: when set, clients must present a certificate it signed (mutual TLS)."""

    @model_validator(mode="after")
    def _complete(self) -> TlsSettings:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("server.tls needs both cert_file and key_file")
        if self.client_ca_file is not None and self.cert_file is None:
            raise ValueError("server.tls.client_ca_file needs cert_file and key_file")
        return self

    @property
    def enabled(self) -> bool:
        """True when TLS is configured."""
        return self.cert_file is not None


class AuthSettings(BaseModel):
    """Optional bearer tokens."""

    model_config = ConfigDict(extra="forbid")

    token_file: Path | None = None
    """File with one accepted token per line (e.g. a mounted Secret), reread when it
    changes; every RPC but health then needs `authorization: Bearer <token>`."""


class ServerSettings(BaseModel):
    """The gRPC server."""

    model_config = ConfigDict(extra="forbid")

    host: str = "127.0.0.1"
    """Address to bind; "0.0.0.0" or "[::]" in a container."""
    port: int = Field(default=50051, ge=0, le=65535)
    """gRPC port; 0 picks a free one."""
    max_workers: int = Field(default=8, ge=1)
    """Threads answering RPCs (per process)."""
    processes: int = Field(default=1, ge=1, le=64)
    """Server processes sharing the port (SO_REUSEPORT), each with its own engine, batcher
    and share of the cores; the kernel spreads connections, not requests, over them. For
    CPU pods with many cores and many clients; more replicas are usually simpler. Set above
    1, it overrides the engine processes' rule: each of these servers has one engine."""
    engine_processes: int | None = Field(default=None, ge=0, le=64)
    """Engine processes beside the serving process, all taking batches from its one queue,
    while it keeps the transport; 0 runs the engine in the serving process. Unset: chosen
    at start-up from the usable cores, the chosen torch threads, the measured cost of a
    check and of the transport per request, and the free memory (docs/performance.md
    states the rule)."""
    max_message_bytes: int = Field(default=64 * 1024 * 1024, ge=1024)
    """Largest request or response message, in bytes."""
    max_image_bytes: int = Field(default=16 * 1024 * 1024, ge=1)
    """Largest encoded image, in bytes (larger: RESOURCE_EXHAUSTED)."""
    memory_budget_mib: int = Field(default=1024, ge=64)
    """Memory for handling request images, in MiB: the bytes of max_workers requests in
    flight (3 × max_image_bytes each), then decoding. The number of concurrent decodes (one
    per 256 MiB left, at least 1, at most max_workers) and the pixel limit (what is left /
    (decodes × 10 bytes)) follow from it; the container's memory limit must cover it plus
    the model's own resident memory."""
    max_image_pixels: int | None = Field(default=None, ge=1)
    """Largest decoded image, in pixels (larger: RESOURCE_EXHAUSTED); default: from
    memory_budget_mib. A value above what the budget allows is refused at start-up."""
    max_batch_items: int = Field(default=256, ge=1)
    """Most items in one CheckBatch (more: RESOURCE_EXHAUSTED)."""
    grace_seconds: float = Field(default=10.0, ge=0)
    """On SIGTERM, how long in-flight requests may finish, in seconds."""
    max_connection_age_seconds: float = Field(default=300.0, ge=0)
    """Close each client connection (HTTP/2 GOAWAY) after about this long (gRPC adds ±10%
    jitter), so long-lived clients reconnect and reach replicas added since, as through a
    ClusterIP Service or an L4 proxy; the client reconnects without a failed call. 0: never."""
    max_connection_age_grace_seconds: float = Field(default=300.0, ge=0)
    """After a connection's age is up, how long calls already on it may still finish (a long
    Diagnose stream) before it is closed, in seconds."""
    tls: TlsSettings = Field(default_factory=TlsSettings)
    """TLS and mutual TLS."""
    auth: AuthSettings = Field(default_factory=AuthSettings)
    """Bearer tokens."""


class BatchingSettings(BaseModel):
    """The dynamic batcher in front of the engine."""

    model_config = ConfigDict(extra="forbid")

    max_batch_size: int = Field(default=32, ge=1)
    """Most images in one engine batch."""
    max_delay_ms: float = Field(default=2.0, ge=0)
    """How long the batcher waits for more requests after the first, in milliseconds."""
    max_queue: int = Field(default=512, ge=1)
    """Most images waiting; more get RESOURCE_EXHAUSTED at once."""


class MetricsSettings(BaseModel):
    """The Prometheus endpoint."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = True
    """Serve /metrics over HTTP."""
    host: str = "127.0.0.1"
    """Address of the metrics HTTP server; "0.0.0.0" in a container."""
    port: int = Field(default=9090, ge=0, le=65535)
    """Port of the metrics HTTP server (path /metrics)."""
    max_class_labels: int = Field(default=50, ge=0)
    """Models with more classes report predicted_class="other" (bounded cardinality)."""


class GaxSettings(BaseModel):
    """The Diagnose endpoint."""

    model_config = ConfigDict(extra="forbid")

    max_concurrent: int = Field(default=2, ge=1)
    """Diagnoses running at once; more get RESOURCE_EXHAUSTED at once."""
    max_steps_cap: int = Field(default=2000, ge=1)
    """Largest step cap a request may ask for."""
    default_target_co: float = 48.0
    """Target CO when the request gives none and no calibration is loaded (the paper's
    ImageNet choice); a calibration's GAX target wins."""
    max_snapshots: int = Field(default=200, ge=1)
    """Most heatmap snapshots streamed per diagnosis (snapshot_every is raised to fit)."""


class FeedbackSettings(BaseModel):
    """Receipts and label feedback: off unless key_file is set."""

    model_config = ConfigDict(extra="forbid")

    key_file: Path | None = None
    """Receipt keys, one `<key id> <secret>` per line (a mounted Secret, reread when it
    changes); the first signs, all verify. Every replica that should accept a receipt
    needs the same file. Secrets have at least 32 bytes (`openssl rand -base64 32`)."""
    max_age: timedelta = timedelta(days=7)
    """Receipts older than this are refused (seconds, or ISO 8601 such as "P7D")."""
    max_clock_skew: timedelta = timedelta(minutes=5)
    """Receipts issued up to this far in the future (clocks of replicas differ) count."""
    duplicate_filter_size: int = Field(default=100_000, ge=1)
    """Receipts remembered to count each label once (about 250 bytes each). When full,
    the oldest is forgotten and receipts issued before it are refused (never counted
    twice): raise it when labels come late and in volume."""
    max_items: int = Field(default=10_000, ge=1)
    """Most items in one FeedbackRequest (more: RESOURCE_EXHAUSTED)."""
    store: str = "memory"
    """Where counted receipts are remembered: "memory" (this process; a label sent to two
    replicas, or again after a restart, counts twice) or "redis://HOST:PORT/DB", shared by
    every replica and kept across restarts (SET NX with an expiry of max_age +
    max_clock_skew). When Redis cannot be reached, Feedback answers UNAVAILABLE."""

    @field_validator("store")
    @classmethod
    def _store(cls, value: str) -> str:
        if value != "memory" and not value.startswith(("redis://", "rediss://")):
            raise ValueError('must be "memory" or a redis:// URL')
        return value

    @field_validator("max_age", "max_clock_skew")
    @classmethod
    def _positive(cls, value: timedelta) -> timedelta:
        if value.total_seconds() <= 0:
            raise ValueError("must be positive")
        return value


class DriftSettings(BaseModel):
    """Label-free drift of calibrated verdicts against the calibration data."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = True
    """Export the axguard_drift_* gauges (needs a calibration)."""
    window: int = Field(default=1000, ge=10)
    """Most recent calibrated verdicts compared with the calibration (a fixed-size ring)."""
    min_items: int = Field(default=200, ge=10)
    """No PSI is exported before the window holds this many verdicts."""

    @model_validator(mode="after")
    def _fits(self) -> DriftSettings:
        if self.min_items > self.window:
            raise ValueError("drift.min_items must not exceed drift.window")
        return self


class Settings(BaseSettings):
    """Everything the server needs."""

    model_config = SettingsConfigDict(
        env_prefix="AXGUARD_", env_nested_delimiter="__", extra="forbid"
    )

    model: ModelSettings = Field(default_factory=ModelSettings)
    attribution: AttributionSettings = Field(default_factory=AttributionSettings)
    server: ServerSettings = Field(default_factory=ServerSettings)
    gax: GaxSettings = Field(default_factory=GaxSettings)
    batching: BatchingSettings = Field(default_factory=BatchingSettings)
    metrics: MetricsSettings = Field(default_factory=MetricsSettings)
    feedback: FeedbackSettings = Field(default_factory=FeedbackSettings)
    drift: DriftSettings = Field(default_factory=DriftSettings)
    calibration: str | None = None
    """Calibration artifact (JSON) for the verdict; the demo model uses its bundled one
    unless this is "none"."""
    calibration_poll_seconds: float = Field(default=5.0, ge=0)
    """How often the served calibration file is checked for a new version (renamed or
    symlinked into place, as a ConfigMap update does); a valid new one is served from the
    next batch on, an invalid one refused. 0: only on SIGHUP."""
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    """Log level."""
    log_json: bool | None = None
    """JSON log lines; default: when stderr is not a terminal."""


def plain_settings(settings: Settings, **sections: BaseModel) -> Settings:
    """A plain Settings (load_settings returns a local subclass, which does not pickle for
    a child process) with some sections replaced, built without reading the environment
    again."""
    return Settings.model_construct(**{
        **{name: getattr(settings, name) for name in Settings.model_fields}, **sections})


def load_settings(config_file: Path | None = None, **overrides: Any) -> Settings:
    """Return Settings from defaults, a YAML file, AXGUARD_* variables and `overrides`.

    Later sources win: YAML < environment < overrides (the CLI). Nested overrides are given
    as dicts, e.g. `model={"source": "torchvision:resnet34"}`, and merge into the rest.
    """
    yaml_file = Path(config_file) if config_file is not None else None
    if yaml_file is not None and not yaml_file.is_file():
        raise FileNotFoundError(f"config file {yaml_file} does not exist")

    class _Loaded(Settings):
        @classmethod
        def settings_customise_sources(
            cls,
            settings_cls: type[BaseSettings],
            init_settings: PydanticBaseSettingsSource,
            env_settings: PydanticBaseSettingsSource,
            dotenv_settings: PydanticBaseSettingsSource,
            file_secret_settings: PydanticBaseSettingsSource,
        ) -> tuple[PydanticBaseSettingsSource, ...]:
            sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
            if yaml_file is not None:
                sources.append(YamlConfigSettingsSource(settings_cls, yaml_file=yaml_file))
            return tuple(sources)

    return _Loaded(**overrides)
