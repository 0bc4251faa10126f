"""Running a backend whose device is absent: its own kernels and ops on host tensors.

``LLM(device="xpu", emulate=True)``, ``tessellm serve --device xpu --emulate`` and the
conformance suite's ``--emulate`` all go through ``emulated_backend``: the same ``Backend``
(same name, so every hook of its plugin still answers) with tensors on the CPU, or on the device
the plugin names in ``capabilities["emulation_device_type"]`` (the tpu plugin names "xla" when
torch-xla is installed: XLA's PJRT CPU device, ``PJRT_DEVICE=CPU``); graph capture is off
(device graphs need the device: the worker passes ``enforce_eager``); ranks on host tensors
communicate over gloo. The result says
``emulated=True``; while an emulated engine lives in a process, every log record it emits is
prefixed ``[emulated <name>]`` and the server's ``/version`` says ``"emulated": "<name>"``.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import threading

_lock = threading.Lock()
_live: dict[str, int] = {}  # emulated backend name -> engines alive in this process
_base_factory = None


def emulated_backend(backend):
    """``backend`` with its tensors on the host; ``emulated=True``. Never touches the device."""
    from tessellm.backends.spec import _no_sync

    if getattr(backend, "emulated", False):
        return backend
    _check_emulation_env(backend)
    device_type = backend.capabilities.get("emulation_device_type", "cpu")
    if device_type == "xla":
        os.environ.setdefault("PJRT_DEVICE", "CPU")  # read by torch-xla at its first use
    # Host tensors talk over gloo (tensor parallelism of an emulated backend: its kernels on
    # every rank, the ranks on CPU processes); torch-xla's CPU device keeps its own.
    dist_backend = "gloo" if device_type == "cpu" else backend.dist_backend
    return dataclasses.replace(
        backend, device_type=device_type, dist_backend=dist_backend, emulated=True,
        is_available=lambda: True,
        memory_info=None, synchronize=backend.synchronize if device_type != "cpu" else _no_sync,
        description=f"[emulated on {device_type} tensors] {backend.description}")


def _check_emulation_env(backend) -> None:
    """The backend's ``emulation_env`` (spec.CAPABILITIES) is set, or one error naming the fix.
    Without it the first kernel launch fails deep in the kernel library (Triton compiled for a
    device instead of interpreted: "0 active drivers", or "cpu tensor?" where a GPU is)."""
    from tessellm.backends.registry import DeviceError

    needed = backend.capabilities.get("emulation_env") or {}
    missing = {k: v for k, v in needed.items() if not _env_is(k, v)}
    if missing:
        assign = " ".join(f"{k}={v}" for k, v in missing.items())
        raise DeviceError(f"Emulating {backend.name!r} runs its kernels on host tensors, which "
                          f"needs {assign} in the environment before the process starts (read when "
                          f"the kernels are imported), e.g. `{assign} tessellm serve --device "
                          f"{backend.name} --emulate`.")


def _env_is(name: str, value: str) -> bool:
    """Whether the environment sets ``name`` to ``value``; TRITON_INTERPRET's "1" in any
    spelling Triton reads as on (``envs.triton_interpret``: true, on, yes, y)."""
    if name == "TRITON_INTERPRET" and value == "1":
        from tessellm import envs

        return envs.triton_interpret()
    return os.environ.get(name) == value


def _factory(*args, **kwargs):
    record = _base_factory(*args, **kwargs)
    if _live and isinstance(record.msg, str):
        names = ",".join(sorted(_live))
        record.msg = f"[emulated {names}] {record.msg}"
    return record


def mark_emulated(name: str) -> None:
    """An emulated engine starts in this process: prefix every log record from now on."""
    global _base_factory
    with _lock:
        if _base_factory is None:
            _base_factory = logging.getLogRecordFactory()
            logging.setLogRecordFactory(_factory)
        _live[name] = _live.get(name, 0) + 1


def unmark_emulated(name: str) -> None:
    with _lock:
        if name in _live:
            _live[name] -= 1
            if not _live[name]:
                del _live[name]


def emulated_names() -> list[str]:
    return sorted(_live)
