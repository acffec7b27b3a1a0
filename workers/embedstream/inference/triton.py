"""Inference on a Triton server over gRPC or HTTP; the encoder spec read from, and checked against, the served model."""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from embedstream import metrics
from embedstream.config import EncoderSettings, TritonSettings
from embedstream.encoders import EncoderSpec
from embedstream.errors import BackendError, ModelMismatchError
from embedstream.inference.shm import InputRegion, fixed_input_bytes
from embedstream.lineage import UNKNOWN, pin_problems
from embedstream.modalities import served_problems

log = logging.getLogger(__name__)

_RETRIABLE_GRPC = {"StatusCode.UNAVAILABLE", "StatusCode.DEADLINE_EXCEEDED", "StatusCode.RESOURCE_EXHAUSTED"}
NUMPY_DTYPE = {"UINT8": np.uint8, "INT32": np.int32, "INT64": np.int64, "FP32": np.float32, "BOOL": np.bool_}
# The Triton config parameter in which ``embedstream export-models`` stores the encoder spec.
SPEC_PARAMETER = "embedstream.spec"


def shared_memory_bytes(settings: TritonSettings, spec: EncoderSpec) -> int | None:
    """Bytes of an inference thread's input region when inputs go through system shared memory, else None.

    They do when it is not switched off, the server is on this host and every input is fixed-size.
    """
    host = settings.url.rsplit(":", 1)[0]
    if settings.shared_memory != "auto" or host not in ("127.0.0.1", "localhost"):
        return None
    return fixed_input_bytes(
        [t.dims for t in spec.inputs],
        [np.dtype(NUMPY_DTYPE[t.dtype]).itemsize for t in spec.inputs],
        spec.max_batch_size,
    )


def spec_from_config(config: dict[str, Any], model: str, url: str) -> EncoderSpec:
    """The encoder spec a served model's config carries (its ``embedstream.spec`` parameter).

    A model without one was not exported by ``embedstream export-models``: the worker cannot know its
    inputs, preprocessing or outputs, and refuses it rather than guess.
    """
    raw = _spec_parameter(config)
    fix = "export the model with `embedstream export-models`, which writes the spec into its config.pbtxt"
    if not raw:
        raise ModelMismatchError(
            f"Triton model {model!r} at {url} has no {SPEC_PARAMETER!r} parameter in its config, where the "
            f"worker reads its encoder spec from: {fix}"
        )
    try:
        spec = EncoderSpec.from_json(raw)
    except (ValueError, TypeError, KeyError, AttributeError) as exc:
        raise ModelMismatchError(
            f"Triton model {model!r} at {url}: its {SPEC_PARAMETER!r} parameter is no encoder spec ({exc}): {fix}"
        ) from exc
    if spec.name != model:
        raise ModelMismatchError(f"Triton model {model!r} at {url} carries the spec of {spec.name!r}: {fix}")
    return spec


def _spec_parameter(config: dict[str, Any]) -> str | None:
    raw = config.get("parameters", {}).get(SPEC_PARAMETER, {}).get("string_value")
    return str(raw) if raw else None


def _lineage(spec: EncoderSpec) -> tuple[Any, ...]:
    """What a re-read of the served spec must repeat: a reload in between means another model."""
    return spec.preprocessing, spec.version, spec.weights_sha256, spec.preprocessing_sha256


def _client_module(protocol: str) -> Any:
    if protocol == "grpc":
        import tritonclient.grpc as tc
    else:
        import tritonclient.http as tc
    return tc


def _wait_model_ready(
    client: Any, model: str, url: str, timeout_s: float, sleep: Callable[[float], None] = time.sleep
) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if client.is_model_ready(model):
                return
        except Exception as exc:  # connection refused and friends: the server is not up yet
            log.debug("triton not ready: %s", exc)
        if time.monotonic() > deadline:
            raise BackendError(f"model {model!r} not ready on {url} after {timeout_s:.0f}s", retriable=True)
        sleep(0.5)


def _model_config(client: Any, protocol: str, model: str) -> dict[str, Any]:
    if protocol == "grpc":
        config: dict[str, Any] = client.get_model_config(model, as_json=True)["config"]
        return config
    return dict(client.get_model_config(model))


class TritonBackend:
    def __init__(
        self,
        settings: TritonSettings,
        spec: EncoderSpec,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.spec = spec
        self._settings = settings
        self._sleep = sleep
        self._tc: Any = _client_module(settings.protocol)
        # The HTTP client runs on gevent and must not be shared between threads; the worker calls
        # infer from several, so each thread gets its own client (gRPC's is thread-safe, but one
        # rule for both keeps this simple).
        self._local = threading.local()
        self._clients: list[Any] = []
        self._regions: list[InputRegion] = []
        self._clients_lock = threading.Lock()
        self._shm_bytes = shared_memory_bytes(settings, spec)

    @property
    def _client(self) -> Any:
        client = getattr(self._local, "client", None)
        if client is None:
            client = self._new_client()
            self._local.client = client
            with self._clients_lock:
                self._clients.append(client)
        return client

    def _new_client(self) -> Any:
        return _make_client(self._tc, self._settings)

    def _adopt(self, client: Any) -> None:
        """Make ``client`` this thread's, instead of building another."""
        self._local.client = client
        with self._clients_lock:
            self._clients.append(client)

    # -- start-up -----------------------------------------------------------------------------------

    @classmethod
    def for_served_model(
        cls,
        settings: TritonSettings,
        model: str,
        ready_timeout_s: float,
        sleep: Callable[[float], None] = time.sleep,
    ) -> TritonBackend:
        """A backend for the model Triton serves as ``model``, its spec read from the served config.

        Waits until the model is ready. The worker needs nothing from the network library this way:
        the exporter computed the spec and stored it with the model (see :func:`spec_from_config`).
        """
        client = _make_client(_client_module(settings.protocol), settings)
        try:
            _wait_model_ready(client, model, settings.url, ready_timeout_s, sleep)
            spec = spec_from_config(_model_config(client, settings.protocol, model), model, settings.url)
        except BaseException:
            client.close()
            raise
        backend = cls(settings, spec, sleep)
        backend._adopt(client)
        return backend

    def wait_ready(self, timeout_s: float) -> None:
        _wait_model_ready(self._client, self.spec.name, self._settings.url, timeout_s, self._sleep)

    @property
    def shared_memory_regions(self) -> int:
        """Regions registered with the server now (one per inference thread while inputs go that way)."""
        with self._clients_lock:
            return len(self._regions)

    def connect(self) -> None:
        """This thread's client and shared-memory region, made now rather than on its first batch.

        A gRPC client costs ~0.1 s to build (channel and stub set-up) and a region a registration
        round trip; on a worker's first batches that showed as a latency spike and a slow start.
        """
        self._client  # noqa: B018 (the property builds and keeps the thread's client)
        self._region()

    def ready(self) -> bool:
        try:
            return bool(self._client.is_model_ready(self.spec.name))
        except Exception:  # refused, reset, timed out: not ready
            return False

    def served_config(self) -> dict[str, Any]:
        return _model_config(self._client, self._settings.protocol, self.spec.name)

    def served_spec(self) -> EncoderSpec:
        """The spec the served model's config carries; ModelMismatchError where it carries none."""
        return spec_from_config(self.served_config(), self.spec.name, self._settings.url)

    def verify(self, batch_size: int, encoder: EncoderSettings | None = None) -> None:
        """Compare the served model's config with the spec; raise ModelMismatchError on any difference.

        With the worker's ``encoder`` settings, the spec's family and version must also be theirs: a
        spec read from the server is the served model's own, and the settings say which model is wanted.
        So must its fingerprints where the settings pin them, and the modality's own preprocessing here
        must be the exported one, e.g. a text model's tokenizer file (docs/lineage.md). The served
        fingerprints are logged either way.
        """
        cfg = self.served_config()
        problems: list[str] = []
        if encoder is not None:
            if self.spec.family != encoder.family:
                problems.append(f"family {self.spec.family!r} is served, encoder.family is {encoder.family!r}")
            if self.spec.version != encoder.version:
                problems.append(f"version {self.spec.version!r} is served, encoder.version is {encoder.version!r}")
            problems += pin_problems(self.spec, encoder.weights_fingerprint, encoder.preprocessing_fingerprint)
            problems += served_problems(self.spec, encoder)
        max_batch = int(cfg.get("max_batch_size", 0))
        if max_batch < batch_size:
            problems.append(f"max_batch_size {max_batch} < worker batch size {batch_size}")
        served_in = {t["name"]: t for t in cfg.get("input", [])}
        served_out = {t["name"]: t for t in cfg.get("output", [])}
        for want, served, kind in [(self.spec.inputs, served_in, "input"), (self.spec.outputs, served_out, "output")]:
            for t in want:
                got = served.get(t.name)
                if got is None:
                    problems.append(f"{kind} {t.name!r} missing (served: {sorted(served)})")
                    continue
                dims = tuple(int(d) for d in got.get("dims", []))
                if got.get("data_type") != f"TYPE_{t.dtype}" or dims != t.dims:
                    served_as = f"{got.get('data_type')}{list(dims)}"
                    problems.append(f"{kind} {t.name!r} is {served_as}, expected TYPE_{t.dtype}{list(t.dims)}")
        raw_spec = _spec_parameter(cfg)
        if raw_spec:
            theirs = EncoderSpec.from_json(raw_spec)
            if _lineage(theirs) != _lineage(self.spec):
                problems.append(f"served spec differs: {theirs} != {self.spec}")
        if problems:
            raise ModelMismatchError(
                f"Triton model {self.spec.name!r} at {self._settings.url} does not match the worker's "
                "encoder spec:\n  " + "\n  ".join(problems)
            )
        self._log_lineage()

    def _log_lineage(self) -> None:
        spec = self.spec
        if spec.weights_sha256 and spec.preprocessing_sha256:
            log.info(
                "serving %s:%s, weights %s, preprocessing %s",
                spec.name,
                spec.version,
                spec.weights_sha256,
                spec.preprocessing_sha256,
            )
        else:
            # Accepted (outputs say 'unknown'), so an upgrade does not stop workers on older exports.
            log.warning(
                "Triton model %s:%s carries no weights/preprocessing fingerprints (exported before them): its "
                "outputs say %r; export it again with `embedstream export-models` to tell deployments apart",
                spec.name,
                spec.version,
                UNKNOWN,
            )

    # -- inference ----------------------------------------------------------------------------------

    def infer(self, inputs: tuple[np.ndarray, ...]) -> dict[str, np.ndarray]:
        attempt = 0
        while True:
            try:
                return self._infer_once(inputs)
            except BackendError as exc:
                metrics.BACKEND_ERRORS.labels(self.spec.name, str(exc.retriable).lower()).inc()
                if not exc.retriable or attempt >= self._settings.max_retries:
                    raise
                metrics.BACKEND_RETRIES.labels(self.spec.name).inc()
                delay = self._settings.retry_backoff_s * (2**attempt) * (0.5 + random.random())
                log.warning("triton inference failed (%s); retry %d in %.2fs", exc, attempt + 1, delay)
                self._sleep(delay)
                attempt += 1

    def _region(self) -> InputRegion | None:
        """This thread's shared-memory region, made on first use; None when it is off or refused."""
        if self._shm_bytes is None:
            return None
        region = getattr(self._local, "region", None)
        if region is None:
            try:
                region = InputRegion(self._client, self._shm_bytes)
            except Exception as exc:
                log.warning("Triton refused a shared-memory region (%s): sending inputs on the wire", exc)
                self._shm_bytes = None
                return None
            self._local.region = region
            with self._clients_lock:
                self._regions.append(region)
        return region

    def _drop_region(self, region: InputRegion) -> None:
        self._local.region = None
        with self._clients_lock:
            if region in self._regions:
                self._regions.remove(region)
        region.close()

    def _infer_once(self, inputs: tuple[np.ndarray, ...]) -> dict[str, np.ndarray]:
        tc = self._tc
        arrays = [
            np.ascontiguousarray(arr, dtype=NUMPY_DTYPE[spec.dtype])
            for spec, arr in zip(self.spec.inputs, inputs, strict=True)
        ]
        req = [
            tc.InferInput(spec.name, list(arr.shape), spec.dtype)
            for spec, arr in zip(self.spec.inputs, arrays, strict=True)
        ]
        region = self._region()
        if region is not None:
            for inp, (offset, size) in zip(req, region.write(arrays), strict=True):
                inp.set_shared_memory(region.name, size, offset)
        else:
            for inp, arr in zip(req, arrays, strict=True):
                inp.set_data_from_numpy(arr)
        kwargs: dict[str, Any] = {}
        if self._settings.protocol == "grpc":
            kwargs["client_timeout"] = self._settings.request_timeout_s
        try:
            result = self._client.infer(
                self.spec.name, req, outputs=[tc.InferRequestedOutput(o.name) for o in self.spec.outputs], **kwargs
            )
        except Exception as exc:
            if region is not None and "shared memory" in str(exc).lower():
                # A restarted server forgot our region: make a new one on the retry.
                self._drop_region(region)
                raise BackendError(f"shared-memory region lost: {exc}", retriable=True) from exc
            raise _classify(exc) from exc
        outputs: dict[str, np.ndarray] = {}
        for o in self.spec.outputs:
            arr = result.as_numpy(o.name)
            if arr is None or arr.shape[0] != inputs[0].shape[0]:
                raise BackendError(f"Triton returned no or wrong-sized {o.name!r}", retriable=False)
            outputs[o.name] = arr
        return outputs

    def close(self) -> None:
        with self._clients_lock:
            clients, self._clients = self._clients, []
            regions, self._regions = self._regions, []
        for region in regions:
            region.close()
        for client in clients:
            try:
                client.close()
            except Exception as exc:  # a client of a finished thread may already be gone
                log.debug("closing triton client: %s", exc)


def server_client(st: TritonSettings) -> Any:
    """A client of the server itself (health, the model repository API), for the settings' protocol."""
    return _make_client(_client_module(st.protocol), st)


def _make_client(tc: Any, st: TritonSettings) -> Any:
    if st.protocol == "grpc":
        certs = str(st.root_certificates) if st.root_certificates else None
        return tc.InferenceServerClient(st.url, ssl=st.ssl, root_certificates=certs)
    return tc.InferenceServerClient(
        st.url, ssl=st.ssl, connection_timeout=st.request_timeout_s, network_timeout=st.request_timeout_s
    )


def _classify(exc: Exception) -> BackendError:
    from tritonclient.utils import InferenceServerException

    if isinstance(exc, InferenceServerException):
        status = str(exc.status() or "")
        msg = exc.message() or str(exc)
        unavailable = "unavailable" in msg.lower() or "not ready" in msg.lower() or "unknown model" in msg.lower()
        retriable = status in _RETRIABLE_GRPC or status.startswith("5") or status == "" or unavailable
        return BackendError(f"{status or 'error'}: {msg}", retriable=retriable)
    # Socket-level failures (refused, reset, timed out) mean the server is away, not the input bad.
    return BackendError(f"{type(exc).__name__}: {exc}", retriable=True)
