"""The compose stack as a user starts it: docker-compose.yml + docker-compose.cpu.yml under podman-compose.

Every service shares the host's network on 127.0.0.1 (docker-compose.cpu.yml); each stack takes free
ports of its own, passed to compose as the variables that file reads, and a project name of its own, so
its containers and volumes are apart from any other stack's. Tests reach the broker, Triton and each
service's /readyz from outside the containers, on those ports.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

from embedstream.config import KafkaSettings, Settings, load_settings
from embedstream.local.stack.process import free_port, port_open
from embedstream.local.stack.storage import admin_ports

ROOT = Path(__file__).resolve().parents[2]
FILES = ("docker-compose.yml", "docker-compose.cpu.yml")
CONTAINERS_CONF = ROOT / "deploy" / "containers" / "containers.conf"
IMAGES = ("worker", "sink", "exporter", "triton-cpu", "broker", "prometheus")
TAG = "0.1.0"

# The ports docker-compose.cpu.yml reads from the environment.
PORTS = (
    "KAFKA_PORT",
    "S3_PORT",
    "S3_GRPC_PORT",
    "S3_MASTER_PORT",
    "S3_MASTER_GRPC_PORT",
    "S3_VOLUME_PORT",
    "S3_VOLUME_GRPC_PORT",
    "S3_FILER_PORT",
    "S3_FILER_GRPC_PORT",
    "TRITON_HTTP_PORT",
    "TRITON_GRPC_PORT",
    "TRITON_METRICS_PORT",
    "WORKER_IMAGE_PORT",
    "WORKER_TEXT_PORT",
    "WORKER_TIMESERIES_PORT",
    "SINK_LANCEDB_PORT",
    "SINK_FEAST_PORT",
    "PROMETHEUS_PORT",
)
WORKERS = ("worker-image", "worker-text", "worker-timeseries")
SINKS = ("sink-lancedb", "sink-feast")
# One-shot services, in the order their dependencies run them.
JOBS = (
    "kafka-init",
    "train-timeseries",
    "model-export-image-cpu",
    "model-export-text-cpu",
    "model-export-timeseries-cpu",
    "feast-init",
)


def podman() -> str | None:
    return shutil.which("podman")


def compose_command() -> list[str]:
    beside = Path(sys.executable).parent / "podman-compose"
    return [str(beside)] if beside.exists() else [sys.executable, "-m", "podman_compose"]


def has_podman_compose() -> bool:
    try:
        import podman_compose  # noqa: F401
    except ImportError:
        return False
    return True


def container_env() -> dict[str, str]:
    return {**os.environ, "CONTAINERS_CONF": str(CONTAINERS_CONF)}


def missing_images() -> list[str]:
    """Images of the stack that are not built here (make images builds them)."""
    env = container_env()
    return [
        name
        for name in IMAGES
        if subprocess.run(
            ["podman", "image", "exists", f"embedstream-{name}:{TAG}"], env=env, capture_output=True, timeout=60
        ).returncode
        != 0
    ]


def wait_until(what: str, cond: Callable[[], bool], timeout_s: float, tick_s: float = 0.25) -> float:
    """Seconds until ``cond()`` held; raise TimeoutError naming ``what`` otherwise."""
    started = time.monotonic()
    while time.monotonic() - started < timeout_s:
        try:
            if cond():
                return time.monotonic() - started
        except Exception:  # not answering yet
            pass
        time.sleep(tick_s)
    raise TimeoutError(f"{what} not within {timeout_s:.0f} s")


def http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as resp:
            return resp.status == 200
    except OSError:
        return False


class ComposeStack:
    def __init__(self, project: str) -> None:
        self.project = project
        self.ports = {name: free_port() for name in PORTS}
        self.ports["S3_ADMIN_PORT"], self.ports["S3_ADMIN_GRPC_PORT"] = (
            admin_ports()
        )  # the S3 server in the broker image is weed mini too
        self.env = {
            **container_env(),
            **{f"EMBEDSTREAM_{name}": str(port) for name, port in self.ports.items()},
        }
        self.bootstrap = f"127.0.0.1:{self.ports['KAFKA_PORT']}"

    # -- compose and podman ------------------------------------------------------------------------

    def compose(self, *args: str, timeout_s: float = 900, check: bool = True) -> subprocess.CompletedProcess[str]:
        files = [a for f in FILES for a in ("-f", str(ROOT / f))]
        argv = [*compose_command(), "-p", self.project, *files, "--profile", "cpu", *args]
        done = subprocess.run(argv, env=self.env, cwd=ROOT, capture_output=True, text=True, timeout=timeout_s)
        if check and done.returncode != 0:
            raise RuntimeError(
                f"{' '.join(args)} exited {done.returncode}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
            )
        return done

    def podman(self, *args: str, timeout_s: float = 120, check: bool = True) -> subprocess.CompletedProcess[str]:
        done = subprocess.run(["podman", *args], env=self.env, capture_output=True, text=True, timeout=timeout_s)
        if check and done.returncode != 0:
            raise RuntimeError(f"podman {' '.join(args)} exited {done.returncode}: {done.stderr[-2000:]}")
        return done

    def container(self, service: str) -> str:
        return f"{self.project}_{service}_1"

    def state(self, service: str) -> str:
        done = self.podman("inspect", "--format", "{{.State.Status}} {{.State.ExitCode}}", self.container(service))
        return done.stdout.strip()

    def logs(self, service: str, lines: int = 40) -> str:
        done = self.podman("logs", "--tail", str(lines), self.container(service), check=False)
        return done.stdout + done.stderr

    def volume_dir(self, volume: str) -> Path:
        done = self.podman("volume", "inspect", "--format", "{{.Mountpoint}}", f"{self.project}_{volume}")
        return Path(done.stdout.strip())

    # -- readiness, seen from outside the containers ------------------------------------------------

    def health_url(self, service: str) -> str:
        port = self.ports[service.upper().replace("-", "_") + "_PORT"]
        return f"http://127.0.0.1:{port}/readyz"

    def ready(self, service: str) -> bool:
        if service == "kafka":
            from embedstream.kafka_io import make_admin

            if not port_open(self.ports["KAFKA_PORT"]):
                return False
            admin = make_admin(KafkaSettings(bootstrap_servers=self.bootstrap), request_timeout_ms=2000)
            try:
                admin.list_topics()
                return True
            finally:
                admin.close()
        if service == "triton-cpu":
            return http_ok(f"http://127.0.0.1:{self.ports['TRITON_HTTP_PORT']}/v2/health/ready")
        if service == "prometheus":
            return http_ok(f"http://127.0.0.1:{self.ports['PROMETHEUS_PORT']}/-/ready")
        return http_ok(self.health_url(service))

    def wait_ready(self, service: str, timeout_s: float = 300) -> float:
        try:
            return wait_until(f"{service} ready", lambda: self.ready(service), timeout_s)
        except TimeoutError as exc:
            raise TimeoutError(f"{exc}; its log:\n{self.logs(service)}") from None

    def wait_exited(self, service: str, timeout_s: float = 900) -> None:
        wait_until(f"{service} finished", lambda: self.state(service).startswith("exited"), timeout_s, 1.0)
        assert self.state(service) == "exited 0", f"{service}: {self.state(service)}\n{self.logs(service)}"

    # -- the stack ----------------------------------------------------------------------------------

    def up(self) -> dict[str, float]:
        """Start every service of the cpu profile, stage by stage; returns seconds from the start to each one ready.

        The stages follow docker-compose.yml's depends_on. They are run here, each service started with
        ``--no-deps`` and waited for from outside, because podman-compose under podman < 4.6 cannot wait for
        health (it says so and starts the next service at once), and the ``--requires`` links it otherwise
        gives every container fail to start on podman 4.3 ("generating dependency graph ... no such
        container") and would start the one-shot jobs again with every restarted worker.
        """
        started = time.monotonic()
        ready: dict[str, float] = {}

        def mark(service: str) -> None:
            ready[service] = round(time.monotonic() - started, 1)

        self.start("s3")
        wait_until("the S3 server's port", lambda: port_open(self.ports["S3_PORT"]), 60)
        self.start("kafka")
        self.wait_ready("kafka")
        mark("kafka")
        self.start("kafka-init", "train-timeseries", "feast-init", "model-export-image-cpu", "model-export-text-cpu")
        self.wait_exited("train-timeseries")
        self.start("model-export-timeseries-cpu")
        for job in JOBS:
            self.wait_exited(job)
            mark(job)
        self.start("triton-cpu")
        self.wait_ready("triton-cpu")
        mark("triton-cpu")
        self.start(*WORKERS, *SINKS, "prometheus")
        for service in (*WORKERS, *SINKS, "prometheus"):
            self.wait_ready(service)
            mark(service)
        return ready

    def start(self, *services: str) -> None:
        self.compose("up", "-d", "--no-deps", *services)

    def down(self) -> None:
        self.compose("down", "-v", "-t", "10", check=False, timeout_s=300)

    def worker_settings(self, modality: str) -> Settings:
        """The worker's config file as it runs in the container: its topics, the broker as seen from here."""
        settings = load_settings(ROOT / "deploy" / "config" / f"worker.{modality}.toml")
        data = settings.model_dump()
        data["kafka"]["bootstrap_servers"] = self.bootstrap
        data["encoder"]["weights"] = None
        return Settings(**data)
