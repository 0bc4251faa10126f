"""The server's lifecycle: warming up -> ready -> draining -> exit.

* Warming up: the engine core runs its warm-up (``tessellm.core.warmup``); ``/health`` answers
  200 (liveness), ``/ready`` 503 with ``Retry-After``; requests sent meanwhile queue and run once
  it ends.
* Ready: ``/ready`` 200.
* Draining, on the first SIGTERM or SIGINT: every new request (and ``/ready``) gets 503 with
  ``Retry-After``, while the listening socket stays open, so a load balancer sees a clean refusal,
  not a reset; requests in flight (streams included) run to their end, for at most
  ``--shutdown-timeout`` seconds; then uvicorn closes the connections, the engine core stops and
  the process exits: 0 after SIGTERM, 130 after SIGINT (Ctrl-C, as a shell reports one; the
  engine core and its workers ignore the terminal's SIGINT and are stopped by this process:
  ``distributed/spawn.py``). A second signal exits at once (its requests cut short), the engine
  core still stopped through its shutdown.

``in_flight`` counts requests inside the app (a stream until its last byte), kept by the edge
middleware; ``background`` the background responses (``background: true`` at /v1/responses)
still running, which a drain waits for too. While draining, ``GET`` / ``DELETE
/v1/responses/{id}`` and ``POST /v1/responses/{id}/cancel`` are still served (they start no
work), so a background response's client can read its result, or stop it.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from dataclasses import dataclass

logger = logging.getLogger("tessellm.serve")


@dataclass
class Lifecycle:
    draining: bool = False
    stopped_by: int = 0  # the signal that began the drain (0: none)
    in_flight: int = 0
    background: int = 0  # background responses still running (responses/background.py)
    retry_after_s: int = 5  # what a refused client is told to wait


def draining_server(uvicorn_config, lifecycle: Lifecycle, shutdown_timeout: float):
    """A ``uvicorn.Server`` whose first SIGTERM/SIGINT drains instead of closing at once."""
    import uvicorn

    class DrainingServer(uvicorn.Server):
        def handle_exit(self, sig, frame) -> None:
            if lifecycle.draining or self.should_exit:  # a second signal: the usual fast exit
                return super().handle_exit(sig, frame)
            lifecycle.draining = True
            lifecycle.stopped_by = sig
            logger.info("Got %s: draining (no new requests; %d in flight, up to %.0fs).",
                        signal.Signals(sig).name, lifecycle.in_flight, shutdown_timeout)
            loop = asyncio.get_event_loop()
            loop.call_soon_threadsafe(lambda: loop.create_task(self._drain()))

        async def _drain(self) -> None:
            deadline = time.monotonic() + shutdown_timeout
            while (lifecycle.in_flight or lifecycle.background) and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            if lifecycle.in_flight or lifecycle.background:
                logger.warning("%d request(s) and %d background response(s) still running after "
                               "--shutdown-timeout %.0fs; closing them.", lifecycle.in_flight,
                               lifecycle.background, shutdown_timeout)
            else:
                logger.info("Drained; shutting down.")
            self.should_exit = True

    return DrainingServer(uvicorn_config)
