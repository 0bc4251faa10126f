"""A Ray Serve fleet for the tests: a local Ray cluster (2 logical CPUs) serving the tessellm
app, shared by test_ray_serve_app.py and test_ray_serve_lora.py; ``free_port`` and ``REPO``
also serve test_ray_serve_launcher.py."""

from __future__ import annotations

import contextlib
import os
import socket
import time
from typing import Iterator

import httpx

import tessellm

REPO = os.path.dirname(os.path.dirname(os.path.abspath(tessellm.__file__)))  # this tree


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serve_fleet(config: dict) -> Iterator[str]:
    """``build_app(config)`` at ``/`` on a fresh local Ray cluster; yields its URL once
    ``/ready`` answers 200 (the replicas' engines warm up after ``serve.run`` returns), or after
    300 s. The workers import this tree (``PYTHONPATH``, restored on exit); Serve and Ray shut
    down on exit."""
    import ray
    from ray import serve

    from tessellm.entrypoints.ray_serve import build_app

    old_path = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (REPO, old_path) if p)  # workers import this tree
    port = free_port()
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
             object_store_memory=256 << 20)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_app(config), name="tessellm", route_prefix="/")
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 300
        while httpx.get(f"{url}/ready", timeout=30).status_code != 200 and time.monotonic() < deadline:
            time.sleep(1)
        yield url
    finally:
        serve.shutdown()
        ray.shutdown()
        if old_path is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = old_path
