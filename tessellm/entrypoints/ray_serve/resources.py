"""What the Serve app asks Ray for, fitted to the cluster and checked before anything deploys.

Invariant checked by ``check_fit`` (per resource: CPU, GPU, TPU, custom)::

    replicas at start x replica bundle + ingress replicas x ingress bundle  <=  free on the cluster
    every bundle                                                            <=  some node's total

Defaults that fit (``fit_defaults``, only for what the user left unset):

* ingress CPUs: 0.5, or a tenth of the cluster's free CPUs where that is less (a 2-CPU machine
  gives it 0.2); it forwards bytes, it computes nothing;
* replica CPUs: 1, or an equal share of what the ingress leaves for the most replicas the app
  may run (autoscaling: ``max_replicas``) where that is less: 2 replicas on 2 CPUs get 0.9 each.
  Ray gives an actor with less than one CPU ``OMP_NUM_THREADS=1``;
* accelerators per replica: tensor x pipeline parallel GPUs (or TPU chips), config.py.

Everything here is plain data (no Ray import); ``ClusterView.current()`` reads a live cluster.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from tessellm.entrypoints.ray_serve.config import RayServeConfig

DEFAULT_INGRESS_CPUS = 0.5
_EPS = 1e-6


class ResourceShortfall(ValueError):
    """The app does not fit the cluster; the message names the shortfall and the flag to change."""


@dataclass
class ClusterView:
    free: dict = field(default_factory=dict)  # resources free now, summed over alive nodes
    nodes: list = field(default_factory=list)  # each alive node's total resources

    @classmethod
    def current(cls) -> "ClusterView":
        import ray

        nodes = [dict(n["Resources"]) for n in ray.nodes() if n.get("Alive")]
        return cls(free=dict(ray.available_resources()), nodes=nodes)


def replicas_at_start(cfg: RayServeConfig) -> int:
    a = cfg.autoscaling
    if a is None:
        return cfg.num_replicas
    return a.initial_replicas if a.initial_replicas is not None else a.min_replicas


def replicas_at_most(cfg: RayServeConfig) -> int:
    return cfg.num_replicas if cfg.autoscaling is None else cfg.autoscaling.max_replicas


def fit_defaults(cfg: RayServeConfig, cluster: ClusterView) -> None:
    """Fill ``ingress.num_cpus`` and ``replica.num_cpus`` where unset, so the app fits."""
    cpus = cluster.free.get("CPU", 0.0)
    if cfg.ingress.num_cpus is None:
        cfg.ingress.num_cpus = _floor(min(DEFAULT_INGRESS_CPUS, cpus / 10))
    if cfg.replica.num_cpus is None:
        left = cpus - cfg.ingress.num_cpus * cfg.ingress.num_replicas
        share = left / max(1, replicas_at_most(cfg))
        cfg.replica.num_cpus = max(0.01, _floor(min(1.0, share)))


def replica_bundle(cfg: RayServeConfig) -> dict:
    """One engine replica's resources, as Ray counts them (CPU, GPU, custom)."""
    opts = cfg.replica_actor_options()
    bundle = {"CPU": opts["num_cpus"], "GPU": opts.get("num_gpus", 0), **opts.get("resources", {})}
    return {k: float(v) for k, v in bundle.items() if v}


def ingress_bundle(cfg: RayServeConfig) -> dict:
    cpus = cfg.ingress.num_cpus if cfg.ingress.num_cpus is not None else DEFAULT_INGRESS_CPUS
    return {"CPU": float(cpus)} if cpus else {}


def check_fit(cfg: RayServeConfig, cluster: ClusterView) -> None:
    """Raise ResourceShortfall (one sentence: the shortfall and the flag) if the app cannot fit."""
    replica, ingress = replica_bundle(cfg), ingress_bundle(cfg)
    n, ni = replicas_at_start(cfg), cfg.ingress.num_replicas
    for key, amount in replica.items():
        largest = max((node.get(key, 0.0) for node in cluster.nodes), default=0.0)
        if n and amount > largest + _EPS:
            raise ResourceShortfall(
                f"One engine replica needs {_num(amount)} {key} on one node, but the largest node of "
                f"the Ray cluster has {_num(largest)}; {_fix(cfg, key, per_node=True)}.")
    for key in sorted(set(replica) | set(ingress)):
        need = n * replica.get(key, 0.0) + ni * ingress.get(key, 0.0)
        free = cluster.free.get(key, 0.0)
        if need > free + _EPS:
            parts = f"{n} engine replica(s) x {_num(replica.get(key, 0.0))} {key}"
            if ingress.get(key):
                parts += f" + {ni} ingress x {_num(ingress[key])} {key}"
            raise ResourceShortfall(
                f"The Ray cluster has {_num(free)} {key} free, but {parts} need {_num(need)} {key}; "
                f"{_fix(cfg, key)}.")


def describe(cfg: RayServeConfig) -> str:
    """What the app asks for, for the log: '2 replicas x {CPU: 0.9} + 1 ingress x {CPU: 0.2}'."""
    return (f"{replicas_at_start(cfg)} replica(s) x {_bundle_text(replica_bundle(cfg))} + "
            f"{cfg.ingress.num_replicas} ingress x {_bundle_text(ingress_bundle(cfg))}")


def _fix(cfg: RayServeConfig, key: str, per_node: bool = False) -> str:
    count = "--num-replicas" if cfg.autoscaling is None else "--min-replicas"
    if key == "CPU":
        what = ("lower --replica-num-cpus (replica.num_cpus), or leave it unset to fit the cluster"
                if per_node else
                f"lower {count} or --replica-num-cpus (replica.num_cpus; unset fits the cluster)")
    elif key in ("GPU", "TPU") and cfg.replica.num_gpus is None and not cfg.replica.resources:
        what = ("lower --tensor-parallel-size x --pipeline-parallel-size (devices per replica)"
                if per_node else
                f"lower {count} or --tensor-parallel-size x --pipeline-parallel-size (devices per replica)")
    else:
        flag = "--replica-num-gpus" if key == "GPU" else "--replica-resources"
        what = f"lower {flag}" if per_node else f"lower {count} or {flag}"
    return what + ", or join a bigger cluster with --ray-address"


def _floor(x: float) -> float:
    return max(0.0, math.floor(x * 100 + _EPS) / 100)


def _num(x: float) -> str:
    return f"{x:g}"


def _bundle_text(bundle: dict) -> str:
    return "{" + ", ".join(f"{k}: {_num(v)}" for k, v in bundle.items()) + "}"
