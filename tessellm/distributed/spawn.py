"""Start tessellm's child processes (engine core, workers) from any main, fast.

**From any main.** ``multiprocessing``'s ``spawn`` makes each child re-run the parent's
``__main__`` (by path, or by module name under ``python -m``) so that functions defined there can
be unpickled. Ours never are: every target is a tessellm function and every argument plain data.
Re-running the user's main instead breaks a top-level script without ``if __name__ ==
"__main__":`` (the child builds the LLM again: multiprocessing's bootstrapping ``RuntimeError``)
and a script fed on standard input (``FileNotFoundError: '<stdin>'``). So while a child is
started, ``__main__`` is replaced by an empty module: the child starts from tessellm's own entry
point and the user's script runs exactly once, in the parent. A notebook or the REPL (a main with
no file) behaves the same as before.

**Fast.** A fresh interpreter spends ~3-4 s (2-core machine) importing torch, transformers and
tessellm before a worker does anything; a TP=4 engine paid that four times over. Children are
forked from a *forkserver* instead: one fresh interpreter that imports ``_PRELOAD`` once, then
forks a child per request (``multiprocessing``'s ``forkserver`` start method, the default from
Python 3.14). The forkserver never touches a device (``_PRELOAD`` is imports only, checked by
``tests/distributed/test_spawn_fast.py``), so its children initialise CUDA as freshly as spawned
ones do. Each child is a fresh fork of that imported state: nothing of an earlier child's (or the
caller's) state reaches it.

What a spawned child would get from the caller at the moment it starts, a forked one is given
explicitly, so the two are the same process but for the imports already done:

* the environment: the caller's ``os.environ`` now, applied before the target runs (the
  forkserver keeps the one it started with). A module imported in the forkserver may have read
  a variable at import time, so the forkserver is used only while the caller's environment,
  ``sys.path`` and working directory equal those it was started with, except ``TESSELLM_*``
  (``envs.py`` reads them when used, never at import) and ``PYTEST_*`` (pytest's bookkeeping);
  otherwise the child is spawned, as before.
* standard output and error: the caller's current file descriptors 1 and 2 (the forkserver
  holds the ones of when it started), so a rank's log and traceback land where the caller's do.
* ``sys.path`` and the working directory: ``multiprocessing`` sends them with every child.

A child's parent is the forkserver, not the caller: a child that must exit with the caller asks
``parent_gone()``, not ``os.getppid()``.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import multiprocessing.forkserver
import os
import sys
import threading
import types
from multiprocessing import reduction
from typing import Optional

_LOCK = threading.Lock()  # the swap of sys.modules["__main__"] and the forkserver's start

# What the forkserver imports before forking: everything an engine core or a worker imports to
# start (torch, transformers, the models, the backends' modules). Imports only, no device call.
_PRELOAD = ["tessellm.distributed.worker", "tessellm.distributed.executor",
            "tessellm.core.engine_process", "tessellm.core.engine_core", "tessellm.models.registry",
            "tessellm.backends.cpu.plugin"]

# Read when used, never at import: they may differ between the forkserver and the caller.
_CALL_TIME_ENV = ("TESSELLM_", "PYTEST_")

# (environment, sys.path, cwd) the forkserver of this process was started with; None: not yet.
# Process-wide because the forkserver is (one per process, ``multiprocessing.forkserver``).
_forkserver_key: Optional[tuple] = None


@contextlib.contextmanager
def clean_main():
    """Within this block, a started child does not import the parent's ``__main__``."""
    with _LOCK:
        main = sys.modules.get("__main__")
        sys.modules["__main__"] = types.ModuleType("__main__")
        try:
            yield
        finally:
            if main is not None:
                sys.modules["__main__"] = main


def spawn_process(target, name: str, args: tuple, daemon: bool = True):
    """A started process running ``target(*args)``: forked from the forkserver, or spawned
    where the caller's environment has changed since the forkserver started (module
    docstring); from a clean main either way."""
    env = dict(os.environ)
    proc_args = (target, args, env, _CallerStdio())
    with clean_main():  # holds _LOCK
        ctx = multiprocessing.get_context("forkserver" if _forkserver_fits(env) else "spawn")
        proc = ctx.Process(target=_run, name=name, args=proc_args, daemon=daemon)
        proc.start()
    return proc


def parent_gone(parent_pid: int) -> bool:
    """Whether the process that started this one (pid ``parent_pid``) has exited: its
    ``multiprocessing`` sentinel, or, in a process it did not start that way, re-parenting."""
    parent = multiprocessing.parent_process()
    if parent is not None and parent.pid == parent_pid:
        return not parent.is_alive()
    return os.getppid() != parent_pid


def _key(env: dict) -> tuple:
    kept = sorted((k, v) for k, v in env.items() if not k.startswith(_CALL_TIME_ENV))
    return tuple(kept), tuple(sys.path), os.getcwd()


def _forkserver_fits(env: dict) -> bool:
    """Start this process's forkserver on first use; whether it can fork for ``env``. Called
    under _LOCK, with a clean main (the forkserver then imports no user script)."""
    global _forkserver_key
    key = _key(env)
    if _forkserver_key is None:
        multiprocessing.forkserver.set_forkserver_preload(_PRELOAD)
        multiprocessing.forkserver.ensure_running()
        _forkserver_key = key
    return key == _forkserver_key


class _CallerStdio:
    """The caller's standard output and error as they are now, sent to the child as file
    descriptors (``multiprocessing`` passes them over its socket to a forked child)."""

    def __reduce__(self):
        fds = tuple(reduction.DupFd(fd) if _is_open(fd) else None for fd in (1, 2))
        return _received_stdio, fds


def _is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


def _received_stdio(*dupfds) -> tuple:
    return tuple(d.detach() if d is not None else None for d in dupfds)


def _run(target, args: tuple, env: dict, stdio: tuple) -> None:
    """The child: the caller's environment and standard streams, then ``target(*args)``."""
    os.environ.clear()
    os.environ.update(env)
    for fd, std, stream in zip(stdio, (1, 2), (sys.stdout, sys.stderr)):
        if fd is not None and fd != std:  # forked: the caller's, not the forkserver's
            if stream is not None:
                stream.flush()
            os.dup2(fd, std)
            os.close(fd)
    target(*args)
