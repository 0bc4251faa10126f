"""Stopping ``tessellm serve --ray``: signals in, requests drained, then everything stopped.

::

    SIGTERM / Ctrl-C (1st)  -> StopSignal.requested: deploying -> give up at once;
                               serving -> drain_ingress(): the ingress answers new requests 503
                               + Retry-After; in-flight requests and streams go on until none is
                               left, at most --shutdown-timeout
    SIGTERM / Ctrl-C (2nd)  -> StopSignal.hurry: stop waiting, shut down now
    then (launch.py)        -> serve.shutdown() (own cluster) or serve.delete(app) (joined),
                               and the cluster's processes stopped (cluster.py)
"""

from __future__ import annotations

import logging
import signal
import threading
import time

logger = logging.getLogger("tessellm.serve")

_POLL_S = 0.25


class Interrupted(Exception):
    """A stop signal arrived while the app was still deploying."""


class StopSignal:
    """SIGTERM and SIGINT set ``requested``, a second one ``hurry``; ``install`` in the main thread."""

    def __init__(self):
        self.requested = threading.Event()
        self.hurry = threading.Event()
        self._previous: dict = {}

    def install(self) -> "StopSignal":
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._on_signal)
        return self

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _on_signal(self, signum, _frame) -> None:
        if self.requested.is_set():
            self.hurry.set()
            logger.warning("%s again: not waiting for requests in flight any longer.",
                           signal.Signals(signum).name)
        else:
            self.requested.set()
            logger.info("%s: draining (a second one stops at once).", signal.Signals(signum).name)

    def check(self) -> None:
        if self.requested.is_set():
            raise Interrupted()


def drain_ingress(app_name: str, timeout_s: float, stop: StopSignal) -> bool:
    """Make the ingress refuse new requests and wait until none is in flight (True) or the
    timeout / a second signal (False)."""
    from ray import serve

    deadline = time.monotonic() + timeout_s
    try:
        handle = serve.get_app_handle(app_name)
        status = handle.drain.remote().result(timeout_s=min(30.0, timeout_s + 1))
        while status["in_flight"] > 0:
            if time.monotonic() >= deadline or stop.hurry.wait(_POLL_S):
                logger.warning("Shutting down with %d request(s) still in flight "
                               "(--shutdown-timeout %gs).", status["in_flight"], timeout_s)
                return False
            status = handle.drain_status.remote().result(timeout_s=30)
    except Exception as exc:  # noqa: BLE001 - an unreachable ingress has nothing to drain
        logger.warning("Could not drain the ingress (%r); shutting down.", exc)
        return False
    logger.info("Drained: no request in flight.")
    return True
