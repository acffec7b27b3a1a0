"""deploy/k8s: kustomize base and overlays, checked without a cluster.

The overlays are rendered by a small kustomize subset below (resources, nameSuffix, labels, configMapGenerator,
patches, images, namespace), so every check runs where no kustomize binary exists; where ``kubectl`` exists,
one test renders them with ``kubectl kustomize`` too and requires the same objects. Core objects are
schema-checked with kubernetes-validate (the Kubernetes OpenAPI schemas, strict: unknown fields fail); KEDA's
custom resources have no schema there and get structural checks.
"""

from __future__ import annotations

import copy
import hashlib
import json
import re
import shutil
import subprocess
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from embedstream.config import load_settings

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
OVERLAYS = ("cpu", "gpu")
K8S_VERSION = "1.30"
CORE_KINDS = {"Deployment", "Service", "ConfigMap", "Secret", "PodDisruptionBudget", "Namespace"}
GPU = "nvidia.com/gpu"
WORKER_CONFIG = "/etc/embedstream/worker.toml"


# --- a kustomize subset -------------------------------------------------------------------------------------


def _load_docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def _smp(base, patch):
    """Strategic merge: maps merge, null deletes, lists of named maps merge by name, other lists replace."""
    if isinstance(base, dict) and isinstance(patch, dict):
        out = dict(base)
        for key, value in patch.items():
            if value is None:
                out.pop(key, None)
            elif key in out:
                out[key] = _smp(out[key], value)
            else:
                out[key] = copy.deepcopy(value)
        return out
    if isinstance(base, list) and isinstance(patch, list) and all(isinstance(x, dict) and "name" in x for x in patch):
        out = list(base)
        for item in patch:
            idx = next((i for i, b in enumerate(out) if isinstance(b, dict) and b.get("name") == item["name"]), None)
            if idx is None:
                out.append(copy.deepcopy(item))
            else:
                out[idx] = _smp(out[idx], item)
        return out
    return copy.deepcopy(patch)


def _json_patch(doc: dict, ops: list[dict]) -> dict:
    doc = copy.deepcopy(doc)
    for op in ops:
        assert op["op"] in ("replace", "add"), op
        parts = [p.replace("~1", "/").replace("~0", "~") for p in op["path"].lstrip("/").split("/")]
        node = doc
        for p in parts[:-1]:
            node = node[int(p)] if isinstance(node, list) else node[p]
        last = parts[-1]
        if isinstance(node, list) and op["op"] == "add":  # RFC 6902: insert before the index, "-" appends
            node.insert(len(node) if last == "-" else int(last), copy.deepcopy(op["value"]))
        elif isinstance(node, list):
            node[int(last)] = copy.deepcopy(op["value"])
        else:
            node[last] = copy.deepcopy(op["value"])
    return doc


def _pod_spec(doc: dict) -> dict | None:
    return doc.get("spec", {}).get("template", {}).get("spec") if doc["kind"] == "Deployment" else None


def _containers(doc: dict) -> list[dict]:
    spec = _pod_spec(doc) or {}
    return spec.get("initContainers", []) + spec.get("containers", [])


def references(doc: dict):
    """(kind referred to, the dict holding the name, the name's key, key in the referred object or None)."""
    spec = _pod_spec(doc)
    if spec is not None:
        for vol in spec.get("volumes", []):
            if "configMap" in vol:
                for item in vol["configMap"].get("items", []) or [None]:
                    yield "ConfigMap", vol["configMap"], "name", item and item["key"]
            if "secret" in vol:
                for item in vol["secret"].get("items", []) or [None]:
                    yield "Secret", vol["secret"], "secretName", item and item["key"]
        for c in _containers(doc):
            for src in c.get("envFrom", []):
                if "configMapRef" in src:
                    yield "ConfigMap", src["configMapRef"], "name", None
                if "secretRef" in src:
                    yield "Secret", src["secretRef"], "name", None
            for env in c.get("env", []):
                ref = env.get("valueFrom", {})
                if "configMapKeyRef" in ref:
                    yield "ConfigMap", ref["configMapKeyRef"], "name", ref["configMapKeyRef"]["key"]
                if "secretKeyRef" in ref:
                    yield "Secret", ref["secretKeyRef"], "name", ref["secretKeyRef"]["key"]
    if doc["kind"] == "ScaledObject":
        yield "Deployment", doc["spec"]["scaleTargetRef"], "name", None
        for trigger in doc["spec"]["triggers"]:
            if "authenticationRef" in trigger:
                yield "TriggerAuthentication", trigger["authenticationRef"], "name", None
    if doc["kind"] == "TriggerAuthentication":
        for ref in doc["spec"].get("secretTargetRef", []):
            yield "Secret", ref, "name", ref["key"]


def _rename(docs: list[dict], renames: dict[tuple[str, str], str]) -> None:
    for doc in docs:
        key = (doc["kind"], doc["metadata"]["name"])
        if key in renames:
            doc["metadata"]["name"] = renames[key]
        for kind, holder, field, _ in references(doc):
            holder[field] = renames.get((kind, holder[field]), holder[field])


def _add_labels(doc: dict, pairs: dict[str, str], selectors: bool) -> None:
    doc["metadata"].setdefault("labels", {}).update(pairs)
    if not selectors:
        return
    spec = doc.get("spec", {})
    if doc["kind"] == "Service":
        spec.setdefault("selector", {}).update(pairs)
    elif doc["kind"] in ("Deployment", "PodDisruptionBudget"):
        spec["selector"].setdefault("matchLabels", {}).update(pairs)
        if doc["kind"] == "Deployment":
            spec["template"]["metadata"].setdefault("labels", {}).update(pairs)


def _generate(root: Path, gen: dict) -> dict:
    data = {}
    for f in gen.get("files", []):
        name, _, path = f.rpartition("=") if "=" in f else (Path(f).name, "", f)
        data[name or Path(path).name] = (root / path).read_text()
    for lit in gen.get("literals", []):
        k, _, v = lit.partition("=")
        data[k] = v
    return data


def _build(root: Path) -> list[dict]:
    k = yaml.safe_load((root / "kustomization.yaml").read_text())
    docs: list[dict] = []
    for res in k.get("resources", []):
        path = root / res
        docs += _build(path) if path.is_dir() else _load_docs(path)
    for gen in k.get("configMapGenerator", []):
        data = _generate(root, gen)
        if gen.get("behavior") in ("merge", "replace"):
            target = next(d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"] == gen["name"])
            target["data"] = {**target["data"], **data} if gen["behavior"] == "merge" else data
        else:
            meta = {"name": gen["name"], "annotations": {"test.k8s/generated": "true"}}
            docs.append({"apiVersion": "v1", "kind": "ConfigMap", "metadata": meta, "data": data})
    for p in k.get("patches", []):
        patch = yaml.safe_load((root / p["path"]).read_text()) if "path" in p else yaml.safe_load(p["patch"])
        target = p.get("target") or {"kind": patch["kind"], "name": patch["metadata"]["name"]}
        for i, doc in enumerate(docs):
            if doc["kind"] == target["kind"] and doc["metadata"]["name"] == target["name"]:
                docs[i] = _json_patch(doc, patch) if isinstance(patch, list) else _smp(doc, patch)
    suffix, prefix = k.get("nameSuffix", ""), k.get("namePrefix", "")
    if suffix or prefix:
        _rename(docs, {(d["kind"], d["metadata"]["name"]): prefix + d["metadata"]["name"] + suffix for d in docs})
    for entry in k.get("labels", []):
        for doc in docs:
            _add_labels(doc, entry["pairs"], entry.get("includeSelectors", False))
    for image in k.get("images", []):
        for doc in docs:
            for c in _containers(doc):
                name, _, tag = c["image"].partition(":")
                if name == image["name"]:
                    c["image"] = f"{image.get('newName', name)}:{image.get('newTag', tag)}"
    if "namespace" in k:
        for doc in docs:
            if doc["kind"] != "Namespace":
                doc["metadata"]["namespace"] = k["namespace"]
    return docs


def render(root: Path) -> list[dict]:
    """Build a kustomization; generated ConfigMaps get a content hash in their name, like kustomize's."""
    docs = copy.deepcopy(_build(root))
    renames = {}
    for doc in docs:
        if doc["metadata"].get("annotations", {}).pop("test.k8s/generated", None):
            if not doc["metadata"]["annotations"]:
                del doc["metadata"]["annotations"]
            digest = hashlib.sha256(json.dumps(doc["data"], sort_keys=True).encode()).hexdigest()[:10]
            renames[("ConfigMap", doc["metadata"]["name"])] = f"{doc['metadata']['name']}-{digest}"
    _rename(docs, renames)
    return docs


# --- fixtures and helpers -----------------------------------------------------------------------------------


@pytest.fixture(scope="module", params=OVERLAYS)
def overlay(request):
    return request.param, render(K8S / "overlays" / request.param)


def _by_kind(docs: list[dict], kind: str) -> list[dict]:
    return [d for d in docs if d["kind"] == kind]


def _index(docs: list[dict]) -> dict[tuple[str, str], dict]:
    return {(d["kind"], d["metadata"]["name"]): d for d in docs}


def _workers(docs: list[dict]) -> list[dict]:
    deployments = _by_kind(docs, "Deployment")
    return [d for d in deployments if d["metadata"]["labels"].get("app.kubernetes.io/component") == "worker"]


def _sinks(docs: list[dict]) -> list[dict]:
    deployments = _by_kind(docs, "Deployment")
    return [d for d in deployments if d["metadata"]["labels"].get("app.kubernetes.io/component") == "sink"]


def _triton(docs: list[dict]) -> dict:
    (triton,) = [d for d in _by_kind(docs, "Deployment") if d["metadata"]["name"] == "embedstream-triton"]
    return triton


def _selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def _configmap_data(docs: list[dict], name: str) -> dict[str, str]:
    return _index(docs)[("ConfigMap", name)]["data"]


def _secret_keys(secret: dict) -> set[str]:
    return set(secret.get("data", {})) | set(secret.get("stringData", {}))


def _worker_toml(docs: list[dict], deployment: dict) -> str:
    """The TOML mounted at the worker's --config path, found through its volume mount."""
    spec = _pod_spec(deployment)
    (container,) = spec["containers"]
    assert WORKER_CONFIG in container["args"]
    (mount,) = [m for m in container["volumeMounts"] if WORKER_CONFIG.startswith(m["mountPath"] + "/")]
    (volume,) = [v for v in spec["volumes"] if v["name"] == mount["name"]]
    return _configmap_data(docs, volume["configMap"]["name"])[Path(WORKER_CONFIG).name]


# --- the files as written -----------------------------------------------------------------------------------


def test_every_manifest_parses_and_every_kustomization_path_exists():
    files = sorted(K8S.rglob("*.yaml"))
    assert len(files) >= 15
    for f in files:
        for doc in _load_docs(f):
            assert isinstance(doc, dict) and ("kind" in doc or "nameReference" in doc), f
    for kfile in K8S.rglob("kustomization.yaml"):
        k = yaml.safe_load(kfile.read_text())
        paths = list(k.get("resources", [])) + list(k.get("configurations", []))
        paths += [p["path"] for p in k.get("patches", []) if "path" in p]
        paths += [f.rpartition("=")[2] for g in k.get("configMapGenerator", []) for f in g.get("files", [])]
        for p in paths:
            assert (kfile.parent / p).exists(), f"{kfile}: {p} does not exist"


def test_both_overlays_render_from_the_base():
    for name in OVERLAYS:
        k = yaml.safe_load((K8S / "overlays" / name / "kustomization.yaml").read_text())
        assert "../../base" in k["resources"]
        assert k["namespace"] == "embedstream"


# --- the rendered overlays ----------------------------------------------------------------------------------


def test_rendered_objects_are_unique_and_core_kinds_match_the_kubernetes_schema(overlay):
    _, docs = overlay
    keys = [(d["kind"], d["metadata"]["name"]) for d in docs]
    assert len(keys) == len(set(keys))
    kinds = {d["kind"] for d in docs}
    assert {"Deployment", "Service", "ConfigMap", "Secret", "PodDisruptionBudget", "ScaledObject"} <= kinds
    assert kinds <= CORE_KINDS | {"ScaledObject", "TriggerAuthentication"}
    for doc in docs:
        if doc["kind"] in CORE_KINDS:
            # strict: a misspelt or misplaced field is an error, not silently dropped by the API server.
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def test_every_reference_points_at_an_object_and_key_that_exist(overlay):
    _, docs = overlay
    index = _index(docs)
    checked = 0
    for doc in docs:
        for kind, holder, field, key in references(doc):
            target = index.get((kind, holder[field]))
            where = f"{doc['kind']}/{doc['metadata']['name']}"
            assert target is not None, f"{where} refers to missing {kind}/{holder[field]}"
            if key is not None:
                keys = _secret_keys(target) if kind == "Secret" else set(target["data"])
                assert key in keys, f"{kind}/{holder[field]} has no key {key!r}"
            checked += 1
    assert checked >= 10


def test_selectors_match_exactly_one_deployment_and_named_ports_exist(overlay):
    _, docs = overlay
    deployments = _by_kind(docs, "Deployment")
    for d in deployments:
        assert _selects(d["spec"]["selector"]["matchLabels"], d["spec"]["template"]["metadata"]["labels"])
    for obj in _by_kind(docs, "Service") + _by_kind(docs, "PodDisruptionBudget"):
        selector = obj["spec"]["selector"]
        selector = selector.get("matchLabels", selector) if obj["kind"] == "PodDisruptionBudget" else selector
        matched = [d for d in deployments if _selects(selector, d["spec"]["template"]["metadata"]["labels"])]
        assert len(matched) == 1, f"{obj['kind']}/{obj['metadata']['name']} selects {len(matched)} deployments"
        if obj["kind"] == "Service":
            ports = {p["name"] for c in _containers(matched[0]) for p in c.get("ports", [])}
            for port in obj["spec"]["ports"]:
                assert port["targetPort"] in ports
    assert len(_by_kind(docs, "PodDisruptionBudget")) == len(deployments)


def test_triton_probes_ports_and_service(overlay):
    _, docs = overlay
    triton = _triton(docs)
    (server,) = _pod_spec(triton)["containers"]
    ports = {p["name"]: p["containerPort"] for p in server["ports"]}
    assert ports == {"http": 8000, "grpc": 8001, "metrics": 8002}
    assert server["readinessProbe"]["httpGet"] == {"path": "/v2/health/ready", "port": "http"}
    assert server["livenessProbe"]["httpGet"] == {"path": "/v2/health/live", "port": "http"}
    (service,) = [s for s in _by_kind(docs, "Service") if s["metadata"]["name"] == "embedstream-triton"]
    assert sorted(p["port"] for p in service["spec"]["ports"]) == [8000, 8001, 8002]
    # The repository location comes from the ConfigMap, and the exporter writes where Triton reads.
    env = {e["name"]: e for e in server["env"]}
    ref = env["MODEL_REPOSITORY"]["valueFrom"]["configMapKeyRef"]
    location = _configmap_data(docs, ref["name"])[ref["key"]]
    assert "--model-repository=$(MODEL_REPOSITORY)" in server["args"]
    assert location in {m["mountPath"] for m in server["volumeMounts"]}


def test_gpu_request_in_the_gpu_overlay_and_none_in_the_cpu_overlay(overlay):
    name, docs = overlay
    triton = _triton(docs)
    (server,) = _pod_spec(triton)["containers"]
    kind = _configmap_data(docs, _pod_spec(triton)["initContainers"][0]["envFrom"][0]["configMapRef"]["name"])
    if name == "gpu":
        assert server["resources"]["requests"][GPU] == 1
        assert server["resources"]["limits"][GPU] == 1
        assert kind["EMBEDSTREAM_TRITON_KIND"] == "gpu"
    else:
        for d in _by_kind(docs, "Deployment"):
            for c in _containers(d):
                for section in ("requests", "limits"):
                    assert GPU not in c.get("resources", {}).get(section, {}), f"{d['metadata']['name']}/{c['name']}"
            assert "tolerations" not in _pod_spec(d)
        assert kind["EMBEDSTREAM_TRITON_KIND"] == "cpu"
    # Workers never ask for a GPU: inference happens in Triton.
    for w in _workers(docs):
        assert all(GPU not in json.dumps(c.get("resources", {})) for c in _containers(w))


def test_workers_probes_security_resources_and_secret(overlay):
    _, docs = overlay
    workers = _workers(docs)
    assert [w["metadata"]["name"] for w in workers] == ["embedstream-worker-image"]
    for w in workers:
        assert "replicas" not in w["spec"]  # KEDA owns it
        (c,) = _pod_spec(w)["containers"]
        assert {p["name"]: p["containerPort"] for p in c["ports"]} == {"health": 8080}
        assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "health"}
        assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "health"}
        env = {e["name"]: e for e in c["env"]}
        ref = env["EMBEDSTREAM_KAFKA__SASL_PASSWORD"]["valueFrom"]["secretKeyRef"]
        assert ref["name"] == "embedstream-kafka-credentials"
        assert "value" not in env["EMBEDSTREAM_KAFKA__SASL_PASSWORD"]
    for d in _by_kind(docs, "Deployment"):
        pod = _pod_spec(d)
        assert pod["securityContext"]["runAsNonRoot"] is True
        for c in _containers(d):
            sc = c["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False and sc["capabilities"]["drop"] == ["ALL"]
            assert sc.get("runAsUser", pod["securityContext"].get("runAsUser", 0)) != 0
            assert c["resources"]["requests"]["memory"] and c["resources"]["limits"]["memory"]


def test_workers_run_the_worker_image_and_the_export_the_exporter_image(overlay):
    # The worker image has no torch; exporting the models needs it.
    name, docs = overlay
    for w in _workers(docs):
        assert {c["image"].split(":")[0] for c in _containers(w)} == {"embedstream-worker"}
    (export,) = _pod_spec(_triton(docs))["initContainers"]
    assert export["args"][0] == "export-models"
    assert export["image"].split(":")[0] == "embedstream-exporter"
    pinned = yaml.safe_load((K8S / "overlays" / name / "kustomization.yaml").read_text())["images"]
    assert {i["name"] for i in pinned} == {"embedstream-worker", "embedstream-exporter", "embedstream-sink"}


def test_the_init_container_exports_lite0_with_its_packaged_weights_from_the_workers_toml(overlay, tmp_path):
    from embedstream.encoders import _packaged_images, require_weights_choice

    _, docs = overlay
    pod = _pod_spec(_triton(docs))
    (export,) = pod["initContainers"]
    config = export["args"][export["args"].index("--config") + 1]
    (mount,) = [m for m in export["volumeMounts"] if config.startswith(m["mountPath"] + "/")]
    (volume,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    exported = _configmap_data(docs, volume["configMap"]["name"])[Path(config).name]
    (worker,) = _workers(docs)
    assert exported == _worker_toml(docs, worker), "the exporter and the workers read one TOML"
    path = tmp_path / "worker.toml"
    path.write_text(exported)
    encoder = load_settings(path).encoder
    # weights unset: the packaged ImageNet weights in the exporter image, so the init container needs no hub.
    assert (encoder.family, encoder.arch, encoder.weights) == ("cnn", "tf_efficientnet_lite0", None)
    require_weights_choice(encoder)
    assert _packaged_images.weights_file(encoder.arch).is_file()
    # Nothing in the init container's environment overrides the TOML's encoder.
    assert not any(e["name"].startswith("EMBEDSTREAM_ENCODER__") for e in export.get("env", []))
    for source in export.get("envFrom", []):
        env = _configmap_data(docs, source["configMapRef"]["name"])
        assert not any(k.startswith("EMBEDSTREAM_ENCODER__") for k in env), env


def test_secret_is_a_template_with_placeholders_only(overlay):
    _, docs = overlay
    (secret,) = _by_kind(docs, "Secret")
    values = secret["stringData"]
    for key in ("sasl-username", "sasl-password", "ca.crt"):
        assert values[key].strip().startswith("<") and values[key].strip().endswith(">"), key


def test_worker_toml_loads_and_agrees_with_services_and_keda(overlay, tmp_path):
    _, docs = overlay
    scaled = {so["spec"]["scaleTargetRef"]["name"]: so for so in _by_kind(docs, "ScaledObject")}
    assert set(scaled) == {w["metadata"]["name"] for w in _workers(docs) + _sinks(docs)}
    triton_service = "embedstream-triton"
    for w in _workers(docs):
        path = tmp_path / f"{w['metadata']['name']}.toml"
        path.write_text(_worker_toml(docs, w))
        settings = load_settings(path)
        assert settings.health_port == 8080 and settings.health_host == "0.0.0.0"
        assert settings.triton.url == f"{triton_service}:8001" and settings.triton.protocol == "grpc"
        assert settings.kafka.sasl_password is None  # from the Secret, never the ConfigMap
        mounts = {m["mountPath"] for m in _pod_spec(w)["containers"][0]["volumeMounts"]}
        assert str(settings.kafka.ssl_cafile.parent) in mounts
        so = scaled[w["metadata"]["name"]]
        (trigger,) = so["spec"]["triggers"]
        assert trigger["type"] == "kafka"
        meta = trigger["metadata"]
        assert meta["bootstrapServers"] == settings.kafka.bootstrap_servers
        assert meta["consumerGroup"] == settings.kafka.group_id
        assert meta["topic"] == settings.kafka.input_topic
        assert int(meta["lagThreshold"]) > 0
        partitions = int(so["metadata"]["annotations"]["embedstream.io/input-partitions"])
        assert 1 <= so["spec"]["minReplicaCount"] <= so["spec"]["maxReplicaCount"] <= partitions
        assert so["apiVersion"] == "keda.sh/v1alpha1"


SINK_CONFIG = "/etc/embedstream/sink.toml"


def _mounted_file(docs: list[dict], deployment: dict, path: str) -> str:
    """The ConfigMap file the Deployment's main container sees at ``path``."""
    spec = _pod_spec(deployment)
    c = spec["containers"][0]
    (mount,) = [m for m in c["volumeMounts"] if path.startswith(m["mountPath"] + "/")]
    (volume,) = [v for v in spec["volumes"] if v["name"] == mount["name"]]
    return _configmap_data(docs, volume["configMap"]["name"])[Path(path).name]


def test_a_sink_deployment_per_store_scaled_on_its_own_consumer_group(overlay, tmp_path):
    from embedstream.stores.sink import sink_kafka

    _, docs = overlay
    sinks = {d["metadata"]["name"]: d for d in _sinks(docs)}
    assert set(sinks) == {"embedstream-sink-lancedb", "embedstream-sink-feast"}
    scaled = {so["spec"]["scaleTargetRef"]["name"]: so for so in _by_kind(docs, "ScaledObject")}
    worker_groups, worker_outputs = set(), set()
    for w in _workers(docs):
        (tmp_path / "w.toml").write_text(_worker_toml(docs, w))
        k = load_settings(tmp_path / "w.toml").kafka
        worker_groups.add(k.group_id)
        worker_outputs.add(k.output_topic)
    groups = set()
    for name, d in sinks.items():
        store = name.rsplit("-", 1)[1]
        (c,) = _pod_spec(d)["containers"]
        assert c["args"] == ["sink", store, "--config", SINK_CONFIG]
        assert {x["image"].split(":")[0] for x in _containers(d)} == {"embedstream-sink"}
        assert "replicas" not in d["spec"]  # KEDA owns it
        assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "health"}
        env = {e["name"]: e for e in c["env"]}
        assert env["EMBEDSTREAM_KAFKA__SASL_PASSWORD"]["valueFrom"]["secretKeyRef"]["name"] == (
            "embedstream-kafka-credentials"
        )
        path = tmp_path / f"{name}.toml"
        path.write_text(_mounted_file(docs, d, SINK_CONFIG))
        settings = load_settings(path)
        assert settings.health_port == 8080 and settings.health_host == "0.0.0.0"
        assert settings.kafka.sasl_password is None  # from the Secret, never the ConfigMap
        assert str(settings.kafka.ssl_cafile.parent) in {m["mountPath"] for m in c["volumeMounts"]}
        k = sink_kafka(settings, store)
        groups.add(k.group_id)
        # The topics the workers publish; the group is the sink's own, and KEDA watches exactly it.
        assert set(settings.sink.topics) <= worker_outputs
        (trigger,) = scaled[name]["spec"]["triggers"]
        meta = trigger["metadata"]
        assert trigger["type"] == "kafka" and trigger["authenticationRef"]["name"] == "embedstream-kafka-auth"
        assert meta["consumerGroup"] == k.group_id
        assert meta["bootstrapServers"] == settings.kafka.bootstrap_servers
        assert "topic" not in meta or meta["topic"] in settings.sink.topics
        assert int(meta["lagThreshold"]) > 0
        so = scaled[name]
        partitions = int(so["metadata"]["annotations"]["embedstream.io/input-partitions"])
        assert 1 <= so["spec"]["minReplicaCount"] <= so["spec"]["maxReplicaCount"] <= partitions
    assert len(groups) == 2 and not groups & worker_groups


def test_the_lancedb_sink_writes_an_object_store_every_replica_shares(overlay, tmp_path):
    _, docs = overlay
    (d,) = [d for d in _sinks(docs) if d["metadata"]["name"].endswith("-lancedb")]
    (tmp_path / "sink.toml").write_text(_mounted_file(docs, d, SINK_CONFIG))
    # Not a pod-local path: replicas come and go, the table must outlive them.
    assert load_settings(tmp_path / "sink.toml").sink.lancedb_uri.startswith("s3://")


def test_the_feast_sink_registers_the_views_sink_feast_init_writes_before_it_starts(overlay, tmp_path):
    from embedstream.stores.feast_repo import features_py

    _, docs = overlay
    (d,) = [d for d in _sinks(docs) if d["metadata"]["name"].endswith("-feast")]
    pod = _pod_spec(d)
    (init,) = pod["initContainers"]
    (sink,) = pod["containers"]
    (tmp_path / "sink.toml").write_text(_mounted_file(docs, d, SINK_CONFIG))
    repo = str(load_settings(tmp_path / "sink.toml").sink.feast_repo)
    assert "apply_repo" in init["args"][0] and repo in init["args"][0]
    # The init container writes the repository into the very volume the sink reads it from.
    mounted = {c["name"]: {m["mountPath"]: m["name"] for m in c["volumeMounts"]} for c in (init, sink)}
    assert mounted[init["name"]][repo] == mounted[sink["name"]][repo]
    files = _index(docs)[("ConfigMap", next(v["configMap"]["name"] for v in pod["volumes"]
                                            if v["name"] == "feast-repo-files"))]["data"]  # fmt: skip
    assert files["features.py"] == features_py(), "features.py is not what `sink feast init` writes"
    store = yaml.safe_load(files["feature_store.yaml"])
    # One online store shared by every replica and reader, not a pod's SQLite file.
    assert store["online_store"]["type"] == "redis" and store["project"] == "embedstream"


def test_keda_max_replicas_comment_in_the_template():
    text = (K8S / "base" / "worker" / "scaledobject.yaml").read_text()
    assert re.search(r"maxReplicaCount.*partition", text, re.IGNORECASE | re.DOTALL)


def test_a_text_worker_is_one_directory_away(tmp_path):
    """A second modality from the same template: its own names and selectors, no overlap with the image one."""
    text = tmp_path / "worker-text"
    text.mkdir()
    (text / "worker.toml").write_text('[kafka]\ninput_topic = "texts"\ngroup_id = "embedstream-text"\n')
    template = yaml.safe_load((K8S / "base" / "worker-image" / "kustomization.yaml").read_text())
    template["resources"] = [str(K8S / "base" / "worker")]
    template["nameSuffix"] = "-text"
    template["labels"][0]["pairs"]["embedstream.io/modality"] = "text"
    (text / "kustomization.yaml").write_text(yaml.safe_dump(template))
    both = render(K8S / "base" / "worker-image") + render(text)
    names = [(d["kind"], d["metadata"]["name"]) for d in both]
    assert len(names) == len(set(names))
    deployments = _by_kind(both, "Deployment")
    for obj in _by_kind(both, "Service") + _by_kind(both, "PodDisruptionBudget"):
        selector = obj["spec"]["selector"]
        selector = selector.get("matchLabels", selector)
        assert sum(_selects(selector, d["spec"]["template"]["metadata"]["labels"]) for d in deployments) == 1
    targets = sorted(so["spec"]["scaleTargetRef"]["name"] for so in _by_kind(both, "ScaledObject"))
    assert targets == ["embedstream-worker-image", "embedstream-worker-text"]


def _strip_generated_hashes(docs: list[dict], generated: set[str]) -> list[dict]:
    pattern = re.compile(r"\b(" + "|".join(map(re.escape, sorted(generated))) + r")-[a-z0-9]{10}\b")
    return json.loads(pattern.sub(r"\1", json.dumps(docs)))


@pytest.mark.parametrize("name", OVERLAYS)
def test_the_subset_renderer_agrees_with_kubectl_kustomize(name):
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl not installed: the overlays were checked with the built-in kustomize subset only")
    out = subprocess.run([kubectl, "kustomize", str(K8S / "overlays" / name)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    theirs = [d for d in yaml.safe_load_all(out.stdout) if d]
    ours = render(K8S / "overlays" / name)
    generated = {d["metadata"]["name"].rsplit("-", 1)[0] for d in ours if d["kind"] == "ConfigMap"}
    key = lambda d: (d["kind"], d["metadata"]["name"])  # noqa: E731
    theirs = sorted(_strip_generated_hashes(theirs, generated), key=key)
    ours = sorted(_strip_generated_hashes(ours, generated), key=key)
    assert [key(d) for d in ours] == [key(d) for d in theirs]
    for a, b in zip(ours, theirs, strict=True):
        assert a == b, key(a)


# --- the optional monitoring kustomization ------------------------------------------------------------------


def test_prometheusrule_carries_the_alert_rules_of_deploy_prometheus():
    """deploy/k8s/monitoring: the rules Prometheus loads in the compose stack, for the Prometheus Operator."""
    docs = render(K8S / "monitoring")
    (rule,) = docs
    assert rule["apiVersion"] == "monitoring.coreos.com/v1" and rule["kind"] == "PrometheusRule"
    assert rule["metadata"]["namespace"] == "embedstream"
    assert set(rule) == {"apiVersion", "kind", "metadata", "spec"} and set(rule["spec"]) == {"groups"}
    alerts = yaml.safe_load((ROOT / "deploy" / "prometheus" / "alerts.yml").read_text())
    assert rule["spec"]["groups"] == alerts["groups"]
    names = {r["alert"] for g in rule["spec"]["groups"] for r in g["rules"]}
    assert {"EmbeddingMeanDrift", "EmbeddingAnomalyRateHigh"} <= names
    for g in rule["spec"]["groups"]:
        for r in g["rules"]:
            assert set(r) <= {"alert", "expr", "for", "labels", "annotations"}, r
            assert re.fullmatch(r"\d+[smh]", r["for"]) and r["labels"]["severity"] in ("warning", "critical")
    # Not in the base: overlays apply where the operator's CRDs are missing.
    for name in OVERLAYS:
        assert all(d["kind"] != "PrometheusRule" for d in render(K8S / "overlays" / name))
