"""The container stack in docker-compose.yml and deploy/: what it must hold, checked without a Docker engine."""

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from embedstream.config import load_settings

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILE = ROOT / "docker-compose.yml"
WORKER_CONFIG_TARGET = "/etc/embedstream/worker.toml"


@pytest.fixture(scope="module")
def compose():
    return yaml.safe_load(COMPOSE_FILE.read_text())


@pytest.fixture(scope="module")
def services(compose):
    return compose["services"]


def _gpu_devices(service):
    devices = service.get("deploy", {}).get("resources", {}).get("reservations", {}).get("devices", [])
    return [d for d in devices if d.get("driver") == "nvidia" and "gpu" in d.get("capabilities", [])]


def _tritons(services):
    return {name: s for name, s in services.items() if "tritonserver" in s.get("image", "")}


def _depends_on(service):
    deps = service.get("depends_on", {})
    return {name: {} for name in deps} if isinstance(deps, list) else deps


def _config_mount(service):
    """The host path of the file mounted at the worker's config path (short volume syntax)."""
    for volume in service.get("volumes", []):
        source, target, *_ = volume.split(":")
        if target == WORKER_CONFIG_TARGET:
            return ROOT / source
    raise AssertionError(f"nothing mounted at {WORKER_CONFIG_TARGET}")


def _dockerfile(services):
    build = services["worker-image"]["build"]
    return ROOT / build["context"] / build["dockerfile"]


def test_core_services_exist(services):
    assert {"kafka", "kafka-init", "triton", "worker-image"} <= set(services)


def test_kafka_is_apache_kafka_in_kraft_mode(services):
    kafka = services["kafka"]
    assert kafka["image"].startswith("apache/kafka:")
    env = kafka["environment"]
    assert "controller" in env["KAFKA_PROCESS_ROLES"].split(",")
    assert "broker" in env["KAFKA_PROCESS_ROLES"].split(",")
    assert env["KAFKA_ADVERTISED_LISTENERS"] == "PLAINTEXT://kafka:9092"
    assert env["KAFKA_OFFSETS_TOPIC_REPLICATION_FACTOR"] == 1
    assert "kafka-broker-api-versions.sh" in " ".join(kafka["healthcheck"]["test"])


def test_kafka_init_creates_the_worker_topics(services):
    settings = load_settings(_config_mount(services["worker-image"]))
    script = " ".join(services["kafka-init"]["command"])
    for topic in (settings.kafka.input_topic, settings.kafka.output_topic, settings.kafka.dead_letter_topic):
        assert re.search(rf"(^|\s){re.escape(topic)}:\d+", script), f"kafka-init does not create {topic}"
    assert _depends_on(services["kafka-init"])["kafka"]["condition"] == "service_healthy"


def test_gpu_triton_is_stock_image_with_an_nvidia_gpu(services):
    triton = services["triton"]
    assert triton["image"].startswith("nvcr.io/nvidia/tritonserver:")
    assert "gpu" in triton["profiles"]
    assert len(_gpu_devices(triton)) == 1


def test_cpu_triton_variant_has_no_gpu_reservation(services):
    cpu = [s for s in _tritons(services).values() if "cpu" in s.get("profiles", [])]
    assert cpu, "no Triton service in the cpu profile"
    for service in cpu:
        assert not _gpu_devices(service)
        assert "triton" in service["networks"]["default"]["aliases"]


def test_profiles_do_not_overlap_on_triton(services):
    for profile in ("gpu", "cpu"):
        active = [name for name, s in _tritons(services).items() if profile in s.get("profiles", [])]
        assert len(active) == 1, f"profile {profile} runs {active}"


def test_tritons_serve_the_models_volume_and_report_readiness(services, compose):
    assert "models" in compose["volumes"]
    for name, triton in _tritons(services).items():
        assert "models:/models:ro" in triton["volumes"], name
        assert "--model-repository=/models" in triton["command"], name
        assert "/v2/health/ready" in " ".join(triton["healthcheck"]["test"]), name
        deps = _depends_on(triton)
        exporters = [d for d, c in deps.items() if c.get("condition") == "service_completed_successfully"]
        assert exporters, f"{name} does not wait for a model export"
        for exporter in exporters:
            command = services[exporter]["command"]
            assert command[0] == "export-models"
            assert command[command.index("--repo") + 1] == "/models"
            assert "models:/models" in services[exporter]["volumes"]


def test_exporter_kind_matches_its_triton(services):
    for triton in _tritons(services).values():
        kind = "gpu" if _gpu_devices(triton) else "cpu"
        for exporter in _depends_on(triton):
            command = services[exporter]["command"]
            assert command[command.index("--kind") + 1] == kind
            assert command[command.index("--backend") + 1] == "pytorch"


def test_worker_is_built_from_the_dockerfile_and_waits_for_its_dependencies(services):
    worker = services["worker-image"]
    assert worker["build"]["dockerfile"] == "deploy/Dockerfile"
    assert _dockerfile(services).is_file()
    deps = _depends_on(worker)
    assert deps["kafka"]["condition"] == "service_healthy"
    assert deps["kafka-init"]["condition"] == "service_completed_successfully"
    for name in _tritons(services):
        assert deps[name]["condition"] == "service_healthy"
    assert "8080" in [str(p) for p in worker.get("expose", [])]
    assert worker["healthcheck"]["test"]


def test_worker_config_exists_loads_and_points_at_the_stack(services):
    path = _config_mount(services["worker-image"])
    assert path.is_file(), path
    settings = load_settings(path)
    assert settings.kafka.bootstrap_servers == "kafka:9092"
    assert settings.triton.url == "triton:8001" and settings.triton.protocol == "grpc"
    assert settings.health_port == 8080
    assert _config_mount(services["model-export"]) == path


def test_dockerfile_runs_as_non_root_with_a_healthcheck(services):
    lines = [ln.strip() for ln in _dockerfile(services).read_text().splitlines()]
    users = [ln.split(None, 1)[1] for ln in lines if ln.startswith("USER ")]
    assert users, "no USER line"
    user = users[-1].split(":")[0]
    assert user not in ("root", "0")
    healthcheck = [ln for ln in lines if ln.startswith("HEALTHCHECK")]
    assert healthcheck and "NONE" not in healthcheck[0]
    assert 'ENTRYPOINT ["embedstream"]' in lines


def _compose_plugin():
    docker = shutil.which("docker")
    if docker is None:
        pytest.skip("docker is not on PATH")
    probe = subprocess.run([docker, "compose", "version"], capture_output=True, text=True, timeout=60)
    if probe.returncode != 0:
        pytest.skip(f"the docker compose plugin is not installed: {(probe.stderr or probe.stdout).strip()}")
    return docker


@pytest.mark.parametrize("profile", [None, "gpu", "cpu"])
def test_docker_compose_config_is_valid(profile):
    docker = _compose_plugin()
    args = [docker, "compose", "-f", str(COMPOSE_FILE)]
    if profile:
        args += ["--profile", profile]
    result = subprocess.run([*args, "config", "-q"], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert result.returncode == 0, result.stderr
