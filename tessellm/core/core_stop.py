"""How the engine core process stops: through ``EngineCore.shutdown()``, on every exit path,
within the time its parent gives it.

``EngineCore.shutdown()`` is what writes the KV connector's saves under way (else they die with
their daemon threads, leaving ``.tmp`` files), ends the LoRA loader and stops the worker processes
(TP/PP ranks, whose own KV saves are written as they exit). The core process
(``engine_process.run_engine_core``) runs it after its loop, whichever way the loop ended: the
``shutdown`` message, the parent gone, an error in warm-up or the loop, or SIGTERM (``StopSignal``:
the loop ends between steps, warm-up at once; the core then stops as on an error: ``dead``).

Invariant: the core never outlives its parent's patience, and its shutdown is never cut short
by the parent while it keeps to its bound::

    parent (EngineCoreClient.close)                    core
      ["shutdown"] ------------------------------------> loop ends
      join, at most CLOSE_WAIT_S (= SHUTDOWN_BOUND_S + 2)  EngineCore.shutdown(), at most
                                                            SHUTDOWN_BOUND_S, then exit
      still running: SIGTERM ---------------------------> still in its loop: it ends after the
                                                            step, shutdown at most TERM_BOUND_S;
                                                            already shutting down: ignored
      join, at most ipc.TERMINATE_GRACE_S (> TERM_BOUND_S), then SIGKILL

A shutdown that overruns its bound (a store or a worker that hangs) is left to its daemon
thread: the process exits without it.

SIGINT (a terminal's Ctrl-C, sent to the whole process group) is ignored by the core and its
workers (``distributed/spawn.py``): the parent stops them through the ``shutdown`` message, as
above, whether it is a server draining or an ``LLM`` script ending on its KeyboardInterrupt
(``core/ipc.py``: the farewell of a client released without its close).
"""

from __future__ import annotations

import logging
import signal
import threading

from tessellm.core.ipc import TERMINATE_GRACE_S

logger = logging.getLogger(__name__)

SHUTDOWN_BOUND_S = 8.0  # EngineCore.shutdown() in the core process, at most
TERM_BOUND_S = TERMINATE_GRACE_S - 1.0  # ... after a SIGTERM, within the grace before the kill
CLOSE_WAIT_S = SHUTDOWN_BOUND_S + 2.0  # how long EngineCoreClient.close waits before SIGTERM


class CoreTerminated(BaseException):
    """The core process got SIGTERM: it stops as on an error (``dead``), through its shutdown."""


class StopSignal:
    """What SIGTERM does in the core's main thread: during warm-up it raises ``CoreTerminated``
    at once; once the loop runs (``interrupt`` off) it only sets ``requested``, which the loop
    checks between steps (raised mid-step it could cut a KV save's bookkeeping in half, and the
    shutdown would then wait for a save that never ends). Once ``begun`` (the shutdown under
    way), it does nothing. Either way ``bound``, the shutdown's time, shrinks to what is left
    of the grace before the kill."""

    def __init__(self):
        self.interrupt = True
        self.requested = False
        self.begun = False
        self.bound = SHUTDOWN_BOUND_S

    def install(self) -> None:
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, self._on_sigterm)

    def check(self) -> None:
        """Raise ``CoreTerminated`` if SIGTERM arrived (the loop ended for it)."""
        if self.requested:
            raise CoreTerminated("The engine core process got SIGTERM; it shuts down.")

    def _on_sigterm(self, signum, frame) -> None:
        if self.begun or self.requested:
            return
        self.requested = True
        self.bound = TERM_BOUND_S
        if self.interrupt:
            self.check()


def shut_down(core, bound: float) -> None:
    """``core.shutdown()``, waited for ``bound`` seconds at most: on a daemon thread of its own,
    so that a store or a worker that hangs does not keep the process from exiting."""
    thread = threading.Thread(target=_shutdown_logged, args=(core,), name="tessellm-core-shutdown",
                              daemon=True)
    thread.start()
    thread.join(bound)
    if thread.is_alive():
        logger.warning("The engine core's shutdown did not finish within %.0f s; the process exits "
                       "without it (a KV store or a worker that hangs).", bound)


def _shutdown_logged(core) -> None:
    try:
        core.shutdown()
    except Exception:  # noqa: BLE001 - the process exits all the same
        logger.exception("The engine core's shutdown failed.")
