"""deploy/*.yaml: valid KubeRay resources whose Serve config loads in tessellm.

Validated offline against the vendored schema (deploy/schemas/kuberay-v1.schema.json, written
by deploy/schemas/regenerate.py), then the embedded Serve config is checked by Ray Serve's own
config model and its application args by tessellm's config parser and app builder.
"""

from __future__ import annotations

import copy
import glob
import importlib
import json
import os

import jsonschema
import pytest
import yaml

DEPLOY = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "deploy")
MANIFESTS = sorted(glob.glob(os.path.join(DEPLOY, "*.yaml")))
IMPORT_PATH = "tessellm.entrypoints.ray_serve:build_app"

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # Ray's own pydantic use


@pytest.fixture(scope="module")
def schema():
    with open(os.path.join(DEPLOY, "schemas", "kuberay-v1.schema.json")) as f:
        return json.load(f)


def _validate(schema: dict, resource: dict) -> None:
    root = {**schema, "$ref": f"#/$defs/{resource.get('kind')}"}
    jsonschema.Draft202012Validator(root).validate(resource)


def _resources(path: str) -> list[dict]:
    with open(path) as f:
        return [d for d in yaml.safe_load_all(f) if d]


def _services() -> list[tuple[str, dict]]:
    return [(os.path.basename(p), r) for p in MANIFESTS for r in _resources(p) if r["kind"] == "RayService"]


def test_there_is_a_gpu_and_a_cpu_rayservice():
    names = [name for name, _ in _services()]
    assert "rayservice-gpu.yaml" in names and "rayservice-cpu.yaml" in names


@pytest.mark.parametrize("path", MANIFESTS, ids=os.path.basename)
def test_manifest_matches_the_kuberay_schema(schema, path):
    for resource in _resources(path):
        assert resource["kind"] in ("RayService", "RayCluster"), resource["kind"]
        _validate(schema, resource)


def test_the_schema_catches_real_mistakes(schema):
    _, service = _services()[0]
    bad = copy.deepcopy(service)
    bad["spec"]["rayClusterConfig"]["headGroupSpec"]["rayStartParams"]["num-cpus"] = 0  # must be a string
    with pytest.raises(jsonschema.ValidationError):
        _validate(schema, bad)
    bad = copy.deepcopy(service)
    bad["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["imagePullPolicies"] = "x"
    with pytest.raises(jsonschema.ValidationError):
        _validate(schema, bad)
    bad = copy.deepcopy(service)
    del bad["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["groupName"]
    with pytest.raises(jsonschema.ValidationError):
        _validate(schema, bad)


@pytest.mark.parametrize("name,service", _services(), ids=[n for n, _ in _services()])
def test_serve_config_loads_in_tessellm(name, service):
    from ray.serve.schema import ServeDeploySchema

    from tessellm.entrypoints.ray_serve.config import parse_config

    serve_config = yaml.safe_load(service["spec"]["serveConfigV2"])
    ServeDeploySchema.model_validate(serve_config)  # Ray Serve's own check of the config file
    (app,) = serve_config["applications"]
    assert app["import_path"] == IMPORT_PATH
    module, attr = IMPORT_PATH.split(":")
    builder = getattr(importlib.import_module(module), attr)
    config = parse_config(app["args"])
    options = config.replica_actor_options()
    if "gpu" in name:
        assert config.engine["device"] == "cuda" and options.get("num_gpus") == 1
        assert config.autoscaling is not None and config.autoscaling.max_replicas >= config.autoscaling.min_replicas
    else:
        assert config.engine["device"] == "cpu" and "num_gpus" not in options
    application = builder(app["args"])  # builds the deployment graph (nothing is started)
    assert application is not None


@pytest.mark.parametrize("name,service", _services(), ids=[n for n, _ in _services()])
def test_workers_are_ready_when_serve_answers_on_ready(name, service):
    cluster = service["spec"]["rayClusterConfig"]
    assert cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"  # no replicas on the head
    for group in cluster["workerGroupSpecs"]:
        (container,) = group["template"]["spec"]["containers"]
        assert container["readinessProbe"]["httpGet"] == {"path": "/ready", "port": 8000}
        for probe in ("startupProbe", "readinessProbe"):  # /ready answers within 0.5 s: Kubernetes' 1 s
            assert container[probe].get("timeoutSeconds", 1) == 1, (probe, container[probe])
        if "gpu" in name:
            assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
        else:
            assert "nvidia.com/gpu" not in container["resources"]["limits"]
