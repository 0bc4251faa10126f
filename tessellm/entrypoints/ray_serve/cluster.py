"""The Ray cluster ``tessellm serve --ray`` runs on: a local one it starts, or one it joins.

A local cluster is started with the dashboard (Ray's state API, ``serve status``, ``ray list
actors``; ``--no-ray-dashboard`` turns it off) and with Ray's default authentication for a
cluster ``ray.init`` starts: token auth, the token in ``~/.ray/auth_token`` (set
``RAY_AUTH_MODE=disabled`` before launching to opt out). ``tools_hint()`` prints the commands.
Joining a cluster sends this machine's token when it has one (``~/.ray/auth_token``).

Stopping a local cluster stops every process it started, none left behind: Ray's own shutdown
first, then whatever of the launcher's process tree (GCS, raylet, dashboard, agents, workers,
engine cores) is still alive after ``_EXIT_WAIT_S`` is terminated, then killed. A joined cluster
is left running; the launcher only deletes its own application.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Optional

logger = logging.getLogger("tessellm.serve")

_EXIT_WAIT_S = 10.0  # how long Ray's processes get to exit by themselves after ray.shutdown()


@dataclass
class RayCluster:
    started: bool  # True: this process started it, and stop() stops all of it
    gcs_address: str  # what `ray status --address` / `ray.init(address=...)` take
    dashboard_url: Optional[str]  # what `serve status -a` / `ray list actors --address` take

    def tools_hint(self) -> str:
        """The Ray CLI commands that work against this cluster, one per line."""
        env = "RAY_AUTH_MODE=token " if os.environ.get("RAY_AUTH_MODE", "").lower() == "token" else ""
        lines = [f"{env}ray status --address {self.gcs_address}"]
        if self.dashboard_url:
            url = self.dashboard_url if "://" in self.dashboard_url else f"http://{self.dashboard_url}"
            lines += [f"{env}ray list actors --address {url}", f"{env}serve status -a {url}"]
        else:
            lines.append("(dashboard off: `ray list ...` and `serve status` need it; drop --no-ray-dashboard)")
        return "\n".join(lines)

    def stop(self) -> None:
        import ray

        if not self.started:
            ray.shutdown()
            return
        tree = _descendants()
        try:
            ray.shutdown()
        except Exception as exc:  # noqa: BLE001 - whatever Ray left, the reaping below stops
            logger.warning("ray.shutdown() failed: %r", exc)
        left = _reap(tree)
        if left:
            logger.warning("Stopped %d Ray process(es) that outlived ray.shutdown(): %s", len(left),
                           ", ".join(left))


def start_or_join(address: Optional[str], dashboard: bool = True, dashboard_port: Optional[int] = None,
                  temp_dir: Optional[str] = None) -> RayCluster:
    """Join the cluster at ``address`` or start a local one (this machine's CPUs and GPUs)."""
    import ray

    if address:
        _token_auth_if_available()
        ctx = ray.init(address=address, log_to_driver=False)
        return RayCluster(False, ctx.address_info["gcs_address"], ctx.dashboard_url or None)
    kwargs = {"_temp_dir": os.path.abspath(temp_dir)} if temp_dir else {}
    try:
        ctx = ray.init(address="local", include_dashboard=dashboard, dashboard_port=dashboard_port,
                       log_to_driver=False, **kwargs)
    except BaseException:
        _reap(_descendants(), wait_s=2.0)  # a half-started cluster leaves nothing behind either
        raise
    return RayCluster(True, ctx.address_info["gcs_address"], ctx.dashboard_url or None)


def _token_auth_if_available() -> None:
    """Joining: send this machine's Ray token if it has one (a cluster without auth ignores it;
    one with auth refuses a client without it). ``RAY_AUTH_MODE``, when set, decides."""
    if "RAY_AUTH_MODE" in os.environ:
        return
    try:
        from ray._private.authentication.authentication_token_setup import (
            maybe_enable_token_auth_if_token_available)
    except ImportError:  # a Ray without token auth
        return
    maybe_enable_token_auth_if_token_available(warn_if_disabled=False)


def _descendants() -> list:
    import psutil

    try:
        return psutil.Process().children(recursive=True)
    except psutil.Error:
        return []


def _reap(procs: list, wait_s: float = _EXIT_WAIT_S) -> list[str]:
    """Wait for ``procs`` to exit; terminate, then kill, the rest. Returns what had to be stopped."""
    import psutil

    _, alive = psutil.wait_procs(procs, timeout=wait_s)
    names = []
    for p in alive:
        try:
            names.append(f"{p.name()} ({p.pid})")
            p.terminate()
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(alive, timeout=3.0)
    for p in alive:
        try:
            p.kill()
        except psutil.Error:
            pass
    return names
