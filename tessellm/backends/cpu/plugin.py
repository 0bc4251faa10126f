"""The cpu backend plugin: pure-torch paged attention, always available."""

from __future__ import annotations

from tessellm.backends.spec import AttentionSpec, Backend, OpsSpec, hookimpl

NAME = "cpu"


def _memory_info() -> tuple[int, int]:
    import os

    pages, page_size = os.sysconf("SC_PHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
    avail = os.sysconf("SC_AVPHYS_PAGES") * page_size
    return avail, pages * page_size


@hookimpl
def tessellm_register_backends(register):
    register(Backend(
        name=NAME, device_type="cpu", dist_backend="gloo", priority=0,
        is_available=lambda: True, memory_info=_memory_info,
        description="Pure-torch paged attention on the host CPU.",
        validated_on="hardware",
        capabilities={"graph_capture": False, "quantization": ["int8", "fp8", "gguf"]},
    ))


@hookimpl
def tessellm_attention_kernel(backend: Backend, spec: AttentionSpec):
    if backend.name != NAME:
        return None
    from tessellm.backends.cpu.attention import CpuAttentionKernel

    return CpuAttentionKernel(spec)


@hookimpl
def tessellm_fused_ops(backend: Backend, spec: OpsSpec):
    if backend.name != NAME:
        return None
    from tessellm.backends.reference.ops import ReferenceOps

    return ReferenceOps()


@hookimpl
def tessellm_quant_method(backend: Backend, spec):
    """int8, fp8 (W8A8 emulated in float32) and gguf through torch ops; awq/gptq: None."""
    if backend.name != NAME:
        return None
    from tessellm.backends.cpu.quant_ops import TorchQuantOps
    from tessellm.quantization import make_quant_method

    return make_quant_method(spec, TorchQuantOps())
