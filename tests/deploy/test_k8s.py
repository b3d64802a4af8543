"""deploy/k8s: every manifest passes the Kubernetes schema (offline, strict) and agrees with the server.

The schema check is kubernetes-validate's bundled OpenAPI schemas in strict mode (unknown fields are
errors), the same check `kubeconform -strict` makes. Beyond the schema, the manifests must agree with
each other (selectors, names, ports) and with loraswap itself (settings that parse, probe routes that
exist, a grace period longer than the drain).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from basemodel.settings import Settings
from tests.deploy.manifests import K8S, K8S_MIN_VERSION, by_kind, dockerfile, documents, one

KUBERAY_KINDS = {"RayService"}  # custom resources: checked by test_rayservice.py


def env_settings(monkeypatch: pytest.MonkeyPatch, env: dict[str, str]) -> Settings:
    """Settings exactly as a pod builds them: from its environment."""
    for key in [k for k in os.environ if k.startswith("LORASWAP_")]:
        monkeypatch.delenv(key)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    return Settings()


def pod_env(container: dict[str, Any]) -> dict[str, str]:
    configmaps = {c["metadata"]["name"]: c["data"] for c in by_kind("ConfigMap")}
    secrets = {s["metadata"]["name"]: s["stringData"] for s in by_kind("Secret")}
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        if "configMapRef" in source:
            env.update(configmaps[source["configMapRef"]["name"]])
        if "secretRef" in source:
            env.update(secrets[source["secretRef"]["name"]])
    env.update({item["name"]: item["value"] for item in container.get("env", [])})
    return env


@pytest.mark.parametrize(
    ("path", "doc"),
    [(p, d) for p, d in documents() if d["kind"] not in KUBERAY_KINDS | {"Kustomization"}],
    ids=lambda value: value.name if isinstance(value, Path) else value["kind"],
)
def test_manifest_passes_the_kubernetes_schema(path: Path, doc: dict[str, Any]) -> None:
    kubernetes_validate.validate(doc, K8S_MIN_VERSION, strict=True)


def test_the_schema_check_catches_unknown_fields_and_wrong_types() -> None:
    deployment = one("Deployment")
    broken = yaml.safe_load(yaml.safe_dump(deployment))
    broken["spec"]["template"]["spec"]["containers"][0]["livenesProbe"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, K8S_MIN_VERSION, strict=True)
    broken = yaml.safe_load(yaml.safe_dump(deployment))
    broken["spec"]["replicas"] = "two"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, K8S_MIN_VERSION, strict=True)


def test_kustomization_lists_every_single_process_manifest() -> None:
    listed = set(one("Kustomization")["resources"])
    single_process = {
        p.name for p, d in documents() if d["kind"] not in KUBERAY_KINDS | {"Kustomization", "NetworkPolicy"}
    }
    assert listed == single_process
    assert all((K8S / name).is_file() for name in listed)


def test_settings_and_tokens_are_valid_loraswap_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    container = one("Deployment")["spec"]["template"]["spec"]["containers"][0]
    settings = env_settings(monkeypatch, pod_env(container))
    assert settings.host == "0.0.0.0" and settings.auth_enabled  # an open bind must come with tokens
    assert settings.adapter_store_uri.startswith("s3://")  # replicas share one registry
    assert settings.device == "cuda"


def test_a_typo_in_the_configmap_would_fail(monkeypatch: pytest.MonkeyPatch) -> None:
    container = one("Deployment")["spec"]["template"]["spec"]["containers"][0]
    env = pod_env(container) | {"LORASWAP_MAX_QUEUE": "sixteen"}
    with pytest.raises(ValueError, match="max_queue"):
        env_settings(monkeypatch, env)


def test_deployment_probes_ports_and_drain(monkeypatch: pytest.MonkeyPatch) -> None:
    from service.app import create_app

    pod = one("Deployment")["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    settings = env_settings(monkeypatch, pod_env(container))
    routes = set(create_app(settings, loader=lambda _: None).openapi_schema.paths or {})
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz" in routes
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz" in routes
    (port,) = container["ports"]
    assert port["containerPort"] == settings.port
    assert container["livenessProbe"]["httpGet"]["port"] == port["name"]
    pre_stop = container["lifecycle"]["preStop"]["sleep"]["seconds"]
    assert pod["terminationGracePeriodSeconds"] > settings.graceful_timeout_s + pre_stop
    resources = container["resources"]
    assert resources["requests"]["nvidia.com/gpu"] == resources["limits"]["nvidia.com/gpu"] == "1"


def test_pods_run_as_the_image_user_and_write_only_data() -> None:
    uid = next(args for op, args in dockerfile("Dockerfile.cuda") if op == "USER").split(":")[0]
    for doc in by_kind("Deployment"):
        pod = doc["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert str(pod["securityContext"]["runAsUser"]) == uid
        for container in pod["containers"]:
            assert container["securityContext"]["readOnlyRootFilesystem"] is True
            writable = [m["mountPath"] for m in container["volumeMounts"] if not m.get("readOnly")]
            assert writable == ["/data"]


def test_selectors_and_references_match() -> None:
    deployment = one("Deployment")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    service = one("Service")
    assert service["spec"]["selector"].items() <= labels.items()
    port_names = {p["name"] for p in deployment["spec"]["template"]["spec"]["containers"][0]["ports"]}
    assert {p["targetPort"] for p in service["spec"]["ports"]} <= port_names
    assert one("PodDisruptionBudget")["spec"]["selector"]["matchLabels"].items() <= labels.items()
    target = one("HorizontalPodAutoscaler")["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", deployment["metadata"]["name"])
    claims = {c["metadata"]["name"] for c in by_kind("PersistentVolumeClaim")}
    for doc in by_kind("Deployment"):
        used = {
            v["persistentVolumeClaim"]["claimName"]
            for v in doc["spec"]["template"]["spec"]["volumes"]
            if "persistentVolumeClaim" in v
        }
        assert used <= claims
