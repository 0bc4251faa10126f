"""The Serve application: an ingress deployment in front of an engine deployment.

::

    HTTP --> Serve proxy --> TessellmIngress (FastAPI, forwards)  --handle, stream=True-->
             TessellmEngine replica 1..N (AsyncLLM + the OpenAI app), chosen by
             PrefixAffinityRouter, on the replicas' reported engine load (router.balance) and
             prefix affinity (or Serve's default router when router.prefix_affinity=false)

``build_app(args)`` is the import path Serve runs
(``tessellm.entrypoints.ray_serve:build_app``); ``args`` is the dict config.py documents.
"""

from __future__ import annotations

from ray import serve
from ray.serve.config import RequestRouterConfig

from tessellm.entrypoints.ray_serve.config import RayServeConfig, config_to_dict, parse_config
from tessellm.entrypoints.ray_serve.engine_replica import EngineReplica
from tessellm.entrypoints.ray_serve.ingress import OpenAIIngress
from tessellm.entrypoints.ray_serve.prefix_router import ROUTER_CLASS_PATH
from tessellm.entrypoints.ray_serve.resources import DEFAULT_INGRESS_CPUS, ClusterView, fit_defaults

ENGINE_DEPLOYMENT = "TessellmEngine"
INGRESS_DEPLOYMENT = "TessellmIngress"
ENGINE_SECTIONS = ("model", "engine", "server")
INGRESS_SECTIONS = ("model", "engine", "server", "router", "ingress")


def build_app(args: dict | None = None) -> serve.Application:
    """The application for ``serve run`` / a Serve config file / ``tessellm serve --ray``.

    CPUs left unset are fitted to the cluster's total resources (resources.py), so a redeploy
    asks for the same. The ingress's ``user_config`` ``{draining: false}`` may be set true in a
    Serve config file (a light update) to drain it (ingress.py)."""
    config = parse_config(args)
    if config.replica.num_cpus is None or config.ingress.num_cpus is None:
        fit_defaults(config, _cluster_totals())
    # Each deployment gets only the plain data it reads, so changing replica counts or
    # autoscaling is a light update (no restart): Serve restarts replicas when bind args change.
    engine_part = config_to_dict(config, ENGINE_SECTIONS)
    ingress_part = config_to_dict(config, INGRESS_SECTIONS)
    engine = serve.deployment(**engine_options(config))(EngineReplica).bind(engine_part)
    ingress = serve.deployment(**ingress_options(config), user_config={"draining": False})
    return ingress(OpenAIIngress).bind(engine, ingress_part)


def _cluster_totals() -> ClusterView:
    """The connected cluster's total resources; none known: the documented fixed defaults."""
    import ray

    if not ray.is_initialized():
        return ClusterView(free={"CPU": 10 * DEFAULT_INGRESS_CPUS})  # replica 1 CPU, ingress 0.5
    nodes = [dict(n["Resources"]) for n in ray.nodes() if n.get("Alive")]
    return ClusterView(free=dict(ray.cluster_resources()), nodes=nodes)


def engine_options(config: RayServeConfig) -> dict:
    r = config.replica
    opts = dict(name=ENGINE_DEPLOYMENT, ray_actor_options=config.replica_actor_options(),
                max_ongoing_requests=r.max_ongoing_requests, max_queued_requests=r.max_queued_requests,
                graceful_shutdown_timeout_s=r.graceful_shutdown_timeout_s,
                graceful_shutdown_wait_loop_s=r.graceful_shutdown_wait_loop_s,
                health_check_period_s=r.health_check_period_s,
                health_check_timeout_s=r.health_check_timeout_s)
    if config.autoscaling is not None:
        opts["autoscaling_config"] = config.autoscaling.to_serve()
    else:
        opts["num_replicas"] = config.num_replicas
    if config.router.prefix_affinity:
        rt = config.router
        opts["request_router_config"] = RequestRouterConfig(
            request_router_class=ROUTER_CLASS_PATH,
            request_router_kwargs={"prefix_affinity": True, "imbalance_threshold": rt.imbalance_threshold,
                                   "max_entries_per_replica": rt.max_entries_per_replica,
                                   "balance": rt.balance, "chunk_tokens": rt.chunk_tokens},
            # The replicas' load reports (EngineReplica.record_routing_stats) reach the routers
            # this often; a report that does not answer within the timeout is skipped.
            request_routing_stats_period_s=rt.load_report_period_s,
            request_routing_stats_timeout_s=max(5.0, 2 * rt.load_report_period_s))
    return opts


def ingress_options(config: RayServeConfig) -> dict:
    i = config.ingress
    return dict(name=INGRESS_DEPLOYMENT, num_replicas=i.num_replicas,
                ray_actor_options={"num_cpus": i.num_cpus if i.num_cpus is not None else DEFAULT_INGRESS_CPUS},
                max_ongoing_requests=i.max_ongoing_requests,
                graceful_shutdown_timeout_s=i.graceful_shutdown_timeout_s)
