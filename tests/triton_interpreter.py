"""Time, not coverage: Triton's interpreter without its redundant re-patching (tests/conftest.py
installs it where TRITON_INTERPRET=1).

Each interpreted launch (``GridExecutor.__call__``) patches ``triton.language`` for the
interpreter (``_patch_lang``: every builtin of tl, tl.core, tl.math and tl.tensor found through
``inspect.getmembers``) and restores it at the end. Each call of a nested ``@triton.jit``
function inside the kernel patches again (``InterpretedFunction.__call__``), ~3 ms on a busy
2-core machine, for every call of every program of every launch: a helper called in a K loop
costs more than the arithmetic (the bnb4 GEMV of a tiny model: half its interpreted time).
Inside a launch those languages are already patched, and the nested patch is never restored
(the launch's own restore puts the originals back), so it changes nothing: here a nested call
whose modules the launch in progress (this thread's) patched skips it. A nested function seeing
another language module than its kernel still patches, as before. Results are the interpreter's
own, bit for bit (tests/kernels pass with it)."""

from __future__ import annotations

import inspect
import threading


def skip_nested_patching() -> None:
    """Install the skip (module docstring) on triton.runtime.interpreter; idempotent."""
    import triton.language as tl
    from triton.runtime import interpreter

    if not (hasattr(interpreter, "_patch_lang") and hasattr(interpreter, "_LangPatchScope")):
        return  # another Triton: its interpreter as it is
    if getattr(interpreter._patch_lang, "skips_nested", False):
        return
    patch = interpreter._patch_lang
    launch = threading.local()  # the language modules the launch in progress patched

    def langs_of(fn) -> set:
        return {id(v) for v in fn.__globals__.values()
                if inspect.ismodule(v) and v in (tl, tl.core)}

    def patch_lang(fn):
        patched = getattr(launch, "langs", None)
        if patched is not None and langs_of(fn) <= patched:
            return interpreter._LangPatchScope()  # nothing to restore
        scope = patch(fn)
        if patched is None:  # a launch (GridExecutor), not a nested call
            launch.langs = langs_of(fn)
            restore = scope.restore

            def restore_and_end():
                launch.langs = None
                restore()

            scope.restore = restore_and_end
        return scope

    patch_lang.skips_nested = True
    patch_lang.triton_own = patch
    interpreter._patch_lang = patch_lang
