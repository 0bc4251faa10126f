"""Which Triton kernel variants a piece of work would compile, found on the CPU.

Under ``TRITON_INTERPRET=1`` (the emulated cuda backend) nothing compiles, so ``record()`` patches
the interpreter's launch to compute, for every launch, the specialisation key Triton's JIT would
look up on a GPU: the kernel's constexpr values, each int argument as 1 / a multiple of 16 / other
(as 32- or 64-bit; none for ``do_not_specialize`` arguments), each float and bool by type, each
tensor by dtype and 16-byte alignment, and the launch options (warps, stages, ...). A key first
seen in a piece of work is a compilation that work would pay on a GPU (or a load from
``TRITON_CACHE_DIR``).

    with record() as seen:
        ...                       # warm-up
        warm = seen.snapshot()
        ...                       # a first real batch
    new = seen.since(warm)        # variants it would compile after ready
"""

from __future__ import annotations

import contextlib
import inspect

import torch

# launch options that are part of a compiled variant (the rest of the kwargs are arguments)
_OPTIONS = ("num_warps", "num_stages", "num_ctas", "maxnreg", "launch_pdl", "launch_cooperative_grid")


def _arg_key(value, specialize: bool):
    if isinstance(value, torch.Tensor):
        return (str(value.dtype).removeprefix("torch."), value.data_ptr() % 16 == 0)
    if value is None:
        return None
    if isinstance(value, bool):
        return "i1"
    if isinstance(value, int):
        width = "i32" if -2 ** 31 <= value < 2 ** 31 else "i64"
        if not specialize:
            return width
        return (width, "one" if value == 1 else "div16" if value % 16 == 0 else "any")
    if isinstance(value, float):
        return "fp32"
    return type(value).__name__


class Seen:
    def __init__(self):
        self.keys: dict = {}  # key -> order first seen
        self.launches = 0

    def add(self, key) -> None:
        self.launches += 1
        self.keys.setdefault(key, len(self.keys))

    def snapshot(self) -> set:
        return set(self.keys)

    def since(self, before: set) -> list:
        return sorted((k for k in self.keys if k not in before), key=self.keys.get)

    @staticmethod
    def names(keys) -> list:
        return sorted({k[0] for k in keys})


def kernel_key(fn, params, constexprs: set, unspecialized: set, args, kwargs) -> tuple:
    bound = dict(zip(params, args))
    bound.update({k: v for k, v in kwargs.items() if k in params})
    sig = []
    for name in params:
        value = bound.get(name, inspect.Parameter.empty)
        if value is inspect.Parameter.empty:
            continue  # a default constexpr: the same in every launch
        if name in constexprs:
            sig.append((name, value if not isinstance(value, torch.dtype) else str(value)))
        else:
            sig.append((name, _arg_key(value, name not in unspecialized)))
    options = tuple(sorted((k, kwargs[k]) for k in _OPTIONS if k in kwargs))
    return (f"{fn.__module__.split('.')[-1]}.{fn.__name__}", tuple(sig), options)


@contextlib.contextmanager
def record():
    """Record the specialisation key of every interpreted Triton launch in the block."""
    from triton.runtime.interpreter import InterpretedFunction

    seen = Seen()
    real = InterpretedFunction.run
    meta: dict = {}

    def describe(self):
        if self.fn not in meta:
            sig = inspect.signature(self.fn)
            params = list(sig.parameters)
            constexprs = {n for n, p in sig.parameters.items()
                          if "constexpr" in str(p.annotation)}
            dns = self.kwargs.get("do_not_specialize") or ()
            unspecialized = {params[d] if isinstance(d, int) else d for d in dns}
            meta[self.fn] = (params, constexprs, unspecialized)
        return meta[self.fn]

    def run(self, *args, grid, warmup, **kwargs):
        params, constexprs, unspecialized = describe(self)
        seen.add(kernel_key(self.fn, params, constexprs, unspecialized, args, kwargs))
        return real(self, *args, grid=grid, warmup=warmup, **kwargs)

    InterpretedFunction.run = run
    try:
        yield seen
    finally:
        InterpretedFunction.run = real
