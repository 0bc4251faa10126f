"""``tessellm serve --ray``: the Serve app from the serve flags, run until Ctrl-C or SIGTERM.

::

    start a local Ray cluster (dashboard on) | join --ray-address      cluster.py
    fit CPUs to the cluster, check what is free, probe a placement     resources.py
        -> refused at once, or after --ray-schedule-timeout, naming the shortfall and the flag
    deploy, wait until RUNNING (a stop signal gives up at once)
    serve until SIGTERM / Ctrl-C, then drain (503 to new requests,      drain.py
        in-flight ones finish, at most --shutdown-timeout)
    serve.shutdown() + stop every Ray process started | serve.delete(app) on a joined cluster
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import time

logger = logging.getLogger("tessellm.serve")

APP_NAME = "tessellm"


def add_ray_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("ray serve (with --ray)")
    g.add_argument("--ray", action="store_true", help="serve through Ray Serve: engine replicas "
                   "behind an OpenAI ingress (docs/ray_serve.md)")
    g.add_argument("--ray-address", default=None,
                   help="join this Ray cluster, e.g. 10.0.0.5:6379 (default: start a local one)")
    g.add_argument("--ray-dashboard", action=argparse.BooleanOptionalAction, default=True,
                   help="start the local cluster with Ray's dashboard, so `serve status`, "
                   "`ray list actors` and the state API work")
    g.add_argument("--ray-dashboard-port", type=int, default=None,
                   help="the local dashboard's port (default: 8265, or the next free one; 0: any)")
    g.add_argument("--ray-temp-dir", default=None, help="the local cluster's temp/log directory "
                   "(default: Ray's, /tmp/ray)")
    g.add_argument("--ray-schedule-timeout", type=float, default=120.0, metavar="SECONDS",
                   help="give up if Ray cannot place the replicas within this long")
    g.add_argument("--num-replicas", type=int, default=1, help="engine replicas (without autoscaling)")
    g.add_argument("--min-replicas", type=int, default=None, help="autoscaling: fewest replicas")
    g.add_argument("--max-replicas", type=int, default=None,
                   help="autoscaling: most replicas (setting it turns autoscaling on)")
    g.add_argument("--target-ongoing-requests", type=float, default=32.0,
                   help="autoscaling: requests in flight per replica to aim for")
    g.add_argument("--replica-num-cpus", type=float, default=None, help="CPUs reserved per replica "
                   "(default: 1, or an equal share of the cluster's CPUs where that is less)")
    g.add_argument("--replica-num-gpus", type=float, default=None, help="GPUs per replica (default: "
                   "from --device: tensor x pipeline parallel size for cuda/rocm/xpu, 0 for cpu)")
    g.add_argument("--replica-resources", type=json.loads, default=None, metavar="JSON",
                   help='custom Ray resources per replica, e.g. \'{"TPU": 1}\'')
    g.add_argument("--max-ongoing-requests", type=int, default=256,
                   help="requests one replica takes at once; Serve queues the rest")
    g.add_argument("--prefix-affinity", action=argparse.BooleanOptionalAction, default=True,
                   help="route shared prompt prefixes to the replica that caches them")
    g.add_argument("--replica-balance", choices=("load", "in_flight"), default="load",
                   help="the router's load figure: load (each replica's reported engine queues, "
                   "scored 4 x queued + running as --data-parallel-balance load) or in_flight "
                   "(requests in flight at each replica)")
    g.add_argument("--imbalance-threshold", type=int, default=8,
                   help="leave a prefix's replica when its load figure is this much above the "
                   "least-loaded one's (load: score points, 8 = two queued requests; in_flight: "
                   "requests)")


def http_options(args: argparse.Namespace) -> dict:
    """Ray Serve's proxy settings (``serve.start(http_options=...)``) from ``tessellm serve``'s
    listener flags: --host, --port and HTTPS (--ssl-keyfile / --ssl-certfile / --ssl-ca-certs,
    which Serve's HTTPOptions takes). The listener flags Serve's proxy has no setting for are
    refused, never dropped: a server asked for HTTPS that answered plain HTTP would be worse."""
    from tessellm.entrypoints.serve import _ssl_options

    if getattr(args, "uds", None):
        raise ValueError("--uds: Ray Serve's proxies listen on TCP only (--host / --port); drop "
                         "--uds, or serve without --ray.")
    if getattr(args, "ssl_cert_reqs", 0):
        raise ValueError("--ssl-cert-reqs: Ray Serve's proxy has no such setting (it verifies client "
                         "certificates against --ssl-ca-certs when given); drop it, or serve without --ray.")
    if getattr(args, "ssl_ciphers", None):
        raise ValueError("--ssl-ciphers: Ray Serve's proxy has no such setting; drop it, or serve "
                         "without --ray.")
    options = {"host": args.host, "port": args.port}
    ssl = _ssl_options(args)  # the files checked as the plain server checks them
    if ssl:
        from ray.serve.config import HTTPOptions

        if "ssl_certfile" not in HTTPOptions.model_fields:
            import ray

            raise ValueError(f"--ssl-certfile: this Ray ({ray.__version__}) serves plain HTTP only; "
                             "upgrade Ray (`pip install -U \"ray[serve]\"`: its proxies take TLS "
                             "files), or terminate TLS in front of Serve.")
        options.update({k: v for k, v in ssl.items()
                        if k in ("ssl_keyfile", "ssl_certfile", "ssl_ca_certs") and v is not None})
    return options


def config_from_args(args: argparse.Namespace, server_config) -> dict:
    """The app's config dict (config.py) from parsed ``tessellm serve`` flags."""
    from tessellm.entrypoints.engine_args import engine_args_from
    from tessellm.entrypoints.vllm_args import parsed_vllm_args

    # --download-dir / --revision go to the replicas, each of which finds the repo's snapshot on
    # its own node (config.py engine_args): the head need not hold the weights.
    source = {k: v for k, v in parsed_vllm_args(args).items() if k in ("download_dir", "revision") and v}
    head = argparse.Namespace(**{k: v for k, v in vars(args).items()
                                 if k not in ("vllm__download_dir", "vllm__revision")})
    engine = dataclasses.asdict(engine_args_from(head, args.model))
    engine.pop("model")
    engine.update(source)
    server = dataclasses.asdict(server_config)
    server.pop("open_paths")
    server.pop("lora")  # built by each replica from lora_modules
    config = {"model": args.model, "engine": engine, "server": server,
              "num_replicas": args.num_replicas,
              "replica": {"num_cpus": args.replica_num_cpus, "num_gpus": args.replica_num_gpus,
                          "resources": args.replica_resources or {},
                          "max_ongoing_requests": args.max_ongoing_requests,
                          "graceful_shutdown_timeout_s": args.shutdown_timeout},
              "ingress": {"graceful_shutdown_timeout_s": args.shutdown_timeout},
              "router": {"prefix_affinity": args.prefix_affinity, "balance": args.replica_balance,
                         "imbalance_threshold": args.imbalance_threshold}}
    if args.max_replicas is not None:
        config["autoscaling"] = {"min_replicas": args.min_replicas if args.min_replicas is not None else 1,
                                 "max_replicas": args.max_replicas,
                                 "target_ongoing_requests": args.target_ongoing_requests}
    elif args.min_replicas is not None:
        raise ValueError("--min-replicas needs --max-replicas (which turns autoscaling on).")
    return config


def resolve_auto_device(config: dict, cluster_resources: dict) -> None:
    """``--device auto``: ask for a GPU (or TPU) per replica when the cluster has them."""
    replica = config["replica"]
    if config["engine"].get("device") != "auto" or replica["num_gpus"] is not None or replica["resources"]:
        return
    engine = config["engine"]
    world = int(engine.get("tensor_parallel_size", 1)) * int(engine.get("pipeline_parallel_size", 1))
    if cluster_resources.get("GPU", 0) > 0:
        replica["num_gpus"] = world
    elif cluster_resources.get("TPU", 0) > 0:
        replica["resources"] = {"TPU": world}
    else:
        replica["num_gpus"] = 0



class DeployFailed(RuntimeError):
    """Serve gave up on the application (a replica kept failing to start, say)."""


def run_ray_serve(args: argparse.Namespace, server_config) -> int:
    from tessellm.entrypoints.ray_serve.cluster import start_or_join
    from tessellm.entrypoints.ray_serve.drain import Interrupted, StopSignal, drain_ingress
    from tessellm.entrypoints.ray_serve.resources import ResourceShortfall

    config = config_from_args(args, server_config)
    http_options(args)  # its refusals before Ray starts
    stop = StopSignal().install()  # before Ray starts: a signal during start-up still cleans up
    cluster, serving = None, False
    try:
        cluster = start_or_join(args.ray_address, args.ray_dashboard, args.ray_dashboard_port,
                                args.ray_temp_dir)
        stop.install()  # ray.init() put in its own SIGTERM handler
        stop.check()
        config = fit_to_cluster(config, args.ray_schedule_timeout, stop)
        serving = True
        _deploy(config, args, stop)
        logger.info("Serving %s through Ray Serve on %s://%s:%d (%s). Ray's tools:\n%s",
                    server_config.model_name, "https" if getattr(args, "ssl_certfile", None) else "http",
                    args.host, args.port, _replicas_text(config),
                    cluster.tools_hint())
        while not stop.requested.wait(1.0):
            pass
        drain_ingress(APP_NAME, args.shutdown_timeout, stop)
        return 0
    except Interrupted:
        if _ingress_running():  # part of the fleet already answers: its requests finish too
            drain_ingress(APP_NAME, args.shutdown_timeout, stop)
        print("tessellm serve --ray: stopped before the application was fully up.", file=sys.stderr)
        return 1
    except ResourceShortfall as exc:
        print(f"tessellm serve --ray: {exc}", file=sys.stderr)
        return 2
    except DeployFailed as exc:
        print(f"tessellm serve --ray: {exc}", file=sys.stderr)
        return 1
    finally:
        _stop(cluster, serving, stop)
        stop.restore()


def fit_to_cluster(config: dict, schedule_timeout: float, stop) -> dict:
    """The config with CPUs fitted to the connected cluster; ResourceShortfall if it cannot fit."""
    import ray

    from tessellm.entrypoints.ray_serve.config import config_to_dict, parse_config
    from tessellm.entrypoints.ray_serve.resources import ClusterView, check_fit, describe, fit_defaults

    resolve_auto_device(config, ray.cluster_resources())
    cfg = parse_config(config)
    cluster = ClusterView.current()
    fit_defaults(cfg, cluster)
    check_fit(cfg, cluster)
    _probe_placement(cfg, schedule_timeout, stop)
    logger.info("Ray resources: %s", describe(cfg))
    return config_to_dict(cfg)


def _probe_placement(cfg, timeout_s: float, stop) -> None:
    """Ask Ray to place every bundle the app needs at once (a placement group, removed again),
    so fragmentation over nodes and resources others hold are caught before Serve waits forever."""
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group

    from tessellm.entrypoints.ray_serve.resources import (ResourceShortfall, describe, ingress_bundle,
                                                          replica_bundle, replicas_at_start)

    bundles = [replica_bundle(cfg)] * replicas_at_start(cfg) + [ingress_bundle(cfg)] * cfg.ingress.num_replicas
    bundles = [b for b in bundles if b]
    if not bundles:
        return
    pg = placement_group(bundles, strategy="PACK")
    deadline = time.monotonic() + timeout_s
    try:
        while not pg.wait(timeout_seconds=1):
            stop.check()
            if time.monotonic() >= deadline:
                free = {k: round(v, 2) for k, v in ray.available_resources().items()
                        if k in ("CPU", "GPU", "TPU") or k in cfg.replica.resources}
                raise ResourceShortfall(
                    f"Ray could not place {describe(cfg)} within --ray-schedule-timeout "
                    f"{timeout_s:g}s (free now: {free}); lower --num-replicas or the resources per "
                    "replica, free the cluster, or raise --ray-schedule-timeout.")
    finally:
        remove_placement_group(pg)


def _deploy(config: dict, args: argparse.Namespace, stop) -> None:
    """Deploy and wait until RUNNING; Serve's own failure or a stop signal ends the wait."""
    from ray import serve
    from ray.serve.schema import ApplicationStatus

    from tessellm.entrypoints.ray_serve.app import build_app
    from tessellm.entrypoints.ray_serve.resources import ResourceShortfall

    serve.start(http_options=http_options(args))
    serve.run_many([serve.RunTarget(build_app(config), name=APP_NAME, route_prefix="/")],
                   wait_for_ingress_deployment_creation=False, wait_for_applications_running=False)
    started = time.monotonic()
    while True:
        app = serve.status().applications.get(APP_NAME)
        if app is not None and app.status == ApplicationStatus.RUNNING:
            return
        if app is not None and app.status == ApplicationStatus.DEPLOY_FAILED:
            raise DeployFailed(f"Ray Serve could not deploy the application: {_messages(app)}")
        if app is not None and time.monotonic() - started > args.ray_schedule_timeout:
            stuck = [d.message for d in app.deployments.values() if "to be scheduled" in d.message]
            if stuck:
                raise ResourceShortfall(f"{stuck[0]} Lower --num-replicas or the resources per replica, "
                                        "or raise --ray-schedule-timeout.")
        if stop.requested.wait(0.5):
            stop.check()


def _ingress_running() -> bool:
    from ray import serve

    try:
        app = serve.status().applications.get(APP_NAME)
        ingress = app.deployments.get("TessellmIngress") if app is not None else None
        return bool(ingress and ingress.replica_states.get("RUNNING", 0))
    except Exception:  # noqa: BLE001 - Serve not started: nothing to drain
        return False


def _messages(app) -> str:
    parts = [app.message] + [f"{name}: {d.message}" for name, d in app.deployments.items() if d.message]
    return " ".join(p for p in parts if p)


def _stop(cluster, serving: bool, stop) -> None:
    """Serve down (gracefully unless told to hurry), then the Ray processes this run started."""
    from ray import serve

    if cluster is None:
        return
    try:
        if serving and not cluster.started:
            serve.delete(APP_NAME, _blocking=not stop.hurry.is_set())  # the cluster is not ours
        elif serving and not stop.hurry.is_set():
            logger.info("Stopping Ray Serve...")
            serve.shutdown()
    except Exception as exc:  # noqa: BLE001 - stopping goes on: the cluster is stopped below
        logger.warning("Stopping Serve failed: %r", exc)
    finally:
        cluster.stop()


def _replicas_text(config: dict) -> str:
    a = config.get("autoscaling")
    if a:
        return f"autoscaling {a['min_replicas']}..{a['max_replicas']} replicas"
    return f"{config['num_replicas']} replica(s)"
