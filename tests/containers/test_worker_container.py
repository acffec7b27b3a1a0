"""The container smoke: build the worker image, run one worker container against the embedded stack.

The stack (Tansu broker, CPU Triton) runs as processes on 127.0.0.1; the worker runs in its image on the
host's network, configured by environment variables only, as a container platform would run it. Skips,
saying why, where podman is not installed.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator

import pytest

from embedstream.config import load_settings
from embedstream.local.samples.generated import samples
from embedstream.local.stack.process import free_port
from embedstream.local.stack.stack import LocalStack

from ..integration.helpers import accounting, private_topics, produce, read_until_complete
from .compose import ROOT, TAG, container_env, http_ok, podman, wait_until
from .conftest import skip_or_fail

pytestmark = [pytest.mark.slow]

IMAGE = f"embedstream-worker:{TAG}"


@pytest.fixture(scope="module")
def worker_image() -> str:
    if podman() is None:
        skip_or_fail("podman is not installed: no container smoke (apt-get install podman runc; make compose-test)")
    started = time.monotonic()
    built = subprocess.run(
        [str(ROOT / "deploy/containers/build-images.sh"), "worker"],
        env=container_env(),
        capture_output=True,
        text=True,
        timeout=1800,
    )
    assert built.returncode == 0, built.stdout[-3000:] + built.stderr[-3000:]
    print(f"worker image built (or found in the layer cache) in {time.monotonic() - started:.0f} s")
    return IMAGE


@pytest.fixture(scope="module")
def embedded_stack(tmp_path_factory) -> Iterator[LocalStack]:
    settings = load_settings(encoder={"arch": "mobilenetv3_small_100", "weights": "random"})
    with LocalStack(settings, workdir=tmp_path_factory.mktemp("container-smoke")) as stack:
        yield stack


def test_worker_image_has_no_torch(worker_image):
    probe = subprocess.run(
        ["podman", "run", "--rm", "--entrypoint", "python", worker_image, "-c", "import torch"],
        env=container_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert probe.returncode != 0
    assert "No module named 'torch'" in probe.stderr


def test_one_worker_container_embeds_a_stream_from_the_embedded_stack(worker_image, embedded_stack, request, report):
    settings = private_topics(embedded_stack.settings, request.node.name, partitions=3)
    k, enc = settings.kafka, settings.encoder
    port = free_port()
    env = {
        "EMBEDSTREAM_KAFKA__BOOTSTRAP_SERVERS": k.bootstrap_servers,
        "EMBEDSTREAM_KAFKA__INPUT_TOPIC": k.input_topic,
        "EMBEDSTREAM_KAFKA__OUTPUT_TOPIC": k.output_topic,
        "EMBEDSTREAM_KAFKA__DEAD_LETTER_TOPIC": k.dead_letter_topic,
        "EMBEDSTREAM_KAFKA__GROUP_ID": k.group_id,
        "EMBEDSTREAM_KAFKA__SESSION_TIMEOUT_MS": "6000",
        "EMBEDSTREAM_KAFKA__HEARTBEAT_INTERVAL_MS": "1000",
        "EMBEDSTREAM_TRITON__URL": settings.triton.url,
        "EMBEDSTREAM_TRITON__SHARED_MEMORY": "off",
        "EMBEDSTREAM_ENCODER__FAMILY": enc.family,
        "EMBEDSTREAM_ENCODER__ARCH": enc.arch,
        "EMBEDSTREAM_ENCODER__WEIGHTS": str(enc.weights),
        "EMBEDSTREAM_HEALTH_HOST": "127.0.0.1",
        "EMBEDSTREAM_HEALTH_PORT": str(port),
    }
    name = f"embedstream-smoke-{port}"
    run = ["podman", "run", "-d", "--rm", "--name", name, "--network", "host"]
    run += [a for key, value in env.items() for a in ("-e", f"{key}={value}")]
    started = time.monotonic()
    subprocess.run([*run, worker_image, "worker"], env=container_env(), check=True, capture_output=True, timeout=120)
    try:
        joined_s = wait_until("the worker container's /readyz", lambda: http_ok(f"http://127.0.0.1:{port}/readyz"), 120)
        batch = list(samples(24, bad_every=6, prefix="smoke"))
        produce(k.bootstrap_servers, k.input_topic, [(s.key, s.value) for s in batch])
        counts = accounting([s.key for s in batch], read_until_complete(settings, [s.key for s in batch], 120))
        report(
            modality="image",
            **counts,
            joined_group_s=round(joined_s, 1),
            run_to_done_s=round(time.monotonic() - started, 1),
        )
        assert counts["missing"] == 0 and counts["dead_lettered"] == 4, counts
    finally:
        stopped = subprocess.run(
            ["podman", "stop", "-t", "30", name], env=container_env(), capture_output=True, text=True, timeout=90
        )
    assert stopped.returncode == 0, stopped.stderr
