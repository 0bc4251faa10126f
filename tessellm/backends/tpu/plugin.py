"""The tpu backend plugin: Google TPUs through torch-xla (and XLA's CPU device for tests).

Available when torch-xla imports and its PJRT runtime reports a device: a TPU, or XLA's CPU
device when ``PJRT_DEVICE=CPU`` is set (emulation for tests; torch-xla reads that variable).
Pieces: every step padded to shape buckets (``tessellm/core/shape_buckets.py``: tokens, sequences,
sampled rows, block-table width) and run as one XLA program, sampled on the host; attention as
torch-xla's Pallas ``ragged_paged_attention`` on a real TPU, else a pure-XLA padded path
(``xla_attention.py``); every bucket's program compiled at start-up as the graph capture
(``graph_runner.py``); pure-torch fused ops (XLA fuses elementwise chains itself), the
Mixture-of-Experts in static shapes (``xla_moe.py``: no program depends on the routing).
"""

from __future__ import annotations

import os

from tessellm.backends.spec import (QuantSpec, VALIDATED_UNTESTED, AttentionSpec, Backend, GraphSpec,
                                    LoRAOpsSpec, OpsSpec, hookimpl)

NAME = "tpu"
VALIDATION_NOTE = ("Never run on a TPU. Lane tpu-xla-cpu (torch-xla 2.9.0, torch 2.9.0, "
                   "PJRT_DEVICE=CPU): the model step ran for real as bucketed XLA programs on "
                   "PJRT's CPU device, KV cache in XLA tensors: the conformance suite and greedy "
                   "parity with the cpu backend on SmolLM2 and a tiny Llama (and its AWQ / GPTQ "
                   "checkpoints against their dequantized float32 model; a Qwen3-MoE AWQ one with "
                   "int4 experts likewise), every bucket's program compiled at start-up and none "
                   "after, whatever the MoE routing (docs/plugins.md 5.1). "
                   "ragged_paged_attention (Pallas, real TPU only) never ran.")


def _xla_device_type():
    import importlib.util

    if importlib.util.find_spec("torch_xla") is None:
        return None
    try:
        import torch_xla.runtime as xr

        return xr.device_type()
    except Exception:  # noqa: BLE001 - a broken install is "not available"
        return None


def _emulation_device_type() -> str:
    """``emulate=True`` runs on XLA's CPU device when torch-xla is installed, else host torch."""
    import importlib.util

    return "xla" if importlib.util.find_spec("torch_xla") is not None else "cpu"


def _paths() -> str:
    """What runs for real (``tessellm backends``), without starting the XLA runtime."""
    import importlib.metadata

    try:
        version = importlib.metadata.version("torch_xla")
    except importlib.metadata.PackageNotFoundError:
        return "host torch only (torch_xla not installed: emulate=True runs the padded math)"
    device = os.environ.get("PJRT_DEVICE", "unset")
    attention = ("ragged_paged_attention (Pallas)" if device == "TPU"
                 else "xla-padded (pure XLA; Pallas kernels need a TPU)")
    return (f"torch_xla {version}, PJRT_DEVICE={device}: bucketed steps as XLA programs, "
            f"all precompiled at start-up, attention {attention}, sampling on the host")


def _is_available() -> bool:
    return _xla_device_type() in ("TPU", "CPU")


def _memory_info() -> tuple[int, int]:
    import torch_xla
    import torch_xla.core.xla_model as xm

    import torch_xla.runtime as xr

    if xr.device_type() == "CPU":  # PJRT's CPU client keeps no allocator stats: host memory
        page = os.sysconf("SC_PAGE_SIZE")
        return os.sysconf("SC_AVPHYS_PAGES") * page, os.sysconf("SC_PHYS_PAGES") * page
    info = xm.get_memory_info(torch_xla.device())
    if "bytes_limit" in info:  # torch-xla >= 2.5
        return info["bytes_limit"] - info["bytes_used"], info["bytes_limit"]
    return info["kb_free"] * 1024, info["kb_total"] * 1024


def _synchronize() -> None:
    import torch_xla.core.xla_model as xm

    from tessellm.backends.tpu.graph_runner import _xla_sync

    _xla_sync()
    xm.wait_device_ops()


@hookimpl
def tessellm_register_backends(register):
    register(Backend(
        name=NAME, device_type="xla", dist_backend="xla", priority=80,
        is_available=_is_available, memory_info=_memory_info, synchronize=_synchronize,
        description="Google TPUs via torch-xla: bucketed steps precompiled at start-up, Pallas "
                    "ragged paged attention on TPU, a pure-XLA padded path elsewhere "
                    "(PJRT_DEVICE=CPU for tests).",
        validated_on=VALIDATED_UNTESTED, validation_note=VALIDATION_NOTE,
        capabilities={"graph_capture": True, "quantization": ["int8", "fp8", "fp8_block", "awq", "gptq",
                                                           "gguf", "bitsandbytes"],
                      "kv_cache_dtypes": ["auto"],
                      "sliding_window": True, "logit_softcap": True, "attention_sinks": True, "key_limits": True,
                      "shape_buckets": "powers of two (tokens from 8, sequences)",
                      "emulation_device_type": _emulation_device_type(),
                      "lane": "tpu-xla-cpu: XLA programs on PJRT CPU", "paths": _paths()},
    ))


@hookimpl
def tessellm_attention_kernel(backend: Backend, spec: AttentionSpec):
    if backend.name != NAME:
        return None
    from tessellm.backends.tpu.xla_attention import XlaPagedAttentionKernel, ragged_paged_attention

    return XlaPagedAttentionKernel(spec, ragged_paged_attention())


@hookimpl
def tessellm_fused_ops(backend: Backend, spec: OpsSpec):
    if backend.name != NAME:
        return None
    from tessellm.backends.tpu.ops import XlaOps

    return XlaOps()


@hookimpl
def tessellm_lora_ops(backend: Backend, spec: LoRAOpsSpec):
    """The reference LoRA ops, MoE experts' adapters in static shapes (``xla_moe.py``)."""
    if backend.name != NAME:
        return None
    from tessellm.backends.tpu.ops import XlaLoRAOps

    return XlaLoRAOps()


@hookimpl
def tessellm_graph_runner(backend: Backend, spec: GraphSpec):
    if backend.name != NAME or spec.enforce_eager:
        return None
    from tessellm.backends.tpu.graph_runner import XlaGraphRunner

    return XlaGraphRunner(spec.max_num_seqs, spec.capture_sizes)

@hookimpl
def tessellm_quant_method(backend: Backend, spec: QuantSpec):
    """int8, fp8 (emulated W8A8), fp8_block and gguf through the device-agnostic torch ops; AWQ
    and GPTQ int4 dequantized inside the traced graph (``tpu/quant_ops.py``)."""
    if backend.name != NAME:
        return None
    from tessellm.backends.tpu.quant_ops import XlaQuantOps
    from tessellm.quantization import make_quant_method

    return make_quant_method(spec, XlaQuantOps())
