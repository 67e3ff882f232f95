"""The deployment files parse and say what they claim."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"


def test_every_yaml_and_json_parses() -> None:
    files = list(DEPLOY.rglob("*.yaml")) + list(DEPLOY.rglob("*.yml"))
    assert len(files) >= 3
    for f in files:
        docs = list(yaml.safe_load_all(f.read_text()))
        assert docs and all(isinstance(d, dict) for d in docs), f
    dash = json.loads((DEPLOY / "grafana" / "streamtune.json").read_text())
    assert len(dash["panels"]) >= 10
    exprs = " ".join(t["expr"] for p in dash["panels"] for t in p["targets"])
    for metric in ("ray_streamtune_ingested_events", "ray_streamtune_consumer_lag",
                   "ray_streamtune_champion_version", "ray_serve_"):  # fmt: skip
        assert metric in exprs


def test_kuberay_gpu_training_and_loopback_compose() -> None:
    docs = list(yaml.safe_load_all((DEPLOY / "kuberay" / "raycluster-training.yaml").read_text()))
    cluster = next(d for d in docs if d["kind"] == "RayCluster")
    limits = cluster["spec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0][
        "resources"
    ]["limits"]
    assert limits["nvidia.com/gpu"] == "1"
    compose = yaml.safe_load((DEPLOY / "compose" / "docker-compose.yml").read_text())
    for svc in compose["services"].values():
        for port in svc.get("ports", []):
            assert port.startswith("127.0.0.1:"), port


def test_kafka_pom_names_broker_and_tools() -> None:
    pom = (DEPLOY / "kafka" / "pom.xml").read_text()
    assert "<artifactId>kafka_2.13</artifactId>" in pom
    assert "<artifactId>kafka-tools</artifactId>" in pom


def test_serve_configs_name_importable_targets() -> None:
    import importlib

    serve_cfg = yaml.safe_load((DEPLOY / "serve.yaml").read_text())
    rayservice = yaml.safe_load((DEPLOY / "kuberay" / "rayservice.yaml").read_text())
    apps = (
        serve_cfg["applications"]
        + yaml.safe_load(rayservice["spec"]["serveConfigV2"])["applications"]
    )
    assert serve_cfg["http_options"]["host"] == "127.0.0.1"
    for app in apps:
        module, _, attr = app["import_path"].partition(":")
        assert callable(getattr(importlib.import_module(module), attr)), app["import_path"]


def test_cluster_manifests_keep_state_on_object_storage() -> None:
    """No shared volume: every state location is a URI, credentials and passwords from secrets."""
    from services.settings import Settings

    text = "".join((DEPLOY / "kuberay" / f).read_text() for f in ("raycluster-training.yaml",
                                                                   "rayservice.yaml"))  # fmt: skip
    assert "persistentVolumeClaim" not in text and "volumeMounts" not in text
    assert "streamtune-s3" in text and "streamtune-kafka" in text
    docs = list(yaml.safe_load_all((DEPLOY / "kuberay" / "raycluster-training.yaml").read_text()))
    job = next(d for d in docs if d["kind"] == "RayJob")
    env = yaml.safe_load(job["spec"]["runtimeEnvYAML"])["env_vars"]
    keys = {k.removeprefix("STREAMTUNE_").lower(): v for k, v in env.items()}
    s = Settings(
        buffer={"path": keys["buffer__path"]},
        registry={"path": keys["registry__path"]},
        trainer={"storage_path": keys["trainer__storage_path"],
                 "node_resource": keys["trainer__node_resource"]},
    )  # fmt: skip
    assert s.buffer.path == "s3://streamtune/buffer"  # kept as a URI, not mangled into a Path
    assert s.registry.path == "s3://streamtune/registry"
    assert s.trainer.storage_path == "s3://streamtune/ray_results"
    cluster = next(d for d in docs if d["kind"] == "RayCluster")
    workers = cluster["spec"]["workerGroupSpecs"][0]["rayStartParams"]["resources"]
    assert s.trainer.node_resource in workers


def test_every_ray_node_of_the_manifests_gets_the_haproxy_ingress() -> None:
    """Serve reads its ingress from each node's environment: the head (controller, HAProxy) and
    the replicas' workers all need the same switches as a local Ray that `up` starts."""
    from serving.ingress import HAPROXY_ENV

    service = yaml.safe_load((DEPLOY / "kuberay" / "rayservice.yaml").read_text())
    spec = service["spec"]["rayClusterConfig"]
    pods = [spec["headGroupSpec"]["template"]] + [g["template"] for g in spec["workerGroupSpecs"]]
    for pod in pods:
        for container in pod["spec"]["containers"]:
            env = {e["name"]: e["value"] for e in container.get("env", [])}
            assert {k: env.get(k) for k in HAPROXY_ENV} == HAPROXY_ENV, container["name"]
    compose = yaml.safe_load((DEPLOY / "compose" / "docker-compose.yml").read_text())
    for name in ("ray-head", "ray-worker"):
        env = compose["services"][name]["environment"]
        assert {k: env.get(k) for k in HAPROXY_ENV} == HAPROXY_ENV, name
