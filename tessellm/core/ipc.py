"""What the parent side of a process boundary owns: a ZeroMQ context, its sockets, children.

The engine client (``engine_process.EngineCoreClient``) and the multiprocessing executor each
hold one ``ParentEndpoints``. Their ``close``/``shutdown`` stop the children gracefully, then
call ``release()``. An owner that is garbage-collected without that (say an engine whose worker
died, dropped by the user) is released all the same through ``weakref.finalize``: its callback
runs before any ``__del__`` of the same garbage, while every socket is still open to be closed.
Left to pyzmq, ``Context.__del__`` would run ``term()`` with sockets whose weak references the
collector had already cleared, so it could not close them and waited for them forever (a test
session hung that way, at a ``gc`` pass inside an unrelated import).
"""

from __future__ import annotations

import multiprocessing
import shutil
import weakref
from typing import Optional

import zmq


class ParentEndpoints:
    def __init__(self, owner: object, tmpdir: Optional[str] = None):
        self.ctx = zmq.Context()
        self.ctx.setsockopt(zmq.LINGER, 0)  # closing never waits on a peer that is gone
        self._sockets: list[zmq.Socket] = []
        self._procs: list[multiprocessing.process.BaseProcess] = []
        self._release = weakref.finalize(owner, _release, self.ctx, self._sockets, self._procs,
                                         tmpdir)

    def socket(self, kind: int, bind: Optional[str] = None) -> zmq.Socket:
        sock = self.ctx.socket(kind)
        self._sockets.append(sock)
        if bind is not None:
            sock.bind(bind)
        return sock

    def adopt(self, proc: multiprocessing.process.BaseProcess) -> None:
        """A child process to stop (terminate, then kill) if it still runs at release."""
        self._procs.append(proc)

    def release(self) -> None:
        """Stop the adopted children still running, close the sockets, end the context, remove
        the temporary directory. Idempotent."""
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


def _release(ctx: zmq.Context, sockets: list, procs: list, tmpdir: Optional[str]) -> None:
    stop_processes(procs)
    for sock in sockets:
        sock.close(linger=0)
    ctx.term()
    if tmpdir is not None:
        shutil.rmtree(tmpdir, ignore_errors=True)
