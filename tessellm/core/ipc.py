"""What the parent side of a process boundary owns: a ZeroMQ context, its sockets, children.

The engine client (``engine_process.EngineCoreClient``) and the multiprocessing executor each
hold one ``ParentEndpoints``. Their ``close``/``shutdown`` stop the children gracefully, then
call ``release()``. An owner that is garbage-collected without that (say an engine whose worker
died, dropped by the user) is released all the same through ``weakref.finalize``: its callback
runs before any ``__del__`` of the same garbage, while every socket is still open to be closed.
Left to pyzmq, ``Context.__del__`` would run ``term()`` with sockets whose weak references the
collector had already cleared, so it could not close them and waited for them forever (a test
session hung that way, at a ``gc`` pass inside an unrelated import).

That path (the owner collected, or the program ending without its close: an uncaught Ctrl-C's
``KeyboardInterrupt`` in ``LLM(...).generate``) first says the owner's ``farewell``: the
children's own stop command, then a bounded wait for them to exit by themselves, so they stop
through their normal path (a KV connector's saves written) rather than terminated mid-write.
Once the owner's own stop has begun (``stopping()``: its close asked the children and waits
its own bound) there is no farewell: a second wait would stretch that bound.
"""

from __future__ import annotations

import multiprocessing
import shutil
import time
import weakref
from typing import Optional

import zmq


class ParentEndpoints:
    def __init__(self, owner: object, tmpdir: Optional[str] = None):
        self.ctx = zmq.Context()
        self.ctx.setsockopt(zmq.LINGER, 0)  # closing never waits on a peer that is gone
        self._sockets: list[zmq.Socket] = []
        self._procs: list[multiprocessing.process.BaseProcess] = []
        self._farewell: dict = {}  # what the finalizer says to the children first (farewell())
        self._release = weakref.finalize(owner, _release, self.ctx, self._sockets, self._procs,
                                         tmpdir, self._farewell)

    def socket(self, kind: int, bind: Optional[str] = None) -> zmq.Socket:
        sock = self.ctx.socket(kind)
        self._sockets.append(sock)
        if bind is not None:
            sock.bind(bind)
        return sock

    def adopt(self, proc: multiprocessing.process.BaseProcess) -> None:
        """A child process to stop (terminate, then kill) if it still runs at release."""
        self._procs.append(proc)

    def farewell(self, sockets: list, message: bytes, wait_s: float) -> None:
        """Should the owner be released without its close (module docstring): send ``message``
        (the children's stop command) on each of ``sockets``, then wait up to ``wait_s`` seconds
        for the adopted children to exit, before they are terminated."""
        self._farewell.update(sockets=list(sockets), message=message, wait_s=wait_s)

    def stopping(self) -> None:
        """The owner's close has asked the children to stop: no farewell from now on."""
        self._farewell.clear()

    def release(self) -> None:
        """Stop the adopted children still running, close the sockets, end the context, remove
        the temporary directory. Idempotent. (Called by the owner's close: no farewell.)"""
        self.stopping()
        self._release()


# How long a terminated (SIGTERM) child has to exit before it is killed. An engine core spends
# less than this on its shutdown after a SIGTERM (engine_process.py).
TERMINATE_GRACE_S = 5.0


def stop_processes(procs: list, timeout: float = TERMINATE_GRACE_S) -> None:
    """Terminate the children still running, then kill the ones that do not exit in time."""
    for proc in procs:
        if proc.exitcode is None:
            proc.terminate()
    for proc in procs:
        proc.join(timeout=timeout)
        if proc.exitcode is None:
            proc.kill()
            proc.join(timeout=timeout)


def _release(ctx: zmq.Context, sockets: list, procs: list, tmpdir: Optional[str],
             farewell: dict) -> None:
    _say_farewell(procs, farewell)
    stop_processes(procs)
    for sock in sockets:
        sock.close(linger=0)
    ctx.term()
    if tmpdir is not None:
        shutil.rmtree(tmpdir, ignore_errors=True)


def _say_farewell(procs: list, farewell: dict) -> None:
    """``ParentEndpoints.farewell``'s message, then its wait, if any child still runs."""
    alive = [proc for proc in procs if proc.exitcode is None]
    if not alive or not farewell:
        return
    for sock in farewell["sockets"]:
        try:
            sock.send(farewell["message"], zmq.NOBLOCK)
        except zmq.ZMQError:  # a peer gone or a full queue: the wait below ends at once then
            pass
    deadline = time.monotonic() + farewell["wait_s"]
    for proc in alive:
        proc.join(max(0.0, deadline - time.monotonic()))
