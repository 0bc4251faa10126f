"""Regenerate kuberay-v1.schema.json: JSON Schemas of KubeRay's RayService and RayCluster.

CI validates deploy/*.yaml against the vendored output with python ``jsonschema`` (no network:
tests/ray/test_kuberay_manifests.py). Two sources, both pinned:

* KubeRay's own types, ray.io/v1 as of **KubeRay v1.1** (``ray-operator/apis/ray/v1/
  rayservice_types.go`` and ``raycluster_types.go``, from which controller-gen writes the
  CRDs' ``openAPIV3Schema``), written out below as ``KUBERAY_TYPES``: field names, types,
  enums and the ``required`` lists (json tags without ``omitempty``). Strict: an unknown field
  is an error, as with ``kubeconform -strict``. Later KubeRay releases add optional fields;
  add them here when a manifest needs one.
* The Kubernetes core types they embed (PodTemplateSpec, Service, EnvVar, ...), copied from
  the Kubernetes **1.31** OpenAPI definitions that the PyPI package ``kubernetes-validate``
  ships (its "-strict" variant: additionalProperties false), with descriptions dropped.

Run: ``pip install --no-deps kubernetes-validate==1.37.0 && python deploy/schemas/regenerate.py``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys

KUBERAY_VERSION = "v1.1"
K8S_VERSION = "v1.31.0"
K8S_PACKAGE = ("kubernetes_validate", "1.37.0")
OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "kuberay-v1.schema.json")
CORE = "io.k8s.api.core.v1."


def ref(name: str) -> dict:
    return {"$ref": f"#/$defs/{name}"}


def obj(properties: dict, required: tuple = ()) -> dict:
    out = {"type": "object", "properties": properties, "additionalProperties": False}
    if required:
        out["required"] = list(required)
    return out


INT32 = {"type": "integer", "minimum": -2**31, "maximum": 2**31 - 1}
STRING_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
BOOL, STRING = {"type": "boolean"}, {"type": "string"}


def kuberay_types() -> dict:
    """ray.io/v1 (KubeRay v1.1): spec types of RayService and RayCluster; statuses are the operator's."""
    autoscaler = obj({
        "resources": ref(CORE + "ResourceRequirements"), "image": STRING, "imagePullPolicy": STRING,
        "env": {"type": "array", "items": ref(CORE + "EnvVar")},
        "envFrom": {"type": "array", "items": ref(CORE + "EnvFromSource")},
        "volumeMounts": {"type": "array", "items": ref(CORE + "VolumeMount")},
        "securityContext": ref(CORE + "SecurityContext"), "idleTimeoutSeconds": INT32,
        "upscalingMode": {"type": "string", "enum": ["Default", "Aggressive", "Conservative"]}})
    head = obj({"serviceType": STRING, "headService": ref(CORE + "Service"), "enableIngress": BOOL,
                "rayStartParams": STRING_MAP, "template": ref(CORE + "PodTemplateSpec")},
               ("rayStartParams", "template"))
    worker = obj({"groupName": STRING, "replicas": INT32, "minReplicas": INT32, "maxReplicas": INT32,
                  "numOfHosts": INT32, "rayStartParams": STRING_MAP,
                  "template": ref(CORE + "PodTemplateSpec"),
                  "scaleStrategy": obj({"workersToDelete": {"type": "array", "items": STRING},
                                        "multihostReplicasToDelete": {"type": "array", "items": STRING}})},
                 ("groupName", "maxReplicas", "minReplicas", "rayStartParams", "template"))
    cluster_spec = obj({"headGroupSpec": ref("RayHeadGroupSpec"),
                        "workerGroupSpecs": {"type": "array", "items": ref("RayWorkerGroupSpec")},
                        "rayVersion": STRING, "enableInTreeAutoscaling": BOOL,
                        "autoscalerOptions": autoscaler, "headServiceAnnotations": STRING_MAP,
                        "suspend": BOOL}, ("headGroupSpec",))
    service_spec = obj({"serveConfigV2": STRING, "rayClusterConfig": ref("RayClusterSpec"),
                        "serviceUnhealthySecondThreshold": INT32,
                        "deploymentUnhealthySecondThreshold": INT32,
                        "serveService": ref(CORE + "Service")})

    def resource(kind: str, spec: str) -> dict:
        return obj({"apiVersion": {"const": "ray.io/v1"}, "kind": {"const": kind},
                    "metadata": ref("io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta"),
                    "spec": ref(spec), "status": {"type": "object"}},
                   ("apiVersion", "kind", "metadata", "spec"))

    return {"RayService": resource("RayService", "RayServiceSpec"),
            "RayCluster": resource("RayCluster", "RayClusterSpec"),
            "RayServiceSpec": service_spec, "RayClusterSpec": cluster_spec,
            "RayHeadGroupSpec": head, "RayWorkerGroupSpec": worker}


def k8s_definitions() -> dict:
    spec = importlib.util.find_spec(K8S_PACKAGE[0])  # located, not imported (it needs extra deps)
    if spec is None:
        sys.exit(f"Install the Kubernetes schemas first: pip install --no-deps "
                 f"kubernetes-validate=={K8S_PACKAGE[1]}")
    folder = os.path.join(spec.submodule_search_locations[0], "kubernetes-json-schema",
                          f"{K8S_VERSION}-local-strict")
    with open(os.path.join(folder, "_definitions.json")) as f:
        return json.load(f)["$defs"]


def closure(defs: dict, roots: dict) -> dict:
    """The definitions ``roots`` reach through $ref, descriptions dropped, refs made local."""
    out, todo = {}, [name for name in _refs(roots)]
    while todo:
        name = todo.pop()
        if name in out or name not in defs:
            continue
        out[name] = _clean(defs[name])
        todo.extend(_refs(out[name]))
    return out


def _refs(node) -> list[str]:
    if isinstance(node, dict):
        found = [node["$ref"].split("/")[-1]] if isinstance(node.get("$ref"), str) else []
        return found + [r for v in node.values() for r in _refs(v)]
    if isinstance(node, list):
        return [r for v in node for r in _refs(v)]
    return []


def _clean(node):
    if isinstance(node, dict):
        out = {k: _clean(v) for k, v in node.items() if k != "description"}
        if isinstance(out.get("$ref"), str):
            out["$ref"] = "#/$defs/" + out["$ref"].split("/")[-1]
        return out
    if isinstance(node, list):
        return [_clean(v) for v in node]
    return node


def build() -> dict:
    types = kuberay_types()
    return {"$schema": "https://json-schema.org/draft/2020-12/schema",
            "$comment": (f"KubeRay {KUBERAY_VERSION} ray.io/v1 RayService and RayCluster (validate against "
                         f"#/$defs/<kind>), Kubernetes {K8S_VERSION} core types. Generated by "
                         "deploy/schemas/regenerate.py; do not edit."),
            "kuberayVersion": KUBERAY_VERSION, "kubernetesVersion": K8S_VERSION,
            "$defs": {**closure(k8s_definitions(), types), **types}}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=OUT)
    args = parser.parse_args(argv)
    schema = build()
    with open(args.out, "w") as f:
        json.dump(schema, f, indent=1, sort_keys=True)
        f.write("\n")
    print(f"wrote {args.out}: {len(schema['$defs'])} definitions")
    return 0


if __name__ == "__main__":
    sys.exit(main())
