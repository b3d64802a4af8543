"""deploy/k8s/rayservice.yaml: KubeRay's RayService shape, valid pod templates, a Serve config Ray accepts.

kubernetes-validate has no schemas for custom resources, so the RayService is checked in three parts:
the fields we use against the structure of KubeRay's ``ray.io/v1`` CRD (``RAYSERVICE`` below, unknown
fields refused), each pod template against Kubernetes' own ``PodTemplate`` schema (strict), and
``serveConfigV2`` against Ray Serve's ``ServeDeploySchema`` — what ``serve deploy`` validates.
"""

from __future__ import annotations

import importlib
import importlib.metadata
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from tests.deploy.manifests import K8S_MIN_VERSION, by_kind, one

OBJECT = {"type": "object"}
GROUP = {
    "type": "object",
    "required": ["rayStartParams", "template"],
    "properties": {
        "groupName": {"type": "string"},
        "replicas": {"type": "integer", "minimum": 0},
        "minReplicas": {"type": "integer", "minimum": 0},
        "maxReplicas": {"type": "integer", "minimum": 0},
        "rayStartParams": {"type": "object", "additionalProperties": {"type": "string"}},
        "template": OBJECT,
        "serviceType": {"enum": ["ClusterIP", "NodePort", "LoadBalancer"]},
    },
    "additionalProperties": False,
}
RAYSERVICE = {  # the part of KubeRay's ray.io/v1 RayService CRD (openAPIV3Schema) this manifest uses
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "ray.io/v1"},
        "kind": {"const": "RayService"},
        "metadata": OBJECT,
        "spec": {
            "type": "object",
            "required": ["serveConfigV2", "rayClusterConfig"],
            "properties": {
                "serveConfigV2": {"type": "string"},
                "rayClusterConfig": {
                    "type": "object",
                    "required": ["headGroupSpec"],
                    "properties": {
                        "rayVersion": {"type": "string"},
                        "enableInTreeAutoscaling": {"type": "boolean"},
                        "headGroupSpec": {**GROUP, "required": ["template"]},
                        "workerGroupSpecs": {
                            "type": "array",
                            "items": {**GROUP, "required": ["groupName", "template"]},
                        },
                    },
                    "additionalProperties": False,
                },
            },
            "additionalProperties": False,
        },
    },
}


@pytest.fixture(scope="module")
def rayservice() -> dict[str, Any]:
    return one("RayService")


def groups(rayservice: dict[str, Any]) -> list[dict[str, Any]]:
    cluster = rayservice["spec"]["rayClusterConfig"]
    return [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]


def test_rayservice_has_kuberays_shape(rayservice: dict[str, Any]) -> None:
    jsonschema.validate(rayservice, RAYSERVICE)
    broken = yaml.safe_load(yaml.safe_dump(rayservice))
    broken["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["replica"] = 2
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, RAYSERVICE)


def test_pod_templates_pass_the_kubernetes_schema(rayservice: dict[str, Any]) -> None:
    for group in groups(rayservice):
        doc = {
            "apiVersion": "v1",
            "kind": "PodTemplate",
            "metadata": {"name": "t"},
            "template": group["template"],
        }
        kubernetes_validate.validate(doc, K8S_MIN_VERSION, strict=True)


def test_worker_pods_get_a_gpu_and_the_shared_settings(rayservice: dict[str, Any]) -> None:
    (worker,) = rayservice["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    (container,) = worker["template"]["spec"]["containers"]
    assert container["resources"]["requests"]["nvidia.com/gpu"] == "1"
    sources = {next(iter(s.values()))["name"] for s in container["envFrom"]}
    assert sources == {one("ConfigMap")["metadata"]["name"], one("Secret")["metadata"]["name"]}
    assert worker["minReplicas"] <= worker["replicas"] <= worker["maxReplicas"]


def test_serve_config_is_valid_and_imports_our_application(rayservice: dict[str, Any]) -> None:
    from ray.serve.schema import ServeDeploySchema

    config = ServeDeploySchema.model_validate(yaml.safe_load(rayservice["spec"]["serveConfigV2"]))
    (app,) = config.applications
    module, _, attribute = app.import_path.partition(":")
    assert callable(getattr(importlib.import_module(module), attribute))


def test_ray_version_matches_the_one_we_test_with(rayservice: dict[str, Any]) -> None:
    installed = importlib.metadata.version("ray")
    assert rayservice["spec"]["rayClusterConfig"]["rayVersion"].split(".")[:2] == installed.split(".")[:2]


def test_ray_ports_are_closed_to_everything_but_ray_and_the_operator(rayservice: dict[str, Any]) -> None:
    (policy,) = by_kind("NetworkPolicy")
    labels = groups(rayservice)[0]["template"]["metadata"]["labels"]
    assert policy["spec"]["podSelector"]["matchLabels"].items() <= labels.items()
    open_to_all = [rule for rule in policy["spec"]["ingress"] if "from" not in rule]
    assert [p["port"] for rule in open_to_all for p in rule["ports"]] == [8000]  # Serve: our own auth
