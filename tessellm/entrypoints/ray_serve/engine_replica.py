"""One engine replica of the Serve app: an ``AsyncLLM`` and the OpenAI app of ``tessellm serve``.

Each replica is a Ray actor placed where its resources are (config.py: GPUs for cuda/rocm/xpu,
"TPU" for tpu, CPUs only for cpu). It starts the engine core in a child process, exactly as the
plain server does, and answers forwarded HTTP requests through the same FastAPI app
(asgi_bridge.py), so parsing, validation, errors and SSE are shared, not re-implemented.

Lifecycle, as Serve drives it:

* ``__init__`` (async): start the engine (loads the model) and wait for its warm-up; Serve routes
  nothing here until it returns, so a replica takes traffic only once it is warm (ready means
  warm, as the plain server's ``/ready``).
* ``record_routing_stats`` (every ``router.load_report_period_s``): the engine's load figures,
  which Serve hands to every router (replica_load.py).
* ``check_health`` (every ``health_check_period_s``): raises once the engine core is dead, so
  Serve replaces the replica; its requests in flight have already failed with a 503.
* stopping (scale-down, redeploy, shutdown): Serve stops routing here, waits up to
  ``graceful_shutdown_timeout_s`` for the requests in flight (streams included) to finish,
  then calls ``__del__``, which stops the engine core.

LoRA multiplexing (Ray Serve's model multiplexing): a request for a served adapter arrives with
the adapter as its multiplexed model id (the ingress sets it). The replica passes it to a
``serve.multiplexed`` loader (an LRU of ``engine.max_loras`` ids, the engine's slot count),
which is what makes Serve record the adapter on this replica and the routers prefer it. The
loader itself loads nothing: the engine reads the adapter off its step loop when the request
arrives (docs/lora.md), and its own LRU decides which adapters hold device slots.
"""

from __future__ import annotations

import logging
import os
from typing import Optional

from tessellm.entrypoints.ray_serve.asgi_bridge import ForwardedRequest, stream_asgi
from tessellm.entrypoints.ray_serve.config import parse_config
from tessellm.entrypoints.ray_serve.replica_load import load_report

logger = logging.getLogger(__name__)

REPLICA_HEADER = b"x-tessellm-replica"  # on every response: which replica answered


class EngineReplica:
    async def __init__(self, config: dict):  # Serve awaits an async constructor
        from ray import serve

        from tessellm.entrypoints.async_llm import AsyncLLM
        from tessellm.entrypoints.openai.api_server import build_app

        cfg = parse_config(config, check_resources=False)
        self.replica_id = serve.get_replica_context().replica_id.unique_id
        args, server = cfg.engine_args(), cfg.server_config()
        self.engine = AsyncLLM(args)
        self.app = build_app(self.engine, server)
        self.in_flight = 0
        self.in_flight_samples = 0  # the sequences those requests run (n each, per prompt)
        self.adapters, self.held_adapters, self._hold = _adapter_multiplexing(server, args)
        await self.engine.wait_until_warm()  # EngineDeadError if the core died: Serve retries
        logger.info("tessellm engine replica %s ready and warm (pid %d)", self.replica_id, os.getpid())

    async def handle_http(self, request: ForwardedRequest, prefix_hashes: Optional[list] = None,
                          num_samples: int = 1):
        """Stream one HTTP request's response (``prefix_hashes`` and ``num_samples``, the
        sequences it runs, are for the router; the latter counts in this replica's reports)."""
        samples = max(1, int(num_samples))
        self.in_flight += 1
        self.in_flight_samples += samples
        try:
            await self._hold_adapter()
            async for item in stream_asgi(self.app, request):
                if item[0] == "start":
                    item = (item[0], item[1], item[2] + [(REPLICA_HEADER, self.replica_id.encode())])
                yield item
        finally:
            self.in_flight -= 1
            self.in_flight_samples -= samples

    async def replica_info(self, prefix_hashes: Optional[list] = None) -> dict:
        """Who this replica is and its engine's counters (fresh from the core when alive)."""
        stats = self.engine.stats
        if self.engine_alive():
            try:
                stats = await self.engine.call("stats", timeout=5.0)
            except Exception:  # noqa: BLE001 - the last known counters will do
                pass
        return {"replica_id": self.replica_id, "pid": os.getpid(),
                "engine_pid": self.engine.cores.pids()[0], "engine_alive": self.engine_alive(),
                "in_flight": self.in_flight, "stats": dict(stats),
                "lora_adapters": sorted(self.held_adapters)}

    async def record_routing_stats(self) -> dict:
        """This replica's load report for the routers (replica_load.py: its engine's waiting and
        running requests, free slots and KV blocks, prefill ahead, and its requests in flight).
        Serve's controller calls it every ``router.load_report_period_s`` and hands the answer
        to every router as ``RunningReplica.routing_stats``; {} while the engine cannot answer
        (the routers then count this replica's requests as running: ``replica_score``)."""
        in_flight, samples = self.in_flight, self.in_flight_samples  # before the call: what
        # arrives meanwhile counts as new
        if not self.engine_alive():
            return {}
        try:
            stats = await self.engine.call("stats", timeout=5.0)
        except Exception:  # noqa: BLE001 - a missed report only ages the routers' view
            return {}
        return load_report(stats, in_flight, self.engine.info.block_size, samples)

    async def _hold_adapter(self) -> None:
        """Register this request's adapter with Serve's multiplexing (see the module docstring)."""
        if self._hold is None:
            return
        from ray import serve

        model_id = serve.get_multiplexed_model_id()
        if model_id in self.adapters:  # an unknown name is the app's 404, not Serve's business
            await self._hold(model_id)

    def engine_alive(self) -> bool:
        return not self.engine.is_dead and self.engine.cores.is_alive()

    def check_health(self) -> None:
        if not self.engine_alive():
            raise RuntimeError(f"The engine core of replica {self.replica_id} is dead "
                               f"({self.engine.dead_reason or 'exited'}); Serve will replace it.")

    async def __del__(self):
        engine = getattr(self, "engine", None)
        if engine is not None:
            await engine.shutdown()


class _HeldAdapter:
    """What the multiplexed loader returns; Serve calls ``__del__`` when its LRU drops it."""

    def __init__(self, name: str, held: set):
        self.name, self.held = name, held
        held.add(name)

    def __del__(self):
        self.held.discard(self.name)


def _adapter_multiplexing(server, args):
    """``(served adapter names, names Serve holds here, the serve.multiplexed loader)``;
    the loader is None without LoRA adapters."""
    from ray import serve

    from tessellm.entrypoints.openai.lora_modules import parse_lora_modules

    names = frozenset(name for name, _ in parse_lora_modules(server.lora_modules))
    held: set = set()
    if not names:
        return names, held, None
    max_loras = int(getattr(args, "max_loras", 0) or 1)

    async def hold(model_id: str) -> _HeldAdapter:
        return _HeldAdapter(model_id, held)

    return names, held, serve.multiplexed(max_num_models_per_replica=max_loras)(hold)
