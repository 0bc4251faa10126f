"""Triton launches that skip ``JITFunction.run``'s per-call binding, for the eager step's
small kernels whose host time is the step's time (``benchmarks/hybrid_host_step.py``).

``kernel[grid](*args, **meta)`` runs, every call, Triton's generated binder (a native
specialization call per argument: type, 16-byte alignment of each pointer, ``== 1`` and
``% 16`` of each int), builds its cache key (a string of the options), checks the kernel's
globals and only then calls the compiled kernel's launcher. For a 39-argument kernel that is
~25 us of Python a launch (measured on the CPU with the launcher stubbed: ~12 binding, ~4 the
key, the rest the keyword handling), against a few us of kernel on an eager Mamba step.

``FastLaunch(kernel)(grid, tensors, scalars, meta)`` keeps, per key of what decides Triton's
specialization, the compiled kernel Triton's own path gave the first call, and calls its
launcher as ``JITFunction.run`` does (same arguments, launch metadata and hooks). The key is
finer than Triton's: the tensors' dtypes (their pointers all 16-byte aligned: else Triton's
path), every other argument's type and value, the keyword constexprs and launch options, the
device and Triton's debug knobs. So a hit is always a launch Triton would have made with the same
compiled kernel; anything else (a miss, a pre-run hook, an add-stages hook, the interpreter,
``torch.compile`` tracing, a Triton whose ``run`` launches otherwise) goes through
``kernel[grid](...)`` itself.

Not kept: ``JITFunction.run``'s check that the kernel's globals did not change since it was
compiled (a module constant rebound at run time: the kept kernel would still be used).
Opt-in: ``TESSELLM_TRITON_FAST_LAUNCH=1`` (``envs.triton_fast_launch``, read once, at import)
turns it on; unset or 0, every launch takes Triton's own path.
"""

from __future__ import annotations

import inspect
import re
from functools import reduce
from operator import attrgetter, or_

import torch

from tessellm import envs

try:
    from triton import knobs
    from triton.runtime.driver import driver
except ImportError:  # a Triton before its knobs (3.4): every launch takes Triton's path
    knobs = driver = None


def _run_launches_as_expected() -> bool:
    """Whether this Triton's ``JITFunction.run`` binds and launches the way ``FastLaunch``
    repeats (its source names the same calls): else every launch takes Triton's own path."""
    try:
        from triton.runtime.jit import JITFunction

        src = re.sub(r"\s+", "", inspect.getsource(JITFunction.run))
    except Exception:  # noqa: BLE001 (no source, another Triton layout: not fast)
        return False
    wanted = ("bound_args,specialization,options=binder(*args,**kwargs)",
              "launch_metadata=kernel.launch_metadata(grid,stream,*bound_args.values())",
              "kernel.run(grid_0,grid_1,grid_2,stream,kernel.function,kernel.packed_metadata,"
              "launch_metadata,knobs.runtime.launch_enter_hook,knobs.runtime.launch_exit_hook,"
              "*bound_args.values())")
    return all(w in src for w in wanted)


def _enabled() -> bool:
    if knobs is None or not envs.triton_fast_launch():
        return False
    if envs.triton_interpret():
        return False
    return _run_launches_as_expected()


ENABLED = _enabled()


class FastLaunch:
    """``launch(grid, tensors, scalars, meta)``: ``kernel[grid](*tensors, *scalars, **meta)``,
    through the kept compiled kernel when its key was seen before (module docstring).
    ``tensors``: the kernel's first parameters, all tensors; ``scalars``: the next ones (ints,
    floats, bools, None); ``meta``: every later parameter (the constexprs) and the launch
    options (``num_warps``, ...) by name. A launch with a pointer not 16-byte aligned takes
    Triton's path (kept only for the common case: the key holds no per-pointer bits)."""

    __slots__ = ("kernel", "kept", "names", "plain")

    def __init__(self, kernel):
        self.kernel = kernel
        self.kept: dict = {}
        self.names = getattr(kernel, "arg_names", None)
        self.plain: dict = {}  # device -> whether its backend specializes as the key assumes

    def __call__(self, grid, tensors: tuple, scalars: tuple, meta: dict) -> None:
        if (not ENABLED or self.names is None or _compiling()
                or reduce(or_, map(_data_ptr, tensors)) & 15):
            self.kernel[grid](*tensors, *scalars, **meta)
            return
        if self.kernel.pre_run_hooks or knobs.runtime.add_stages_inspection_hook is not None:
            self.kernel[grid](*tensors, *scalars, **meta)
            return
        device = driver.active.get_current_device()
        compilation = knobs.compilation  # knobs this Triton has (3.6 lacks fpsan's)
        key = (device, knobs.runtime.debug, getattr(compilation, "instrumentation_mode", None),
               getattr(compilation, "fpsan_homomorphic_casts", None), *meta.items(),
               *map(_dtype, tensors), *map(type, scalars), *scalars)
        try:
            entry = self.kept.get(key)
        except TypeError:  # an unhashable constexpr: Triton's path, every time
            self.kernel[grid](*tensors, *scalars, **meta)
            return
        if entry is None:
            compiled = self.kernel[grid](*tensors, *scalars, **meta)
            self._keep(key, device, compiled, len(tensors) + len(scalars), meta)
            return
        compiled, tail = entry
        stream = driver.active.get_current_stream(device)
        every = (*tensors, *scalars, *tail)
        size = len(grid)
        compiled.run(grid[0], grid[1] if size > 1 else 1, grid[2] if size > 2 else 1, stream,
                     compiled.function, compiled.packed_metadata,
                     compiled.launch_metadata(grid, stream, *every),
                     knobs.runtime.launch_enter_hook, knobs.runtime.launch_exit_hook, *every)

    def _keep(self, key, device, compiled, given: int, meta: dict) -> None:
        """Keep what Triton's path launched (a compiled kernel, its launcher loaded) and the
        values of the parameters after the positional ones, in signature order; nothing when
        that cannot be repeated: a parameter not given, not a compiled kernel, or a backend
        whose specialization of tensors or ints is not the base one (ROCm's buffer ops look
        at a tensor's extent too)."""
        names = self.names[given:]
        if (getattr(compiled, "function", None) is None
                or not hasattr(compiled, "packed_metadata") or set(names) - set(meta)
                or not self._plain(device)):
            return
        self.kept[key] = (compiled, tuple(meta[n] for n in names))

    def _plain(self, device) -> bool:
        plain = self.plain.get(device)
        if plain is None:
            from triton.backends.compiler import BaseBackend

            try:
                backend = type(self.kernel.device_caches[device][3])
                plain = all(getattr(backend, m) is getattr(BaseBackend, m)
                            for m in ("get_tensor_specialization", "get_int_specialization"))
            except Exception:  # noqa: BLE001 (another Triton layout: not fast)
                plain = False
            self.plain[device] = plain
        return plain


_FAST: dict[int, tuple] = {}


def fast_launch(kernel) -> FastLaunch:
    """The one ``FastLaunch`` of ``kernel`` (for wrappers that launch several kernels)."""
    made = _FAST.get(id(kernel))
    if made is None or made[0] is not kernel:
        made = _FAST[id(kernel)] = (kernel, FastLaunch(kernel))
    return made[1]


_data_ptr = torch.Tensor.data_ptr
_compiling = torch.compiler.is_compiling  # traced: torch.compile wraps Triton's own launch
_dtype = attrgetter("dtype")
