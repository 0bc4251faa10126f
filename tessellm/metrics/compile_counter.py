"""Counts Triton JIT compilations in this process, and those after the engine said ready (and,
under torch-xla, XLA compilations after ready: ``xla_after_ready``).

Warm-up (``tessellm.core.warmup``) should leave nothing to compile: the lead checks on the GPU
that ``tessellm:triton_compilations_after_ready`` (``/metrics``) stays 0 under load. The count
comes from Triton's ``knobs.runtime.jit_post_compile_hook``, called once per new kernel
specialisation a process builds (from source or from the on-disk ``TRITON_CACHE_DIR``: either
way a request would have waited for it). Each compilation after ready is also logged, with the
kernel's name, as a warning.

The hook is process-wide by nature (Triton has one), so the counter is one per process:
``COUNTER``. ``install()`` is idempotent and chains a hook that was already set.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time

logger = logging.getLogger(__name__)


class CompileCounter:
    def __init__(self):
        self.total = 0
        self.after_ready = 0
        self.ready = False
        self.installed = False
        self._lock = threading.Lock()

    def install(self) -> bool:
        """Hook Triton (when it is importable); False when it is not."""
        if self.installed:
            return True
        try:
            from triton import knobs

            previous = knobs.runtime.jit_post_compile_hook
        except (ImportError, AttributeError):  # no Triton, or one older than its knobs (< 3.4)
            return False

        def hook(*args, **kwargs):
            self.observe(kwargs.get("fn"))
            return previous(*args, **kwargs) if previous is not None else None

        knobs.runtime.jit_post_compile_hook = hook
        self.installed = True
        return True

    def observe(self, fn=None) -> None:
        with self._lock:
            self.total += 1
            if self.ready:
                self.after_ready += 1
                logger.warning("Triton compiled %s after the engine was ready (%d so far).",
                               getattr(fn, "name", fn), self.after_ready)

    def mark_ready(self) -> None:
        self.ready = True
        self._xla_at_ready = xla_compilations()

    @property
    def xla_after_ready(self) -> int:
        """XLA programs this process compiled since ready (torch-xla's ``CompileTime`` count;
        0 without torch-xla). Serving should compile none: the tpu backend precompiles every
        bucketed step shape at start-up (``tessellm/core/shape_buckets.py``)."""
        return xla_compilations() - getattr(self, "_xla_at_ready", 0) if self.ready else 0


@contextlib.contextmanager
def xla_compile_count(out: dict):
    """``out["compiled"]``: XLA programs compiled inside the block (torch-xla's metrics)."""
    before = xla_compilations()
    t0 = time.monotonic()
    yield out
    out["compiled"] = xla_compilations() - before
    out["seconds"] = time.monotonic() - t0


def xla_compilations() -> int:
    """XLA programs this process compiled so far (0 without torch-xla imported)."""
    import sys

    if "torch_xla" not in sys.modules:
        return 0
    import torch_xla.debug.metrics as met

    data = met.metric_data("CompileTime")
    return int(data[0]) if data else 0



COUNTER = CompileCounter()
