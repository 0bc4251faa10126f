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
  forkserver keeps the one it started with).
* standard output and error: the caller's current file descriptors 1 and 2 (the forkserver
  holds the ones of when it started), so a rank's log and traceback land where the caller's do.
* ``sys.path`` and the working directory: ``multiprocessing`` sends them with every child.

The imports themselves must be those a spawn would do now. They depend on the *import state*:
``sys.path`` (a relative entry is relative to the working directory) and the
variables that a module may read at import (``_IMPORT_TIME_ENV``: torch's, Triton's, the HF
libraries', OpenMP's and the BLAS', the loader's, Python's; a test's or a user's own variables,
``TESSELLM_*`` (``envs.py`` reads them when used, never at import) and the shell's bookkeeping
are passed to the child, not imported with). A forkserver serves only the import state it was
started with; when the caller's changes, a new forkserver is started for the new one (as long
as a spawn takes, once) and the previous one is kept for a change back (``_KEEP``). A
forkserver that is let go is stopped once its last child has exited (a running engine's
processes and their exit codes are not disturbed).

A forked child's own children (an engine core's workers) are forked by the forkserver that
forked it, while its import state is the one that forkserver was started with.

A child's parent is the forkserver, not the caller: a child that must exit with the caller asks
``parent_gone()``, not ``os.getppid()``.

**Ctrl-C.** A terminal sends SIGINT to its whole foreground process group: the caller, and every
child (engine core, worker ranks) with it. A child ignores it (``SIG_IGN``, set before its target
runs): its caller stops it through the normal path (the core's ``shutdown`` message, a worker's
``shutdown`` command, a KV connector's saves written on the way), as vLLM's engine core does. A
child that took the interrupt itself would die mid-step with a ``KeyboardInterrupt`` traceback,
and race the caller's orderly shutdown (a server's drain saw its core dead). A forkserver (or a
spawned child) is started with SIGINT blocked, a mask it and its forks inherit: neither its
imports nor a child before ``_run`` is interrupted (the caller's SIGINT stays pending for it,
never lost). SIGTERM is left as it is (``core/core_stop.py``), and a child still exits by
itself once its caller is gone.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import multiprocessing
import multiprocessing.forkserver
import os
import signal
import sys
import threading
import types
import weakref
from multiprocessing import reduction
from typing import Optional

logger = logging.getLogger(__name__)

_LOCK = threading.Lock()  # the swap of sys.modules["__main__"], the forkservers

# What the forkserver imports before forking: everything an engine core or a worker imports to
# start (torch, transformers, the models, the backends' modules). Imports only, no device call.
# Also what a child would import lazily at its first model config and load (transformers' auto
# config, its loading core, Llama's config; triton): a warm forkserver's TP=2 CPU start of a
# tiny Llama went from 1.7 s to 0.1 s.
_PRELOAD = ["tessellm.distributed.worker", "tessellm.distributed.executor",
            "tessellm.core.engine_process", "tessellm.core.engine_core", "tessellm.models.registry",
            "tessellm.backends.cpu.plugin", "tessellm.loader.model_loader",
            "transformers.models.auto.configuration_auto", "transformers.core_model_loading",
            "transformers.models.llama.configuration_llama", "triton"]

# Variables a module imported by a child may read at import (by prefix; module docstring):
# found by recording every read of os.environ while _PRELOAD imports (torch, its compiler and
# profiler settings, numpy, tqdm, pyzmq, msgpack, certificates), widened to the families that
# the native libraries (CUDA/ROCm/XPU/XLA runtimes, OpenMP, BLAS, the allocator) read when
# loaded and to the HF libraries' and Triton's settings.
_IMPORT_TIME_ENV = (
    "TORCH", "PYTORCH", "TRITON", "CUDA", "NV", "NCCL", "CUBLAS", "CUDNN", "HIP", "ROC", "HSA",
    "AMD", "ZE_", "SYCL", "ONEAPI", "IPEX", "CCL", "XLA", "PJRT", "TPU", "OMP", "KMP", "GOMP",
    "MKL", "OPENBLAS", "BLIS", "NPY", "NUMPY", "HF_", "HUGGINGFACE", "TRANSFORMERS", "TOKENIZERS",
    "SAFETENSORS", "TQDM", "FX_", "COMPILE_", "KINETO", "MSGPACK", "PYZMQ", "ZMQ", "PYTHON",
    "LD_", "MALLOC", "GLIBC", "LC_", "LANG", "XDG_", "SSL_", "RUST_", "ACCELERATE", "AWS_",
    "SYMPY", "MPMATH", "PILLOW", "USE_TORCH", "DISABLE_KERNEL", "DISABLE_TELEMETRY",
    "DO_NOT_TRACK", "EAGER_IMPORT", "NPU_", "OAUTH_", "OPENID_",
    "HOME", "PATH", "TMPDIR", "TEMP", "TMP")

_KEEP = 2  # forkservers kept running, the most recently used first (each holds its imports)

# Import state -> its running forkserver. Process-wide: a child of a forkserver starts its own.
_servers: "collections.OrderedDict[tuple, _Forkserver]" = collections.OrderedDict()
_let_go: list["_Forkserver"] = []  # forkservers let go: stopped once their children have exited
# How this process's children were started, for tests and diagnostics: "forked_new" (the first
# child of a forkserver: its start was waited for), "forked" (the others), "spawned".
counts: collections.Counter = collections.Counter()


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
    """A started process running ``target(*args)``, forked from the forkserver of the caller's
    import state (started now if there is none; module docstring), from a clean main."""
    env = dict(os.environ)
    with clean_main():  # holds _LOCK
        state = import_state(env)
        server = _forkserver(state)
        if server is None:  # no forkserver here (multiprocessing has none on this platform)
            counts["spawned"] += 1
            proc = multiprocessing.get_context("spawn").Process(
                target=_run, name=name, args=(target, args, env, _CallerStdio()), daemon=daemon)
            with _sigint_blocked():
                proc.start()
            return proc
        # The child's own children (an engine core's workers) are forked by the same
        # forkserver while the child's import state is this one.
        proc = multiprocessing.get_context("forkserver").Process(
            target=_run, name=name, args=(target, args, env, _CallerStdio(), state), daemon=daemon)
        counts["forked_new" if server.forked == 0 else "forked"] += 1
        server.start(proc)
    return proc


def prestart(env_defaults: Optional[dict] = None) -> None:
    """Start now the forkserver that a child started later (a server's engine core) will be
    forked by, so that its imports run while the caller goes on with its own; returns at once.
    ``env_defaults``: the variables the caller will have set by then if unset
    (``os.environ.setdefault``); the environment is left as it was. A forkserver whose import
    state no longer fits when the child starts is only a start wasted."""
    with clean_main():  # holds _LOCK
        env = dict(os.environ)
        for key, value in (env_defaults or {}).items():
            env.setdefault(key, value)
        if env == os.environ:
            _forkserver(import_state(env))
            return
        saved = dict(os.environ)
        os.environ.update(env)  # the forkserver starts with the caller's environment
        try:
            _forkserver(import_state(env))
        finally:
            for key in env.keys() - saved.keys():
                del os.environ[key]


def parent_gone(parent_pid: int) -> bool:
    """Whether the process that started this one (pid ``parent_pid``) has exited: its
    ``multiprocessing`` sentinel, or, in a process it did not start that way, re-parenting."""
    parent = multiprocessing.parent_process()
    if parent is not None and parent.pid == parent_pid:
        return not parent.is_alive()
    return os.getppid() != parent_pid


def import_state(env: dict) -> tuple:
    """What the imports of a child started now depend on: the import-time variables of ``env``
    and the absolute ``sys.path``."""
    kept = sorted((k, v) for k, v in env.items() if k.startswith(_IMPORT_TIME_ENV)
                  and not k.startswith("TESSELLM_"))
    return tuple(kept), tuple(_resolved(p) for p in sys.path)


def _resolved(entry) -> str:
    """A sys.path entry as imports see it: a relative one that exists is relative to the
    working directory; one that does not (a path hook's marker) is a name."""
    if not isinstance(entry, str) or os.path.isabs(entry):
        return entry
    return os.path.abspath(entry) if entry == "" or os.path.exists(entry) else entry


def _forkserver(state: tuple) -> Optional["_Forkserver"]:
    """The running forkserver for ``state``, started now (with this process's environment,
    sys.path and working directory, whose import state is ``state``) if there is none. Called
    under _LOCK, with a clean main (the forkserver then imports no user script)."""
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return None
    _reap()
    server = _servers.pop(state, None)
    if server is None or not server.running():
        if server is not None:
            _let_go.append(server)
        if _servers:
            logger.debug("A forkserver for a changed import state (%s); started in %s.",
                         _changes(next(iter(_servers)), state), os.getpid())
        server = _Forkserver()
    for other in [k for k, v in _servers.items() if v.forked == 0]:
        _let_go.append(_servers.pop(other))  # prestarted for a state that did not come
    _servers[state] = server
    _servers.move_to_end(state, last=False)
    while len(_servers) > _KEEP:
        _let_go.append(_servers.popitem()[1])
    return server


def _changes(old: tuple, new: tuple) -> str:
    """What differs between two import states, in words (for the log)."""
    old_env, new_env = dict(old[0]), dict(new[0])
    names = sorted(k for k in old_env.keys() | new_env.keys() if old_env.get(k) != new_env.get(k))
    if old[1] != new[1]:
        added = [p for p in new[1] if p not in old[1]]
        removed = [p for p in old[1] if p not in new[1]]
        names.append(f"sys.path (added {added}, removed {removed})" if added or removed
                     else "sys.path's order")
    return ", ".join(names) or "none"


class _Forkserver(multiprocessing.forkserver.ForkServer):
    """One forkserver (``multiprocessing``'s), started now, and the children it forked."""

    def __init__(self):
        super().__init__()
        self.set_forkserver_preload(_PRELOAD)
        with _sigint_blocked():  # the forkserver and its forks: Ctrl-C is the caller's
            self.ensure_running()
        self.owner = os.getpid()  # a process forked from this one (os.fork) starts its own
        self.children: weakref.WeakSet = weakref.WeakSet()
        self.forked = 0  # children started

    def start(self, proc) -> None:
        """``proc.start()`` from this forkserver (``multiprocessing`` asks its module-level
        one)."""
        module = multiprocessing.forkserver
        connect = module.connect_to_new_process
        module.connect_to_new_process = self.connect_to_new_process
        try:
            proc.start()
        finally:
            module.connect_to_new_process = connect
        self.children.add(proc)
        self.forked += 1

    def running(self) -> bool:
        pid = self._forkserver_pid
        if pid is None or os.getpid() != self.owner:
            return False
        try:
            return os.waitpid(pid, os.WNOHANG)[0] == 0
        except ChildProcessError:
            return False

    def stop_when_idle(self) -> bool:
        """Stop once none of its children runs; whether it has stopped. (A forkserver asked to
        stop while a child runs exits with that child, before it reports the child's exit code:
        ``multiprocessing``'s forkserver checks its "alive" pipe first.)"""
        if os.getpid() != self.owner:
            return True
        if any(proc.is_alive() for proc in list(self.children)):
            return False
        with self._lock:
            if self._forkserver_alive_fd is not None:
                os.close(self._forkserver_alive_fd)  # the forkserver exits at this end-of-file
                self._forkserver_alive_fd = None
        return not self.running()  # then reaped, else asked again next time


class _Inherited(_Forkserver):
    """In a forked child: the forkserver that forked it, started by the caller (which stops
    it; it runs at least as long as this child, which holds its "alive" pipe)."""

    def __init__(self):
        multiprocessing.forkserver.ForkServer.__init__(self)
        inherited = multiprocessing.forkserver._forkserver  # set up by the forkserver's fork
        for name in ("_forkserver_address", "_forkserver_alive_fd", "_forkserver_authkey"):
            if hasattr(inherited, name):
                setattr(self, name, getattr(inherited, name))
        self.owner = os.getpid()
        self.children = weakref.WeakSet()
        self.forked = 1  # its first child is this process

    def ensure_running(self) -> None:
        pass  # its caller's

    def running(self) -> bool:
        return os.getpid() == self.owner and self._forkserver_address is not None

    def stop_when_idle(self) -> bool:
        return True  # not this process's to stop


def _reap() -> None:
    """Stop the forkservers let go of whose children have all exited."""
    _let_go[:] = [server for server in _let_go if not server.stop_when_idle()]


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


@contextlib.contextmanager
def _sigint_blocked():
    """SIGINT blocked in this thread while a process starts (a fork and exec inherit the mask:
    module docstring); one that arrives meanwhile is delivered once unblocked. The resource
    tracker is started first: its own start (within a forkserver's or a spawn's) blocks SIGINT
    and then unblocks it, which would undo this block."""
    from multiprocessing import resource_tracker

    resource_tracker.ensure_running()
    old = signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGINT])
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def _run(target, args: tuple, env: dict, stdio: tuple, state: Optional[tuple] = None) -> None:
    """The child: the caller's environment and standard streams, then ``target(*args)``.
    ``state``: forked, by the forkserver of this import state. Ctrl-C is the caller's to handle
    (module docstring)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # Ignored now, so unblocked (no mask left for its subprocesses). They inherit the SIG_IGN
    # (exec keeps an ignored signal ignored): a compiler it runs mid-step is not cut by Ctrl-C.
    signal.pthread_sigmask(signal.SIG_UNBLOCK, [signal.SIGINT])
    os.environ.clear()
    os.environ.update(env)
    if state is not None:
        _servers[state] = _Inherited()
    for fd, std, stream in zip(stdio, (1, 2), (sys.stdout, sys.stderr)):
        if fd is not None and fd != std:  # forked: the caller's, not the forkserver's
            if stream is not None:
                stream.flush()
            os.dup2(fd, std)
            os.close(fd)
    target(*args)
