"""The xpu backend plugin: Intel GPUs through ``torch.xpu``.

Attention and fused ops come from intel-extension-for-pytorch when it is installed (its
PagedAttention flash-varlen ops and ``ipex.llm.functional``), else a pure-torch path that runs
on any device. Graph capture: ``torch.xpu.XPUGraph`` where the installed torch has it.
Communicator: xccl (torch >= 2.8). Nothing here has run on an Intel GPU: see VALIDATION_NOTE.
"""

from __future__ import annotations

from tessellm.backends.spec import (QuantSpec, VALIDATED_UNTESTED, AttentionSpec, Backend, GraphSpec,
                                    OpsSpec, hookimpl)

NAME = "xpu"
VALIDATION_NOTE = ("Never run on an Intel GPU, and intel-extension-for-pytorch never ran here "
                   "(2026-11-21): IPEX 2.8.0, the newest on PyPI (a CPU build), refuses torch 2.13 "
                   "at import ('needs to work with PyTorch 2.8.*'), and torch 2.8.0 on PyPI is a "
                   "CUDA build (0.9 GB plus nvidia-* wheels). The pure-torch fallback kernel "
                   "passes the conformance attention tests on CPU tensors (--emulate).")


def _is_available() -> bool:
    import torch

    return hasattr(torch, "xpu") and torch.xpu.is_available()


def _memory_info() -> tuple[int, int]:
    import torch

    return torch.xpu.mem_get_info()


def _synchronize() -> None:
    import torch

    torch.xpu.synchronize()


@hookimpl
def tessellm_register_backends(register):
    register(Backend(
        name=NAME, device_type="xpu", dist_backend="xccl", priority=70,
        is_available=_is_available, memory_info=_memory_info, synchronize=_synchronize,
        description="Intel GPUs (torch.xpu): IPEX paged attention when installed, else pure "
                    "torch; XPU graphs; xccl.",
        validated_on=VALIDATED_UNTESTED, validation_note=VALIDATION_NOTE,
        capabilities={"graph_capture": True, "quantization": ["int8", "fp8", "gguf"],
                      "kv_cache_dtypes": ["auto"],
                      "sliding_window": True, "ipex": "optional"},
    ))


@hookimpl
def tessellm_attention_kernel(backend: Backend, spec: AttentionSpec):
    if backend.name != NAME:
        return None
    from tessellm.backends.xpu.ipex_attention import IpexAttentionKernel, ipex_paged_attention_ops

    ops = ipex_paged_attention_ops()
    if ops is not None:
        return IpexAttentionKernel(spec, ops)
    from tessellm.backends.reference.padded_attention import PaddedTorchAttentionKernel

    return PaddedTorchAttentionKernel(spec)


@hookimpl
def tessellm_fused_ops(backend: Backend, spec: OpsSpec):
    if backend.name != NAME:
        return None
    from tessellm.backends.xpu.ipex_ops import IpexOps, ipex_functional

    functional = ipex_functional()
    if functional is not None:
        return IpexOps(functional)
    from tessellm.backends.reference.ops import ReferenceOps

    return ReferenceOps()


@hookimpl
def tessellm_graph_runner(backend: Backend, spec: GraphSpec):
    if backend.name != NAME or spec.enforce_eager:
        return None
    import torch

    if not hasattr(getattr(torch, "xpu", None), "XPUGraph"):
        return None
    from tessellm.backends.reference.device_graph_runner import TorchDeviceGraphRunner, default_capture_sizes

    return TorchDeviceGraphRunner(spec.capture_sizes or default_capture_sizes(spec.max_num_seqs),
                                  device_api="xpu", name="xpu-graphs")

@hookimpl
def tessellm_quant_method(backend: Backend, spec: QuantSpec):
    """int8, fp8 (emulated W8A8) and gguf through the device-agnostic torch ops."""
    if backend.name != NAME:
        return None
    from tessellm.backends.reference.quant_ops import TorchQuantOps
    from tessellm.quantization import make_quant_method

    return make_quant_method(spec, TorchQuantOps())
