"""Start tessellm's child processes (engine core, workers) from any main.

``multiprocessing``'s ``spawn`` makes each child re-run the parent's ``__main__`` (by path, or by
module name under ``python -m``) so that functions defined there can be unpickled. Ours never
are: every target is a tessellm function and every argument plain data. Re-running the user's
main instead breaks a top-level script without ``if __name__ == "__main__":`` (the child builds
the LLM again: multiprocessing's bootstrapping ``RuntimeError``) and a script fed on standard
input (``FileNotFoundError: '<stdin>'``).

So while a child is started, ``__main__`` is replaced by an empty module: the child starts from
tessellm's own entry point and the user's script runs exactly once, in the parent. A notebook
or the REPL (a main with no file) behaves the same as before.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import sys
import threading
import types

_LOCK = threading.Lock()  # the swap of sys.modules["__main__"] is process-wide


@contextlib.contextmanager
def clean_main():
    """Within this block, a spawned child does not import the parent's ``__main__``."""
    with _LOCK:
        main = sys.modules.get("__main__")
        sys.modules["__main__"] = types.ModuleType("__main__")
        try:
            yield
        finally:
            if main is not None:
                sys.modules["__main__"] = main


def spawn_process(target, name: str, args: tuple, daemon: bool = True):
    """A started ``spawn`` process running ``target(*args)``, from a clean main."""
    proc = multiprocessing.get_context("spawn").Process(target=target, name=name, args=args,
                                                        daemon=daemon)
    with clean_main():
        proc.start()
    return proc
