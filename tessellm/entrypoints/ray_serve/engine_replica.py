"""One engine replica of the Serve app: an ``AsyncLLM`` and the OpenAI app of ``tessellm serve``.

Each replica is a Ray actor placed where its resources are (config.py: GPUs for cuda/rocm/xpu,
"TPU" for tpu, CPUs only for cpu). It starts the engine core in a child process, exactly as the
plain server does, and answers forwarded HTTP requests through the same FastAPI app
(asgi_bridge.py), so parsing, validation, errors and SSE are shared, not re-implemented.

Lifecycle, as Serve drives it:

* ``__init__`` (async): start the engine (loads the model) and wait for its warm-up; Serve routes
  nothing here until it returns, so a replica takes traffic only once it is warm (ready means
  warm, as the plain server's ``/ready``).
* ``check_health`` (every ``health_check_period_s``): raises once the engine core is dead, so
  Serve replaces the replica; its requests in flight have already failed with a 503.
* stopping (scale-down, redeploy, shutdown): Serve stops routing here, waits up to
  ``graceful_shutdown_timeout_s`` for the requests in flight (streams included) to finish,
  then calls ``__del__``, which stops the engine core.
"""

from __future__ import annotations

import logging
import os
from typing import Optional

from tessellm.entrypoints.ray_serve.asgi_bridge import ForwardedRequest, stream_asgi
from tessellm.entrypoints.ray_serve.config import parse_config

logger = logging.getLogger(__name__)

REPLICA_HEADER = b"x-tessellm-replica"  # on every response: which replica answered


class EngineReplica:
    async def __init__(self, config: dict):  # Serve awaits an async constructor
        from ray import serve

        from tessellm.entrypoints.async_llm import AsyncLLM
        from tessellm.entrypoints.openai.api_server import build_app

        cfg = parse_config(config, check_resources=False)
        self.replica_id = serve.get_replica_context().replica_id.unique_id
        self.engine = AsyncLLM(cfg.engine_args())
        self.app = build_app(self.engine, cfg.server_config())
        self.in_flight = 0
        await self.engine.wait_until_warm()  # EngineDeadError if the core died: Serve retries
        logger.info("tessellm engine replica %s ready and warm (pid %d)", self.replica_id, os.getpid())

    async def handle_http(self, request: ForwardedRequest, prefix_hashes: Optional[list] = None):
        """Stream one HTTP request's response (``prefix_hashes`` is for the router only)."""
        self.in_flight += 1
        try:
            async for item in stream_asgi(self.app, request):
                if item[0] == "start":
                    item = (item[0], item[1], item[2] + [(REPLICA_HEADER, self.replica_id.encode())])
                yield item
        finally:
            self.in_flight -= 1

    async def replica_info(self, prefix_hashes: Optional[list] = None) -> dict:
        """Who this replica is and its engine's counters (fresh from the core when alive)."""
        stats = self.engine.stats
        if self.engine_alive():
            try:
                stats = await self.engine.call("stats", timeout=5.0)
            except Exception:  # noqa: BLE001 - the last known counters will do
                pass
        return {"replica_id": self.replica_id, "pid": os.getpid(),
                "engine_pid": self.engine.client.proc.pid, "engine_alive": self.engine_alive(),
                "in_flight": self.in_flight, "stats": dict(stats)}

    def engine_alive(self) -> bool:
        return not self.engine.is_dead and self.engine.client.is_alive()

    def check_health(self) -> None:
        if not self.engine_alive():
            raise RuntimeError(f"The engine core of replica {self.replica_id} is dead "
                               f"({self.engine.dead_reason or 'exited'}); Serve will replace it.")

    async def __del__(self):
        engine = getattr(self, "engine", None)
        if engine is not None:
            await engine.shutdown()
