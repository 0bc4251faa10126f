"""``tessellm serve --ray``: the Serve app from the serve flags, run until Ctrl-C or SIGTERM.

Without ``--ray-address`` it starts a local Ray cluster; with one it joins that cluster and,
on exit, deletes only its own application. Either way exiting drains: Serve stops routing to
the replicas and lets their requests in flight finish (``graceful_shutdown_timeout_s``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import signal
import threading

logger = logging.getLogger("tessellm.serve")

APP_NAME = "tessellm"


def add_ray_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("ray serve (with --ray)")
    g.add_argument("--ray", action="store_true", help="serve through Ray Serve: engine replicas "
                   "behind an OpenAI ingress (docs/ray_serve.md)")
    g.add_argument("--ray-address", default=None,
                   help="join this Ray cluster (default: start a local one)")
    g.add_argument("--num-replicas", type=int, default=1, help="engine replicas (without autoscaling)")
    g.add_argument("--min-replicas", type=int, default=None, help="autoscaling: fewest replicas")
    g.add_argument("--max-replicas", type=int, default=None,
                   help="autoscaling: most replicas (setting it turns autoscaling on)")
    g.add_argument("--target-ongoing-requests", type=float, default=32.0,
                   help="autoscaling: requests in flight per replica to aim for")
    g.add_argument("--replica-num-cpus", type=float, default=1.0, help="CPUs reserved per replica")
    g.add_argument("--replica-num-gpus", type=float, default=None,
                   help="GPUs per replica (default: from --device; 1 for cuda/rocm/xpu)")
    g.add_argument("--replica-resources", type=json.loads, default=None, metavar="JSON",
                   help='custom Ray resources per replica, e.g. \'{"TPU": 1}\'')
    g.add_argument("--max-ongoing-requests", type=int, default=256,
                   help="requests one replica takes at once; Serve queues the rest")
    g.add_argument("--prefix-affinity", action=argparse.BooleanOptionalAction, default=True,
                   help="route shared prompt prefixes to the replica that caches them")
    g.add_argument("--imbalance-threshold", type=int, default=8,
                   help="leave a prefix's replica when it has this many more requests in flight "
                   "than the least-loaded one")


def config_from_args(args: argparse.Namespace, server_config) -> dict:
    """The app's config dict (config.py) from parsed ``tessellm serve`` flags."""
    from tessellm.entrypoints.serve import engine_args_from

    engine = dataclasses.asdict(engine_args_from(args, args.model))
    engine.pop("model")
    server = dataclasses.asdict(server_config)
    server.pop("open_paths")
    config = {"model": args.model, "engine": engine, "server": server,
              "num_replicas": args.num_replicas,
              "replica": {"num_cpus": args.replica_num_cpus, "num_gpus": args.replica_num_gpus,
                          "resources": args.replica_resources or {},
                          "max_ongoing_requests": args.max_ongoing_requests},
              "router": {"prefix_affinity": args.prefix_affinity,
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


def run_ray_serve(args: argparse.Namespace, server_config) -> int:
    import ray
    from ray import serve

    from tessellm.entrypoints.ray_serve.app import build_app

    config = config_from_args(args, server_config)
    if args.ray_address:
        ray.init(address=args.ray_address)
    else:
        ray.init(include_dashboard=False)
    try:
        resolve_auto_device(config, ray.cluster_resources())
        serve.start(http_options={"host": args.host, "port": args.port})
        serve.run(build_app(config), name=APP_NAME, route_prefix="/")
        logger.info("Serving %s through Ray Serve on http://%s:%d (%s)", server_config.model_name,
                    args.host, args.port, _replicas_text(config))
        _wait_for_stop()
    finally:
        logger.info("Draining and stopping the Serve application...")
        if args.ray_address:
            serve.delete(APP_NAME)
        else:
            serve.shutdown()
        ray.shutdown()
    return 0


def _replicas_text(config: dict) -> str:
    a = config.get("autoscaling")
    if a:
        return f"autoscaling {a['min_replicas']}..{a['max_replicas']} replicas"
    return f"{config['num_replicas']} replica(s)"


def _wait_for_stop() -> None:
    stop = threading.Event()
    previous = signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        while not stop.wait(1.0):
            pass
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGTERM, previous)
